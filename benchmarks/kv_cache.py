"""KV cache: quantized KV (capacity, decode step time) and the disk tier (restore vs recompute).

Three parts, each printing a table with ratios against a reference measured in
the same run (these machines are shared and noisy: compare ratios, not times):

- capacity: blocks and tokens the engine allocates for the same
  ``--kv-cache-memory`` with float32, bfloat16, int8 and fp8 KV (the engine's
  own sizing and allocation, on the real model);
- decode: median decode-step time at batch 32 (every sequence at ~``--context``
  tokens), float32 KV vs int8 vs fp8, on the native CPU kernel;
- tier: time to first token of a ``--prefix``-token prompt (plus a few new
  tokens) recomputed from scratch vs answered from ``--kv-offload-dir`` after
  the prefix was evicted from the pool, and again after a restart (a new engine
  on the same directory).

Quality (perplexity) is ``tokenmill eval ppl`` (see docs/kv-cache.md).

    python benchmarks/kv_cache.py                      # all parts, ~5-10 min on 2 CPU cores
    python benchmarks/kv_cache.py --parts tier --prefix 1000
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time

import torch

from tokenmill.config import CacheConfig
from tokenmill.llm import LLM
from tokenmill.runner.kv_cache import bytes_per_block, num_kv_blocks
from tokenmill.sampling import SamplingParams

KV_SETTINGS = [("float32", "auto"), ("bfloat16", "auto"), ("float32", "int8"),
               ("float32", "fp8")]


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def capacity(args: argparse.Namespace) -> str:
    """Tokens the engine's sizing gives each KV setting in the same memory."""
    llm = LLM(args.model, kv_cache_memory=args.kv_cache_memory, num_threads=args.threads)
    cfg = llm.engine.model_config
    budget = llm.engine.config.cache.kv_cache_memory
    rows, base, bf16 = [], None, None
    for dtype_name, kv in KV_SETTINGS:
        dtype = getattr(torch, dtype_name)
        cache = CacheConfig(kv_cache_memory=budget, kv_cache_dtype=kv)
        blocks = num_kv_blocks(cfg, cache, dtype, torch.device("cpu"))
        tokens = blocks * cache.block_size
        base = base or tokens
        if dtype_name == "bfloat16":
            bf16 = tokens
        per_token = bytes_per_block(cfg, 1, dtype, kv_cache_dtype=kv)
        rows.append([f"{kv if kv != 'auto' else dtype_name}", f"{per_token:,}", f"{tokens:,}",
                     f"{tokens / base:.2f}x", f"{tokens / bf16:.2f}x" if bf16 else "-"])
    del llm
    gc.collect()
    # The engine itself (not just the formula): int8 engine's gauge.
    llm = LLM(args.model, kv_cache_memory=args.kv_cache_memory, kv_cache_dtype="int8",
              num_threads=args.threads)
    gauge = llm.engine.stats().kv_cache_capacity_tokens
    del llm
    gc.collect()
    return (f"Capacity at --kv-cache-memory {args.kv_cache_memory} "
            f"(engine's int8 gauge: {gauge:,} tokens)\n"
            + _table(["KV", "bytes/token", "tokens", "vs float32", "vs bf16"], rows))


