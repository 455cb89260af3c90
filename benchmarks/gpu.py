"""GPU benchmark: decode speed against the memory roofline, offline throughput
against HF transformers, and greedy agreement with HF transformers.

One command, meant to finish in under ten minutes on one H100/H200, printing
its table last:

    python benchmarks/gpu.py                       # both shipped configs
    python benchmarks/gpu.py --models llama-3.1-8b --hf-seconds 150

Models are dummy-weight instances of real configurations
(``benchmarks/configs/<name>/config.json``), so nothing is downloaded.

1. Decode: for each batch size, that many random prompts are prefilled, then
   ``--decode-steps`` engine steps are timed; tokens/s = batch * steps / time.
   The roofline is the time to read, once per step, every weight the step
   needs plus the KV cache of the batch, at the device-to-device copy
   bandwidth measured at the start of the run.
2. Offline: the nano-vllm workload (256 prompts of random tokens, input and
   output lengths uniform in [100, 1024], ignore_eos), then HF transformers
   ``generate`` in static batches on the same GPU; its best batch size is the
   reference. HF is given ``--hf-seconds`` per model and is measured on the
   batches it completes (requests are i.i.d., so the rate is representative).
3. Agreement: a random HF model is saved and loaded by tokenmill; tokenmill's
   bf16 greedy tokens are fed to HF in float32 (teacher forcing) and each must
   lie in HF's top-k there: exact token equality is not expected in bf16.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import random
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402

from tokenmill.config import ModelConfig  # noqa: E402
from tokenmill.plan.weights import count_parameters  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_MODELS = ("qwen2.5-0.5b", "llama-3.1-8b")
TINY_CONFIG = {  # --smoke: exercises every code path on a CPU in seconds
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512,
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}


# --------------------------------------------------------------------- results
@dataclass
class DecodeResult:
    model: str
    batch: int
    ms_per_step: float
    tokens_per_s: float
    context: float  # mean tokens per sequence during the timed steps
    bytes_per_step: float
    roofline_ms: float

    @property
    def roofline_fraction(self) -> float:
        return self.roofline_ms / self.ms_per_step


@dataclass
class ThroughputResult:
    model: str
    engine: str
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


@dataclass
class AgreementResult:
    model: str
    prompts: int
    positions: int
    top1: int  # tokenmill's token is HF's argmax
    in_topk: int  # tokenmill's token is among HF's top-k
    k: int
    threshold: float

    @property
    def passed(self) -> bool:
        return self.in_topk >= self.threshold * self.positions


@dataclass
class Report:
    device: str = ""
    bandwidth: float = 0.0  # bytes/s
    decode: list[DecodeResult] = field(default_factory=list)
    offline: list[ThroughputResult] = field(default_factory=list)
    agreement: list[AgreementResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Deadline:
    """Wall-clock budget for the whole command; optional phases shrink to fit it."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


# ------------------------------------------------------------------- utilities
def resolve_device(name: str) -> torch.device:
    """``name`` as a device with an index: ``cuda`` becomes the current CUDA device.

    ``torch.cuda.set_device`` refuses a CUDA device without an index
    (ValueError), and ``--device cuda`` is the default.
    """
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure_copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s (each copy reads and writes ``nbytes``)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    sync(device)
    seconds = time.perf_counter() - t0
    del src, dst
    return 2 * nbytes * iters / seconds


def weight_bytes_per_step(cfg: ModelConfig, dtype_bytes: int) -> int:
    """Bytes of weights one decode step must read: every layer, final norm, LM head.

    The embedding table is only gathered row by row, so it counts once, as the
    LM head, whether or not the two are tied.
    """
    counts = count_parameters(cfg)
    gathered = 0 if cfg.tie_word_embeddings else counts.embedding
    return (counts.total - gathered) * dtype_bytes


def kv_bytes(cfg: ModelConfig, tokens: float, dtype_bytes: int) -> float:
    return tokens * cfg.kv_bytes_per_token_per_dtype_byte * dtype_bytes


