"""This machine's ceilings for the CPU decode step: memory bandwidth and GEMM peaks.

    python benchmarks/machine_limits.py [--num-threads 2] [--mib 256]

Prints read bandwidth (``sum`` over a buffer far larger than the caches), copy
bandwidth (read + write), and ``torch.mm`` throughput on 2048x2048 matrices in
float32 and bfloat16 (bfloat16 runs in hardware only on CPUs with AVX512_BF16 or
AMX; elsewhere it is emulated). docs/performance.md divides measured decode steps
by these: bytes read per token / read bandwidth at batch 1, FLOP/s / GEMM peak at
batch 32. Best of ``--repeats``; run it on a quiet machine, in the same sitting as
the step it is compared with.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantized_prefill import best_of  # noqa: E402  (this directory is on sys.path)

from tokenmill.kernels.cpu_features import cpu_flags, has_native_bf16  # noqa: E402


def _best(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm up: page faults, oneDNN kernel creation
    return best_of(fn, repeats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-threads", type=int, default=None)
    parser.add_argument("--mib", type=int, default=256, help="buffer size for bandwidth")
    parser.add_argument("--size", type=int, default=2048, help="matrix side for the GEMMs")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    flags = " ".join(f for f in wanted if f in cpu_flags()) or "no AVX2"
    print(f"{torch.get_num_threads()} threads; CPU flags: {flags}; torch {torch.__version__}")

    nbytes = args.mib << 20
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    read = _best(src.sum, args.repeats)
    copy = _best(lambda: dst.copy_(src), args.repeats)
    print(f"read bandwidth ({args.mib} MiB sum):       {nbytes / read / 2**30:7.1f} GiB/s")
    print(f"copy bandwidth (read + write, {args.mib} MiB): {2 * nbytes / copy / 2**30:7.1f} GiB/s")

    n = args.size
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        seconds = _best(lambda a=a, b=b: torch.mm(a, b), max(3, args.repeats // 2))
        note = "" if dtype == torch.float32 else (
            " (hardware)" if has_native_bf16() else " (emulated)")
        print(f"torch.mm {n}^3 {str(dtype).removeprefix('torch.'):>8}: "
              f"{2 * n**3 / seconds / 1e9:7.1f} GFLOP/s{note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
