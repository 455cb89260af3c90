"""``tokenmill bench offline``: throughput on random-token prompts, vs HF transformers.

The workload follows nano-vllm's bench (scaled down for a CPU by default):
N prompts of random token ids, input and output lengths uniform in ranges,
``ignore_eos`` so every request generates exactly its output length. The same
prompts then go through HF transformers ``generate`` in static batches, in the
same process, and the ratio is printed.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

from tokenmill.engine.args import EngineArgs


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def input_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


@dataclass
class BenchResult:
    name: str
    seconds: float
    requests: int
    input_tokens: int
    output_tokens: int
    note: str = ""

    @property
    def output_tps(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_tps(self) -> float:
        return (self.input_tokens + self.output_tokens) / self.seconds


def make_workload(
    num_prompts: int, input_len: tuple[int, int], output_len: tuple[int, int],
    vocab_size: int, seed: int,
) -> Workload:
    """Random token ids (avoiding the first 100 ids, where special tokens live)."""
    rng = random.Random(seed)
    low = min(100, vocab_size - 1)
    prompts = [
        [rng.randint(low, vocab_size - 1) for _ in range(rng.randint(*input_len))]
        for _ in range(num_prompts)
    ]
    outs = [rng.randint(*output_len) for _ in range(num_prompts)]
    return Workload(prompts, outs)


def run_tokenmill(llm: Any, work: Workload, warmup: bool = True) -> BenchResult:
    from tokenmill.sampling import SamplingParams

    if warmup:
        llm.generate([work.prompts[0][:16]], SamplingParams(max_tokens=4, temperature=0),
                     use_tqdm=False)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
              for n in work.output_lens]
    t0 = time.perf_counter()
    outs = llm.generate(work.prompts, params, use_tqdm=True)
    dt = time.perf_counter() - t0
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    return BenchResult("tokenmill", dt, len(outs), work.input_tokens, produced)


def load_hf_model(engine_model_path: str, fmt: str, dtype: Any, device: Any,
                  gguf_file: str | None = None) -> Any:
    """The same weights in HF transformers (its own GGUF loader for GGUF files)."""
    import os

    import transformers

    if fmt == "gguf":
        d, f = os.path.split(gguf_file or engine_model_path)
        model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype)
    elif fmt == "dummy":
        cfg = transformers.AutoConfig.from_pretrained(engine_model_path)
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(engine_model_path, dtype=dtype)
    return model.to(device).eval()


def run_hf(model: Any, work: Workload, batch_size: int, device: Any) -> BenchResult:
    """Static batches, left padding; each batch runs to its longest requested output."""
    import torch

    pad = 0
    useful = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(work.prompts), batch_size):
            prompts = work.prompts[start:start + batch_size]
            outs = work.output_lens[start:start + batch_size]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), pad, dtype=torch.long)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for i, p in enumerate(prompts):
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            n = max(outs)
            model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=n,
                min_new_tokens=n, do_sample=False, pad_token_id=pad,
            )
            useful += sum(outs)
    dt = time.perf_counter() - t0
    return BenchResult(f"hf-transformers (batch {batch_size})", dt, len(work.prompts),
                       work.input_tokens, useful,
                       note="static batches run to their longest output; only requested "
                            "tokens are counted")


def format_table(results: list[BenchResult]) -> str:
    base = results[0]
    # ratio: tokenmill's output tokens/s divided by this row's (> 1 = tokenmill faster).
    lines = [f"{'engine':<34}{'time s':>9}{'out tok/s':>12}{'total tok/s':>13}"
             f"{'tokenmill/x':>13}"]
    for r in results:
        ratio = base.output_tps / r.output_tps if r is not base else 1.0
        lines.append(f"{r.name:<34}{r.seconds:>9.2f}{r.output_tps:>12.1f}"
                     f"{r.total_tps:>13.1f}{ratio:>12.2f}x")
    return "\n".join(lines)


def _range(text: str) -> tuple[int, int]:
    a, _, b = text.partition(":")
    lo, hi = int(a), int(b or a)
    if lo <= 0 or hi < lo:
        raise argparse.ArgumentTypeError(f"bad range {text!r}: use MIN:MAX with 0 < MIN <= MAX")
    return lo, hi


def cmd_offline(args: argparse.Namespace) -> int:
    from tokenmill.llm import LLM

    engine_args = EngineArgs.from_cli(args)
    llm = LLM(**{k: v for k, v in vars(engine_args).items()})
    engine = llm.engine
    work = make_workload(args.num_prompts, args.input_len, args.output_len,
                         engine.model_config.vocab_size, args.seed)
    print(f"workload: {args.num_prompts} prompts, input {args.input_len}, output "
          f"{args.output_len}, {work.input_tokens} prompt + {work.output_tokens} output tokens")
    results = [run_tokenmill(llm, work)]
    print(f"tokenmill: {results[0].output_tps:.1f} output tok/s")
    if not args.no_hf:
        dtype, device, path, fmt = (engine.config.dtype, engine.device, engine.model_path,
                                    engine.config.load_format)
        gguf_file = engine.gguf_file
        del llm, engine
        gc.collect()
        model = load_hf_model(path, fmt, dtype, device, gguf_file)
        model.generate(input_ids=__import__("torch").tensor([work.prompts[0][:8]]).to(device),
                       max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        for bsz in args.hf_batch_size:
            results.append(run_hf(model, work, bsz, device))
            print(f"{results[-1].name}: {results[-1].output_tps:.1f} output tok/s")
    print()
    print(format_table(results))
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump([asdict(r) | {"output_tps": r.output_tps, "total_tps": r.total_tps}
                       for r in results], f, indent=2)
    return 0


def add_cli(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser(
        "offline", help="offline throughput on random prompts, side by side with HF transformers"
    )
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=_range, default=(64, 256), help="MIN:MAX prompt tokens")
    p.add_argument("--output-len", type=_range, default=(32, 128), help="MIN:MAX output tokens")
    p.add_argument("--hf-batch-size", type=int, nargs="+", default=[8],
                   help="static batch sizes to try for HF transformers (best is the reference)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF transformers reference")
    p.add_argument("--result-json", default=None)
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=cmd_offline)
