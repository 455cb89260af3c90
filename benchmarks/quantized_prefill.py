"""Quantized matmuls by input rows: the integer kernels, AMX tiles and float GEMM on
dequantized tiles.

    python benchmarks/quantized_prefill.py [--rows 8 16 32 64 128 512] [--num-threads 2]

For SmolLM2-135M's layer shapes (hidden 576, intermediate 1536) and each row
count, times one call of each linear layer kind with the native integer kernel,
with the AMX panel kernels (CPUs with AMX-BF16: ``amx_min_rows``) and
with the dense path (:mod:`tokenmill.model.dequant_matmul`), interleaved, best of
``--repeats``; prints ms per layer (the four matmuls of one decoder layer summed)
and each path's speed-up over the integer kernel. Picks where ``DENSE_MIN_ROWS``
and ``AMX_MIN_ROWS`` should sit on this CPU. Random weights: speed does not
depend on the values.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill.model.quantization import Int4Linear, Int8Linear  # noqa: E402

# (in, out) of qkv, o, gate_up and down in SmolLM2-135M (9 heads, 3 KV heads of 64)
SHAPES = ((576, 960), (576, 576), (576, 3072), (1536, 576))


def best_of(fn, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls of ``fn``, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _runner(layers: list[torch.nn.Module], inputs: list[torch.Tensor]):
    def run() -> None:
        for layer, x in zip(layers, inputs, strict=True):
            layer(x)

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 16, 32, 64, 128, 512])
    parser.add_argument("--quantization", nargs="+", default=["int4", "int8"])
    parser.add_argument("--num-threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    print(f"{'weights':<8}{'rows':>6}{'integer ms':>12}{'AMX ms':>9}{'dense ms':>10}"
          f"{'AMX speed-up':>14}{'dense speed-up':>16}")
    for quant in args.quantization:
        cls = Int4Linear if quant == "int4" else Int8Linear
        layers = [cls(torch.randn(n, k) * 0.05) for k, n in SHAPES]
        amx = all(layer.amx_min_rows for layer in layers)
        for rows in args.rows:
            inputs = [torch.randn(rows, k) for k, _ in SHAPES]
            times = {}
            modes = [("integer", 0, 0), ("dense", 1, 0)] + ([("amx", 0, 1)] if amx else [])
            for mode, dense_min_rows, amx_min_rows in modes:
                for layer in layers:
                    layer.dense_min_rows = dense_min_rows
                    layer.amx_min_rows = amx_min_rows

                run = _runner(layers, inputs)
                run()  # warm-up
                times[mode] = best_of(run, args.repeats)
            integer = times["integer"]
            amx_ms = f"{times['amx'] * 1e3:>9.2f}" if amx else f"{'-':>9}"
            amx_x = f"{integer / times['amx']:>13.2f}x" if amx else f"{'-':>14}"
            print(f"{quant:<8}{rows:>6}{integer * 1e3:>12.2f}{amx_ms}{times['dense'] * 1e3:>10.2f}"
                  f"{amx_x}{integer / times['dense']:>15.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
