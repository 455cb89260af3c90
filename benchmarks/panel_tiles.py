"""The quantized panel kernels by input rows: vector instructions, AMX int8 tiles (the
same bits) and AMX bfloat16 tiles (other numbers).

    python benchmarks/panel_tiles.py [--rows 1 8 16 32 48 64 512] [--num-threads 2]

For 30 x SmolLM2-135M's four linear layers (int4 and int8 weights, 120 distinct
weights, so they come from memory as in a forward pass) and its 8-bit LM head, times one
pass with each kernel, interleaved, best of ``--repeats``, and prints milliseconds and
the int8 tiles' speed-up over the other two. Where ``TM_Q4P_TILES_MIN_ROWS``,
``TM_Q8V_TILES_MIN_ROWS`` (the C kernels) and ``AMX_MIN_ROWS`` (model/quantization.py)
should sit on this CPU. Needs a CPU with AMX; random weights (speed does not depend on
the values).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantized_prefill import SHAPES, best_of  # noqa: E402  (this script's folder)

from tokenmill.kernels import cpu  # noqa: E402

# (in, out) of SmolLM2-135M's LM head; its four layers' are quantized_prefill.SHAPES
HEAD_SHAPE = (576, 49152)


def _q4(k: int, n: int, g: torch.Generator) -> torch.Tensor:
    return cpu.pack_q4_panels(torch.randint(0, 16, (n, k), generator=g),
                              (torch.rand(n, k // 32, generator=g) * 0.01).half(),
                              (-torch.rand(n, k // 32, generator=g) * 0.05).half())


def _q8(k: int, n: int, g: torch.Generator) -> torch.Tensor:
    return cpu.pack_int8_panels(torch.randint(-127, 128, (n, k), generator=g),
                                torch.rand(n, k // 32, generator=g) * 0.01)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+",
                        default=[1, 4, 8, 16, 24, 32, 48, 64, 128, 512])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--num-threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if not (cpu.panel_tiles_available() and cpu.panels_amx_available()):
        print("this CPU (or build) has no AMX tiles: nothing to compare")
        return 1
    g = torch.Generator().manual_seed(0)
    sets = {
        "int4": ([(k, _q4(k, n, g)) for _ in range(args.layers) for k, n in SHAPES],
                 cpu.q4_matmul_panels, cpu.q4_matmul_panels_amx),
        "int8": ([(k, _q8(k, n, g)) for _ in range(args.layers) for k, n in SHAPES],
                 cpu.int8_matmul_panels, cpu.int8_matmul_panels_amx),
        "head": ([(HEAD_SHAPE[0], _q8(*HEAD_SHAPE, g))],
                 cpu.int8_matmul_panels, cpu.int8_matmul_panels_amx),
    }
    print(f"{'weights':<8}{'rows':>6}{'vector ms':>11}{'int8 tiles':>12}{'bf16 tiles':>12}"
          f"{'vs vector':>11}{'vs bf16':>9}")
    for name, (weights, panels, amx) in sets.items():
        for rows in args.rows:
            inputs = {k: torch.randn(rows, k, generator=g) for k, _ in weights}
            kernels = {"vector": partial(panels, tiles=False),
                       "tiles": partial(panels, tiles=True), "bf16": amx}
            times = dict.fromkeys(kernels, float("inf"))
            for _ in range(2):  # interleaved
                for key, kernel in kernels.items():
                    def run(kernel=kernel, weights=weights, inputs=inputs) -> None:
                        for k, packed in weights:
                            kernel(inputs[k], packed)

                    times[key] = min(times[key], best_of(run, args.repeats) * 1e3)
            print(f"{name:<8}{rows:>6}{times['vector']:>11.2f}{times['tiles']:>12.2f}"
                  f"{times['bf16']:>12.2f}{times['vector'] / times['tiles']:>10.2f}x"
                  f"{times['bf16'] / times['tiles']:>8.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