def engine_kwargs(args: argparse.Namespace, **overrides: Any) -> dict[str, Any]:
    """LLM(...) keyword arguments, keeping only those this engine version accepts."""
    from tokenmill.engine.args import EngineArgs

    wanted: dict[str, Any] = dict(
        load_format="dummy", dtype=args.dtype, device=args.device,
        attention_backend=args.attention_backend, max_model_len=args.max_model_len,
        max_num_seqs=max(args.decode_batches + [256]), block_size=args.block_size,
        gpu_memory_utilization=args.gpu_memory_utilization, seed=args.seed,
    )
    if args.kv_cache_memory:
        wanted["kv_cache_memory"] = args.kv_cache_memory
    if args.enforce_eager:
        wanted["enforce_eager"] = True
    if args.async_scheduling is not None:
        wanted["async_scheduling"] = args.async_scheduling
    wanted.update(overrides)
    known = EngineArgs.field_names()
    dropped = sorted(k for k in wanted if k not in known)
    if dropped:
        print(f"note: this engine does not take {', '.join(dropped)}; ignored", flush=True)
    return {k: v for k, v in wanted.items() if k in known}


def random_prompts(rng: random.Random, count: int, length: tuple[int, int],
                   vocab: int) -> list[list[int]]:
    low = min(100, vocab - 1)  # keep clear of special tokens
    return [[rng.randint(low, vocab - 1) for _ in range(rng.randint(*length))]
            for _ in range(count)]


# ---------------------------------------------------------------------- decode
def measure_decode(llm: Any, name: str, cfg: ModelConfig, batch: int, args: argparse.Namespace,
                   bandwidth: float, dtype_bytes: int, device: torch.device) -> DecodeResult:
    """Prefill ``batch`` prompts, then time ``args.decode_steps`` pure decode steps."""
    from tokenmill.sampling import SamplingParams

    engine = llm.engine
    rng = random.Random(args.seed + batch)
    warmup = 3
    params = SamplingParams(max_tokens=warmup + args.decode_steps + 8, temperature=0.0,
                            ignore_eos=True)
    prompts = random_prompts(rng, batch, (args.decode_context, args.decode_context),
                             cfg.vocab_size)
    ids = [f"decode-{name}-{batch}-{i}" for i in range(batch)]
    for rid, prompt in zip(ids, prompts, strict=True):
        engine.add_request(rid, prompt, params)
    generated = dict.fromkeys(ids, 0)
    try:
        # Step until every request is decoding, plus a few warm-up decode steps.
        while min(generated.values()) < warmup:
            for out in engine.step():
                generated[out.request_id] += sum(len(c.token_ids) for c in out.outputs)
        before = sum(generated.values())
        sync(device)
        t0 = time.perf_counter()
        for _ in range(args.decode_steps):
            for out in engine.step():
                generated[out.request_id] += sum(len(c.token_ids) for c in out.outputs)
        sync(device)
        seconds = time.perf_counter() - t0
    finally:
        for rid in ids:
            engine.abort_request(rid)
    produced = sum(generated.values()) - before
    if produced != batch * args.decode_steps:
        print(f"warning: batch {batch}: {produced} tokens in {args.decode_steps} steps "
              f"(expected {batch * args.decode_steps}); some requests were not running",
              flush=True)
    context = args.decode_context + warmup + args.decode_steps / 2
    step_bytes = weight_bytes_per_step(cfg, dtype_bytes) + kv_bytes(cfg, batch * context,
                                                                      dtype_bytes)
    ms = 1000 * seconds / args.decode_steps
    return DecodeResult(name, batch, ms, produced / seconds, context, step_bytes,
                        1000 * step_bytes / bandwidth)


# --------------------------------------------------------------------- offline
def run_tokenmill_offline(llm: Any, name: str, prompts: list[list[int]],
                          output_lens: list[int]) -> ThroughputResult:
    from tokenmill.sampling import SamplingParams

    llm.generate([prompts[0][:16]], SamplingParams(max_tokens=4, temperature=0.0),
                 use_tqdm=False)  # warm-up
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
              for n in output_lens]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    return ThroughputResult(name, "tokenmill", seconds, len(prompts),
                            sum(map(len, prompts)), produced)


