"""``tokenmill bench offline``: throughput on random-token prompts, vs HF transformers.

The workload follows nano-vllm's bench (scaled down for a CPU by default):
N prompts of random token ids, input and output lengths uniform in ranges,
``ignore_eos`` so every request generates exactly its output length. The same
prompts then go through HF transformers ``generate`` in static batches, in the
same process, and the ratio is printed.

llama.cpp joins on the same GGUF (see :mod:`tokenmill.bench.llamacpp`):
``--llama-bench PATH`` runs llama.cpp's ``llama-bench`` pp/tg tests next to
tokenmill's equivalents, and ``--llama-server URL`` sends the throughput
workload to a running ``llama-server`` and adds its row to the table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
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


def run_llama_server_row(args: argparse.Namespace, work: Workload) -> BenchResult:
    """The throughput workload against ``--llama-server``, as a row of the table."""
    from tokenmill.bench import llamacpp

    run = llamacpp.run_llama_server(args.llama_server, work.prompts, work.output_lens,
                                    concurrency=args.llama_server_concurrency,
                                    timeout=args.llama_server_timeout)
    slots = f", {run.total_slots} slots" if run.total_slots else ""
    name = f"llama-server (conc {run.concurrency}{slots})"
    note = f"{args.llama_server}; model {run.model_path or '?'}"
    # Token counts are the server's own (tokens_evaluated / tokens_predicted).
    return BenchResult(name, run.seconds, run.requests, run.prompt_tokens, run.output_tokens,
                       note=note)


def run_llama_bench_comparison(args: argparse.Namespace, engine: Any) -> list[Any]:
    """tokenmill's pp/tg tests, then llama-bench's on the same GGUF; print the table."""
    from tokenmill.bench import llamacpp

    if not engine.gguf_file:
        raise ValueError("--llama-bench needs a GGUF model (llama.cpp reads only GGUF)")
    threads = args.num_threads or os.cpu_count() or 1
    print(f"llama-bench comparison: pp{args.n_prompt} / tg{args.n_gen}, {threads} threads, "
          f"{args.reps} reps (medians), {os.path.basename(engine.gguf_file)}", flush=True)
    ours = llamacpp.run_tokenmill_micro(engine, args.n_prompt, args.n_gen, args.reps,
                                        seed=args.seed)
    for t in ours:
        print(f"tokenmill {t.name}: {t.median_ts:.1f} tok/s", flush=True)
    theirs = llamacpp.run_llama_bench(args.llama_bench, engine.gguf_file, args.n_prompt,
                                      args.n_gen, threads, args.reps)
    for t in theirs:
        print(f"llama.cpp {t.name}: {t.median_ts:.1f} tok/s", flush=True)
    rows = llamacpp.pair_micro_results(theirs, ours)
    print()
    print(llamacpp.format_micro_table(rows))
    print()
    return rows


def _count(minimum: int) -> Any:
    """An argparse type: an int >= ``minimum``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def cmd_offline(args: argparse.Namespace) -> int:
    from tokenmill.llm import LLM

    if args.llama_bench and args.n_prompt == 0 and args.n_gen == 0:
        raise ValueError("--llama-bench needs -p or -n above 0")
    engine_args = EngineArgs.from_cli(args)
    llm = LLM(**{k: v for k, v in vars(engine_args).items()})
    engine = llm.engine
    micro_rows = []
    if args.llama_bench:
        micro_rows = run_llama_bench_comparison(args, engine)
    # --llama-bench alone answers its own question; the throughput workload runs by
    # default, with --llama-server (its row belongs there) or when asked for.
    results: list[BenchResult] = []
    if not args.llama_bench or args.llama_server or args.throughput:
        work = make_workload(args.num_prompts, args.input_len, args.output_len,
                             engine.model_config.vocab_size, args.seed)
        print(f"workload: {args.num_prompts} prompts, input {args.input_len}, output "
              f"{args.output_len}, {work.input_tokens} prompt + {work.output_tokens} output "
              "tokens")
        results.append(run_tokenmill(llm, work))
        print(f"tokenmill: {results[0].output_tps:.1f} output tok/s")
        if args.llama_server:
            results.append(run_llama_server_row(args, work))  # tokenmill's engine sits idle
            print(f"{results[-1].name}: {results[-1].output_tps:.1f} output tok/s")
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
            json.dump({
                "throughput": [asdict(r) | {"output_tps": r.output_tps, "total_tps": r.total_tps}
                               for r in results],
                "llama_bench": [asdict(r) | {"ratio": r.ratio} for r in micro_rows],
            }, f, indent=2)
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
    p.add_argument("--result-json", default=None,
                   help="write {throughput: [rows], llama_bench: [rows]} as JSON")
    g = p.add_argument_group("llama.cpp peers (same GGUF)")
    g.add_argument("--llama-bench", default=None, metavar="PATH",
                   help="llama.cpp's llama-bench binary: run its pp/tg tests and tokenmill's "
                        "equivalents side by side (alone unless --throughput/--llama-server)")
    g.add_argument("-p", "--n-prompt", type=_count(0), default=512,
                   help="prompt tokens of the pp test (default 512; 0 skips it)")
    g.add_argument("-n", "--n-gen", type=_count(0), default=128,
                   help="generated tokens of the tg test (default 128; 0 skips it)")
    g.add_argument("-r", "--reps", type=_count(1), default=5,
                   help="repetitions of each pp/tg test; medians are compared (default 5)")
    g.add_argument("--throughput", action="store_true",
                   help="with --llama-bench: also run the throughput workload")
    g.add_argument("--llama-server", default=None, metavar="URL",
                   help="a running llama-server (e.g. http://127.0.0.1:8080): send it the "
                        "throughput workload and add its row to the table")
    g.add_argument("--llama-server-concurrency", type=_count(1), default=None,
                   help="most requests in flight to llama-server (default: all at once)")
    g.add_argument("--llama-server-timeout", type=float, default=3600.0,
                   help="seconds per llama-server request (default 3600)")
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=cmd_offline)