def _decode_step_times(llm: LLM, batch: int, context: int, steps: int) -> list[float]:
    """Seconds of each decode-only step with ``batch`` sequences of ~``context`` tokens."""
    core = llm.engine.core
    vocab = llm.engine.model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    # Long enough that every sequence is still decoding once the last prompt is in.
    params = SamplingParams(max_tokens=context, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        prompt = torch.randint(3, vocab, (context,), generator=g).tolist()
        llm.engine.add_request(f"d{i}", prompt, params)
    times = []
    while core.has_unfinished_requests() and len(times) <= steps:
        sched = core.schedule()
        t0 = time.perf_counter()
        core.execute(sched)
        dt = time.perf_counter() - t0
        if len(sched.seqs) == batch and all(len(s.token_ids) == 1 for s in sched.seqs):
            times.append(dt)
        core.pop_started()
    for i in range(batch):
        llm.engine.abort_request(f"d{i}")
    return times[1:]  # the first decode step warms caches


def decode(args: argparse.Namespace) -> str:
    rows, base = [], None
    for kv in ("auto", "int8", "fp8"):
        llm = LLM(args.model, kv_cache_dtype=kv, num_threads=args.threads,
                  max_num_seqs=args.batch, max_num_batched_tokens=2048)
        times = _decode_step_times(llm, args.batch, args.context, args.steps)
        med = statistics.median(times)
        base = base or med
        rows.append([kv if kv != "auto" else "float32", str(len(times)), f"{med * 1e3:.1f}",
                     f"{min(times) * 1e3:.1f}", f"{med / base:.2f}x"])
        del llm
        gc.collect()
    return (f"Decode step at batch {args.batch}, context ~{args.context} tokens "
            f"({args.threads or torch.get_num_threads()} threads)\n"
            + _table(["KV", "steps", "median ms", "min ms", "vs float32"], rows))


def _ttft(llm: LLM, prompt: list[int]) -> tuple[float, int]:
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    return time.perf_counter() - t0, out.num_cached_tokens


def _evict_pool(llm: LLM) -> None:
    assert llm.engine.core.block_manager.reset_prefix_cache()


def tier(args: argparse.Namespace) -> str:
    common = dict(num_threads=args.threads, kv_cache_dtype=args.kv_cache_dtype)
    plain = LLM(args.model, **common)
    vocab = plain.engine.model_config.vocab_size
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, vocab, (args.prefix,), generator=g).tolist()
    prompts = [prefix + torch.randint(3, vocab, (8,), generator=g).tolist()
               for _ in range(args.reps + 1)]
    warm = torch.randint(3, vocab, (24,), generator=g).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        _ttft(plain, prompts[0])  # warm-up
        recompute = []
        for p in prompts[1:]:
            _evict_pool(plain)
            recompute.append(_ttft(plain, p)[0])
        del plain
        gc.collect()

        tiered = LLM(args.model, kv_offload_dir=tmp, **common)
        _ttft(tiered, prompts[0])  # computes the prefix and writes it to disk
        tiered.engine.core.kv_offload.flush()
        restored, cached = [], []
        for p in prompts[1:]:
            _evict_pool(tiered)  # the prefix is gone from the pool: only the disk has it
            dt, n = _ttft(tiered, p)
            restored.append(dt)
            cached.append(n)
        stats = tiered.engine.stats()
        tiered.engine.shutdown()
        del tiered
        gc.collect()

        restarted = LLM(args.model, kv_offload_dir=tmp, **common)  # a new server, same dir
        _ttft(restarted, warm)  # first-call overheads, not the tier's
        after_restart, cached_restart = [], []
        for p in prompts[1:]:
            _evict_pool(restarted)
            dt, n = _ttft(restarted, p)
            after_restart.append(dt)
            cached_restart.append(n)
        restarted.engine.shutdown()
    base = statistics.median(recompute)
    rows = [
        ["recompute (pool miss, no tier)", f"{base * 1e3:.0f}", "0", "1.00x"],
        ["disk tier", f"{statistics.median(restored) * 1e3:.0f}", str(min(cached)),
         f"{statistics.median(restored) / base:.2f}x"],
        ["disk tier after restart", f"{statistics.median(after_restart) * 1e3:.0f}",
         str(min(cached_restart)), f"{statistics.median(after_restart) / base:.2f}x"],
    ]
    return (f"Time to first token, {args.prefix}-token prefix + 8 new tokens, KV "
            f"{args.kv_cache_dtype}, median of {args.reps} (disk tier: "
            f"{stats.kv_offload_hits_total} blocks restored, "
            f"{stats.kv_offload_hit_bytes_total / 2**20:.1f} MiB)\n"
            + _table(["path", "median ms", "cached tokens", "vs recompute"], rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M GGUF")
    p.add_argument("--parts", default="capacity,decode,tier")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--kv-cache-memory", default="1GiB")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--prefix", type=int, default=1000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--kv-cache-dtype", default="auto", help="KV setting of the tier part")
    args = p.parse_args()
    parts = {"capacity": capacity, "decode": decode, "tier": tier}
    tables = []
    for name in args.parts.split(","):
        tables.append(parts[name](args))
        print(tables[-1] + "\n", flush=True)
    print("=" * 60)
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