def load_hf_random(config: dict, dtype: torch.dtype, device: torch.device, seed: int) -> Any:
    """A randomly initialised HF model built directly on ``device`` (fast even for 8B)."""
    import transformers

    hf_config = transformers.AutoConfig.for_model(**config)
    torch.manual_seed(seed)
    with torch.device(device):
        try:
            model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        except TypeError:  # transformers 4.x spells it torch_dtype
            model = transformers.AutoModelForCausalLM.from_config(hf_config, torch_dtype=dtype)
    return model.to(device=device, dtype=dtype).eval()


def run_hf_static(model: Any, name: str, prompts: list[list[int]], output_lens: list[int],
                  batch: int, device: torch.device, seconds_cap: float) -> ThroughputResult | None:
    """HF ``generate`` in static left-padded batches until ``seconds_cap`` runs out.

    Each batch runs to its longest requested output (that is what static
    batching costs); only the requested tokens count. A batch cannot be
    interrupted from outside, so each ``generate`` gets the time left as its
    ``max_time``: HF stops decoding once it is spent (after the step in
    flight), and that batch counts the tokens it produced for each request
    (only requests it finished count as requests). The phase therefore ends
    within about one prefill plus one decode step of ``seconds_cap``; the first
    batch starts even if the cap is already spent (so it produces at least one
    token). Returns None if not even one token was produced.
    """
    done_requests = useful = prompt_tokens = 0
    cut = False
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(prompts), batch):
            left = seconds_cap - (time.perf_counter() - t0)
            if left <= 0 and start > 0:
                break
            # The first batch always starts (a tiny cap still measures its first step):
            # HF stops it after the step in which max_time ran out.
            left = max(left, 1e-6)
            chunk, outs = prompts[start:start + batch], output_lens[start:start + batch]
            width = max(map(len, chunk))
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(chunk):
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            n = max(outs)
            generated = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=n,
                min_new_tokens=n, do_sample=False, pad_token_id=0, max_time=left)
            sync(device)
            steps = generated.shape[1] - width  # < n when max_time stopped the batch
            done_requests += sum(1 for o in outs if o <= steps)
            useful += sum(min(o, steps) for o in outs)
            prompt_tokens += sum(map(len, chunk))
            if steps < n:
                cut = True
                break
    seconds = time.perf_counter() - t0
    if not useful:
        return None
    note = "" if done_requests == len(prompts) else f"{done_requests}/{len(prompts)} requests"
    if cut:
        note += " (last batch cut by the time cap)"
    return ThroughputResult(name, f"hf generate, batch {batch}", seconds, done_requests,
                            prompt_tokens, useful, note)


def bench_hf(name: str, config: dict, prompts: list[list[int]], output_lens: list[int],
             args: argparse.Namespace, device: torch.device, deadline: Deadline,
             report: Report) -> None:
    dtype = getattr(torch, args.dtype)
    model = load_hf_random(config, dtype, device, args.seed)
    warm = torch.tensor([prompts[0][:8]], device=device)
    model.generate(input_ids=warm, max_new_tokens=2, do_sample=False, pad_token_id=0)
    allowance = min(args.hf_seconds, deadline.left() - args.reserve_seconds)
    t_start = time.perf_counter()
    for i, batch in enumerate(args.hf_batches):
        left = allowance - (time.perf_counter() - t_start)
        share = left / (len(args.hf_batches) - i)
        if share < 5:
            report.notes.append(f"{name}: HF batch {batch} skipped (time budget)")
            continue
        try:
            result = run_hf_static(model, name, prompts, output_lens, batch, device, share)
        except torch.cuda.OutOfMemoryError:
            report.notes.append(f"{name}: HF batch {batch} ran out of GPU memory")
            free_memory(device)
            continue
        if result is not None:
            report.offline.append(result)
            print(f"  {result.engine}: {result.output_tps:.0f} output tok/s "
                  f"({result.requests} requests)", flush=True)
    del model
    free_memory(device)


