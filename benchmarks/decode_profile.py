"""Where a decode step's time goes: linear layers, attention, LM head, sampling, the rest.

    python benchmarks/decode_profile.py [--batch-sizes 1 8 32] [--quantization none int4 int8]
                                        [--cpu-gemm onednn aten] [--kv-cache-dtype auto float16]

For each configuration and batch size it starts that many requests with
random 100-token prompts, runs them into steady decode, then times steps
twice: once plain (the step time reported) and once with timers around the
parts (the split; the timers themselves add a few percent). "other in forward"
is what is left of the model's forward pass (norms, rotary, residual adds,
embedding, Python and PyTorch dispatch); "engine" is the rest of the step
(scheduling, step inputs, detokenizing, stop checks). Runs the bundled
SmolLM2 model unless --model. ``--cpu-gemm onednn aten`` runs each
configuration twice, with the dense float32 layers on oneDNN prepacked weights
(the default) and on ``F.linear`` (``TOKENMILL_CPU_GEMM=aten``), side by side;
``--kv-cache-dtype auto float16`` likewise runs each with both caches.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill import LLM, SamplingParams  # noqa: E402


def _timed(store: dict[str, float], key: str, fn: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            store[key] += time.perf_counter() - t

    return wrapper


class _TimedCall:
    """Stands in for a callable object (the sampler) and times its calls."""

    def __init__(self, fn: Callable, store: dict[str, float], key: str) -> None:
        self._call = _timed(store, key, fn)
        self._fn = fn

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._fn, name)


def profile(llm: LLM, batch: int, steps: int, seed: int = 0) -> tuple[float, dict[str, float]]:
    """(seconds per step, seconds per step by part) for ``batch`` decoding sequences."""

    from tokenmill.model.layers import Linear

    try:
        from tokenmill.model.quantization import Int4Linear, Int8Linear

        linear_types: tuple[type, ...] = (Linear, Int4Linear, Int8Linear)
        from tokenmill.model.prepacked import PrepackedLinear

        linear_types += (PrepackedLinear,)
        from tokenmill.model.prepacked import AmxLinear, Bf16DotLinear

        linear_types += (AmxLinear, Bf16DotLinear)
    except ImportError:  # a checkout from before quantization (profiling a baseline)
        linear_types = (Linear,)

    eng = llm.engine
    rng = random.Random(seed)
    vocab = eng.model_config.vocab_size
    ids = []
    for i in range(batch):
        rid = f"profile-{seed}-{i}"
        eng.add_request(rid, [rng.randint(100, vocab - 1) for _ in range(100)],
                        SamplingParams(max_tokens=2 * steps + 20, temperature=0,
                                       ignore_eos=True))
        ids.append(rid)
    scheduler = eng.core.scheduler
    while any(s.num_output_tokens == 0 for s in scheduler.running + scheduler.waiting):
        eng.step()
    for _ in range(3):
        eng.step()
    t = time.perf_counter()
    for _ in range(steps):
        eng.step()
    plain = (time.perf_counter() - t) / steps

    parts: dict[str, float] = collections.defaultdict(float)
    model = eng.core.runner.model
    patched: list[tuple[object, str, object]] = []

    def patch(obj: object, name: str, key: str) -> None:
        patched.append((obj, name, obj.__dict__.get(name)))
        setattr(obj, name, _timed(parts, key, getattr(obj, name)))

    head = {id(model.lm_head), id(getattr(model, "tied_lm_head", None))}
    for module in model.modules():
        if isinstance(module, linear_types) and id(module) not in head:
            patch(module, "forward", "linear")
    backend = eng.core.runner.attn_backend
    patch(backend, "forward", "attention")
    if hasattr(backend, "forward_cached"):  # attention after the fused rotary + K/V write
        patch(backend, "forward_cached", "attention")
    patch(model, "compute_logits", "head")
    patch(model.model, "forward", "forward")
    sampler = eng.core.sampler
    eng.core.sampler = _TimedCall(sampler, parts, "sampling")
    t = time.perf_counter()
    for _ in range(steps):
        eng.step()
    total = (time.perf_counter() - t) / steps
    eng.core.sampler = sampler
    for obj, name, old in patched:
        if old is None:
            delattr(obj, name)
        else:
            setattr(obj, name, old)
    for rid in ids:
        eng.abort_request(rid)

    per = collections.defaultdict(float, {k: v / steps for k, v in parts.items()})
    split = {
        "linear layers": per["linear"],
        "attention": per["attention"],
        "LM head": per["head"],
        "other in forward": per["forward"] - per["linear"] - per["attention"],
        "sampling": per["sampling"],
        "engine": total - per["forward"] - per["head"] - per["sampling"],
    }
    return plain, split


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--quantization", nargs="+", default=["none", "int4", "int8"])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--num-threads", type=int, default=None)
    parser.add_argument("--cpu-gemm", nargs="+", default=[None],
                        choices=["auto", "native", "onednn", "aten"],
                        help="dense GEMM (TOKENMILL_CPU_GEMM); several = side by side")
    parser.add_argument("--kv-cache-dtype", nargs="+", default=["auto"],
                        help="KV-cache storage; several = side by side")
    args = parser.parse_args(argv)

    rows = []
    configs = [(q, g, kv) for q in args.quantization for g in args.cpu_gemm
               for kv in args.kv_cache_dtype]
    for quant, gemm, kv in configs:
        if gemm is not None:
            os.environ["TOKENMILL_CPU_GEMM"] = gemm  # read when the model loads
        label = quant if gemm is None else f"{quant}/{gemm}"
        if len(args.kv_cache_dtype) > 1 or kv != "auto":
            label += f" kv {kv}"
        extra = {"quantization": None if quant == "none" else quant}
        llm = LLM(args.model, dtype=args.dtype, num_threads=args.num_threads,
                  kv_cache_dtype=kv, **extra)
        for batch in args.batch_sizes:
            plain, split = profile(llm, batch, args.steps)
            rows.append((label, batch, plain, split))
            print(f"{label} batch {batch}: {plain * 1e3:.1f} ms/step", flush=True)
        del llm

    keys = list(rows[0][3])
    width = max(8, *(len(r[0]) + 1 for r in rows))
    header = f"{'weights':<{width}}{'batch':>6}{'ms/step':>9}{'tok/s':>8}  " + "  ".join(
        f"{k:>{max(8, len(k))}}" for k in keys)
    print()
    print("time per decode step, ms (split measured with timers around each part)")
    print(header)
    for quant, batch, plain, split in rows:
        cells = "  ".join(f"{split[k] * 1e3:>{max(8, len(k))}.2f}" for k in keys)
        print(f"{quant:<{width}}{batch:>6}{plain * 1e3:>9.1f}{batch / plain:>8.1f}  {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
