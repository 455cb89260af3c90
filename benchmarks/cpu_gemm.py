"""Dense float32 linear layers by input rows: F.linear (MKL) vs oneDNN on prepacked weights.

    python benchmarks/cpu_gemm.py [--rows 1 2 4 8 16 32 64 128 512] [--num-threads 2]

For SmolLM2-135M's layer shapes (the four matmuls of one decoder layer summed,
and the tied LM head on its own) times ``F.linear`` and
:class:`tokenmill.model.prepacked.PrepackedLinear` interleaved, best of
``--repeats``, and prints ms and the ratio per row count. Random weights:
speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantized_prefill import best_of  # noqa: E402  (this directory is on sys.path)

from tokenmill.kernels.cpu_features import cpu_flags  # noqa: E402
from tokenmill.model.prepacked import PrepackedLinear  # noqa: E402

# (in, out) of qkv, o, gate_up and down in SmolLM2-135M (9 heads, 3 KV heads of 64)
LAYER_SHAPES = ((576, 960), (576, 576), (576, 3072), (1536, 576))
HEAD_SHAPE = (576, 49152)


def _cpu() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f
                          if ln.startswith("model name")), model)
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")
    return f"{model} ({' '.join(f for f in wanted if f in cpu_flags()) or 'no AVX2'})"


def _pair(shapes: tuple[tuple[int, int], ...], rows: int, repeats: int) -> tuple[float, float]:
    """(F.linear seconds, prepacked seconds) for one call of each shape, summed."""
    weights = [torch.randn(n, k) * 0.05 for k, n in shapes]
    packed = [PrepackedLinear(w) for w in weights]
    inputs = [torch.randn(rows, k) for k, _ in shapes]

    def aten() -> None:
        for w, x in zip(weights, inputs, strict=True):
            F.linear(x, w)

    def onednn() -> None:
        for layer, x in zip(packed, inputs, strict=True):
            layer(x)

    aten(), onednn()  # warm up (oneDNN builds its kernel per shape on first use)
    t_aten = t_onednn = float("inf")
    for _ in range(3):  # interleaved, so drifting machine load hits both alike
        t_aten = min(t_aten, best_of(aten, repeats))
        t_onednn = min(t_onednn, best_of(onednn, repeats))
    return t_aten, t_onednn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+",
                        default=[1, 2, 4, 8, 16, 32, 64, 128, 512])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--num-threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if not torch.backends.mkldnn.is_available():
        print("this PyTorch has no oneDNN: nothing to compare")
        return 1
    print(f"CPU: {_cpu()}; {torch.get_num_threads()} threads; torch {torch.__version__}")
    print("ms per call, best of interleaved runs; ratio = F.linear / prepacked (>1: oneDNN wins)")
    print(f"{'rows':>5} {'layer F.linear':>15} {'prepacked':>10} {'ratio':>6}   "
          f"{'LM head F.linear':>17} {'prepacked':>10} {'ratio':>6}")
    with torch.inference_mode():
        for rows in args.rows:
            la, lo = _pair(LAYER_SHAPES, rows, args.repeats)
            ha, ho = _pair((HEAD_SHAPE,), rows, max(2, args.repeats // 3))
            print(f"{rows:>5} {la * 1e3:>15.3f} {lo * 1e3:>10.3f} {la / lo:>5.2f}x   "
                  f"{ha * 1e3:>17.3f} {ho * 1e3:>10.3f} {ha / ho:>5.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