# ------------------------------------------------------------------- agreement
def check_agreement(name: str, config: dict, args: argparse.Namespace,
                    device: torch.device) -> AgreementResult:
    """tokenmill greedy (engine dtype) vs HF float32 teacher-forced top-k on the same weights."""
    from tokenmill.llm import LLM
    from tokenmill.sampling import SamplingParams

    hf = load_hf_random(config, torch.float32, device, args.seed)
    rng = random.Random(args.seed)
    prompts = random_prompts(rng, args.agreement_prompts, (16, 200), config["vocab_size"])
    with tempfile.TemporaryDirectory(prefix="tokenmill-agree-") as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        hf.to("cpu")  # make room for the engine; back on the GPU for scoring
        free_memory(device)
        # A few short prompts: a small explicit KV budget (sizing from the card's free
        # memory would build hundreds of thousands of block objects for nothing).
        kwargs = engine_kwargs(args, load_format="auto", max_num_seqs=len(prompts),
                               gpu_memory_utilization=min(0.5, args.gpu_memory_utilization),
                               kv_cache_memory=args.kv_cache_memory or "1GiB")
        llm = LLM(model=tmp, **kwargs)
        params = SamplingParams(max_tokens=args.agreement_tokens, temperature=0.0,
                                ignore_eos=True)
        outs = llm.generate(prompts, params, use_tqdm=False)
        del llm
        free_memory(device)
    hf.to(device)
    top1 = in_topk = positions = 0
    k = args.agreement_topk
    with torch.inference_mode():
        for prompt, out in zip(prompts, outs, strict=True):
            gen = list(out.outputs[0].token_ids)
            ids = torch.tensor([prompt + gen], device=device)
            logits = hf(input_ids=ids).logits[0, len(prompt) - 1: len(prompt) - 1 + len(gen)]
            top = logits.float().topk(k, dim=-1).indices
            target = torch.tensor(gen, device=device)
            top1 += int((top[:, 0] == target).sum())
            in_topk += int((top == target[:, None]).any(-1).sum())
            positions += len(gen)
    del hf
    free_memory(device)
    return AgreementResult(name, len(prompts), positions, top1, in_topk, k,
                           args.agreement_threshold)


# ----------------------------------------------------------------------- table
def format_report(report: Report, args: argparse.Namespace) -> str:
    lines = [
        "=" * 100,
        f"tokenmill GPU benchmark  {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"device: {report.device}; measured copy bandwidth {report.bandwidth / 1e12:.2f} TB/s",
        f"torch {torch.__version__}; python {platform.python_version()}; "
        f"dtype {args.dtype}; backend {args.attention_backend}",
        "command: python " + " ".join(shlex.quote(a) for a in sys.argv),
        "",
        f"Decode (context ~{args.decode_context} tokens per sequence; roofline = "
        "(weights + KV bytes per step) / copy bandwidth)",
        f"{'model':<16}{'batch':>6}{'ms/step':>10}{'tokens/s':>12}{'GB/step':>10}"
        f"{'roofline ms':>13}{'% roofline':>12}",
    ]
    for d in report.decode:
        lines.append(f"{d.model:<16}{d.batch:>6}{d.ms_per_step:>10.2f}{d.tokens_per_s:>12.0f}"
                     f"{d.bytes_per_step / 1e9:>10.2f}{d.roofline_ms:>13.2f}"
                     f"{100 * d.roofline_fraction:>11.1f}%")
    lines += ["", "Offline (nano-vllm workload: random prompts, ignore_eos)",
              f"{'model':<16}{'engine':<26}{'time s':>8}{'reqs':>6}{'out tok/s':>11}"
              f"{'total tok/s':>13}{'vs best HF':>12}  note"]
    for model in dict.fromkeys(r.model for r in report.offline):
        rows = [r for r in report.offline if r.model == model]
        hf = [r for r in rows if r.engine != "tokenmill"]
        best_hf = max((r.output_tps for r in hf), default=None)
        for r in rows:
            ratio = f"{r.output_tps / best_hf:>11.2f}x" if best_hf else f"{'-':>12}"
            lines.append(f"{r.model:<16}{r.engine:<26}{r.seconds:>8.1f}{r.requests:>6}"
                         f"{r.output_tps:>11.0f}{r.total_tps:>13.0f}{ratio}  {r.note}")
    lines += ["", "Greedy agreement (tokenmill greedy tokens scored by HF float32, "
                  "teacher-forced)",
              f"{'model':<16}{'prompts':>8}{'tokens':>8}{'top-1 %':>9}{'top-k %':>9}{'k':>3}"
              f"  verdict"]
    for a in report.agreement:
        lines.append(f"{a.model:<16}{a.prompts:>8}{a.positions:>8}"
                     f"{100 * a.top1 / max(a.positions, 1):>9.1f}"
                     f"{100 * a.in_topk / max(a.positions, 1):>9.1f}{a.k:>3}  "
                     f"{'PASS' if a.passed else 'FAIL'} (needs >= {100 * a.threshold:.0f}% "
                     f"in top-{a.k})")
    if report.notes:
        lines += ["", "Notes:"] + [f"- {n}" for n in report.notes]
    lines.append("=" * 100)
    return "\n".join(lines)


# ------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help=f"comma-separated config names under {CONFIG_DIR}")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--attention-backend", default="triton", choices=["triton", "torch"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--kv-cache-memory", default=None, help="explicit KV budget, e.g. 20GiB")
    p.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="plan each step while the previous one runs (engine default: on "
                        "for CUDA); --no-async-scheduling runs steps one at a time")
    p.add_argument("--decode-batches", default="1,8,64,256")
    p.add_argument("--decode-context", type=int, default=512, help="prompt tokens per sequence")
    p.add_argument("--decode-steps", type=int, default=64, help="timed decode steps per batch")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", default="100:1024", help="MIN:MAX prompt tokens")
    p.add_argument("--output-len", default="100:1024", help="MIN:MAX output tokens")
    p.add_argument("--hf-batches", default="64,128,256",
                   help="static batch sizes tried for HF transformers (best one counts)")
    p.add_argument("--hf-seconds", type=float, default=120,
                   help="time HF transformers gets per model, over all its batch sizes")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--agreement-model", default="qwen2.5-0.5b",
                   help="config used for the greedy check ('' to skip)")
    p.add_argument("--agreement-prompts", type=int, default=8)
    p.add_argument("--agreement-tokens", type=int, default=32)
    p.add_argument("--agreement-topk", type=int, default=5)
    p.add_argument("--agreement-threshold", type=float, default=0.99)
    p.add_argument("--budget-seconds", type=float, default=570,
                   help="wall-clock budget; HF phases shrink to keep within it")
    p.add_argument("--reserve-seconds", type=float, default=60,
                   help="time kept back from HF phases for the remaining work")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--smoke", action="store_true",
                   help="tiny random model and sizes, any device: checks the script itself")
    args = p.parse_args(argv)
    args.decode_batches = [int(b) for b in args.decode_batches.split(",") if b]
    args.hf_batches = [int(b) for b in args.hf_batches.split(",") if b]
    args.input_len = tuple(int(x) for x in args.input_len.split(":"))
    args.output_len = tuple(int(x) for x in args.output_len.split(":"))
    if args.smoke:
        args.models, args.agreement_model = "tiny", "tiny"
        args.decode_batches, args.decode_context, args.decode_steps = [1, 4], 16, 4
        args.num_prompts, args.input_len, args.output_len = 6, (8, 24), (4, 12)
        args.hf_batches, args.hf_seconds, args.max_model_len = [3], 30, 128
        args.agreement_prompts, args.agreement_tokens = 2, 6
        if not torch.cuda.is_available():
            args.device, args.dtype = "cpu", "float32"
            args.kv_cache_memory = args.kv_cache_memory or "64MiB"
            if os.environ.get("TRITON_INTERPRET") != "1":
                args.attention_backend = "torch"  # Triton on a CPU needs its interpreter
    return args


def model_config_dict(name: str, tmp: Path) -> tuple[dict, Path]:
    """(config dict, directory holding config.json) for a shipped config or the tiny one."""
    if name == "tiny":
        (tmp / "tiny").mkdir(exist_ok=True)
        (tmp / "tiny" / "config.json").write_text(json.dumps(TINY_CONFIG))
        return dict(TINY_CONFIG), tmp / "tiny"
    path = CONFIG_DIR / name
    if not (path / "config.json").is_file():
        known = sorted(p.name for p in CONFIG_DIR.iterdir() if (p / "config.json").is_file())
        raise SystemExit(f"unknown model config {name!r}; shipped: {', '.join(known)}")
    return json.loads((path / "config.json").read_text()), path


def bench_model(name: str, args: argparse.Namespace, device: torch.device, tmp: Path,
                deadline: Deadline, report: Report) -> None:
    from tokenmill.llm import LLM

    config, path = model_config_dict(name, tmp)
    cfg = ModelConfig.from_hf_dict(config, source=str(path))
    dtype_bytes = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    print(f"[{name}] loading dummy weights", flush=True)
    llm = LLM(model=str(path), **engine_kwargs(args))
    for batch in args.decode_batches:
        if deadline.left() < args.reserve_seconds:
            report.notes.append(f"{name}: decode batch {batch} skipped (time budget)")
            continue
        result = measure_decode(llm, name, cfg, batch, args, report.bandwidth, dtype_bytes,
                                device)
        report.decode.append(result)
        print(f"[{name}] decode batch {batch}: {result.tokens_per_s:.0f} tok/s, "
              f"{100 * result.roofline_fraction:.1f}% of roofline", flush=True)
    rng = random.Random(args.seed)
    prompts = random_prompts(rng, args.num_prompts, args.input_len, cfg.vocab_size)
    output_lens = [rng.randint(*args.output_len) for _ in prompts]
    if deadline.left() < args.reserve_seconds:
        report.notes.append(f"{name}: offline phase skipped (time budget)")
        del llm
        free_memory(device)
        return
    print(f"[{name}] offline: {len(prompts)} requests", flush=True)
    report.offline.append(run_tokenmill_offline(llm, name, prompts, output_lens))
    print(f"[{name}] tokenmill: {report.offline[-1].output_tps:.0f} output tok/s", flush=True)
    del llm
    free_memory(device)
    if not args.skip_hf:
        bench_hf(name, config, prompts, output_lens, args, device, deadline, report)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py needs an NVIDIA GPU: torch.cuda.is_available() is False "
              f"(torch {torch.__version__}). Run it on a CUDA machine, or use --smoke to "
              "check the script on a CPU.", file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    deadline = Deadline(args.budget_seconds)
    report = Report()
    report.device = (torch.cuda.get_device_name(device) if device.type == "cuda"
                     else f"CPU ({platform.processor() or platform.machine()})")
    report.bandwidth = measure_copy_bandwidth(device, (1 << 30) if device.type == "cuda"
                                              else (64 << 20))
    print(f"copy bandwidth: {report.bandwidth / 1e12:.2f} TB/s", flush=True)
    interrupted = False
    try:
        with tempfile.TemporaryDirectory(prefix="tokenmill-gpu-bench-") as tmp_name:
            tmp = Path(tmp_name)
            if args.agreement_model:
                config, _ = model_config_dict(args.agreement_model, tmp)
                print(f"[{args.agreement_model}] greedy agreement check", flush=True)
                report.agreement.append(check_agreement(args.agreement_model, config, args,
                                                        device))
            for name in [m for m in args.models.split(",") if m]:
                bench_model(name, args, device, tmp, deadline, report)
    except KeyboardInterrupt:  # e.g. `timeout --signal=INT`: still report what was measured
        interrupted = True
        report.notes.append("interrupted (SIGINT): the tables hold the phases that finished")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "device": report.device, "bandwidth_bytes_per_s": report.bandwidth,
            "decode": [vars(d) | {"roofline_fraction": d.roofline_fraction}
                       for d in report.decode],
            "offline": [vars(r) | {"output_tps": r.output_tps, "total_tps": r.total_tps}
                        for r in report.offline],
            "agreement": [vars(a) | {"passed": a.passed} for a in report.agreement],
            "notes": report.notes,
        }, indent=2))
    print(format_report(report, args), flush=True)
    if interrupted:
        return 130
    return 0 if all(a.passed for a in report.agreement) else 1


if __name__ == "__main__":
    raise SystemExit(main())
