"""Dense linear layers by input rows: F.linear (MKL) vs oneDNN on prepacked weights, in
float32 and (where the CPU has bfloat16 in hardware) in bfloat16, tokenmill's own AMX
kernel where the CPU has AMX-BF16, its AVX512-BF16 kernel where it has that, and its
float32 panel kernel where it has AVX2.

    python benchmarks/cpu_gemm.py [--rows 1 2 4 8 16 32 64 128 512] [--num-threads 2]
                                  [--copies 30]

For SmolLM2-135M's layer shapes (the four matmuls of one decoder layer summed,
and the tied LM head on its own) times ``F.linear`` and
:class:`tokenmill.model.prepacked.PrepackedLinear` in float32, the prepacked
layer in bfloat16 (what ``--dtype auto`` ran on CPUs with AVX512_BF16/AMX before
the AMX kernel), :class:`tokenmill.model.prepacked.AmxLinear` (what it runs
where the CPU has AMX-BF16), :class:`tokenmill.model.prepacked.Bf16DotLinear` (what
it runs where the CPU has AVX512-BF16 without AMX) and
:class:`tokenmill.model.prepacked.F32PanelLinear`
(what float32 runs on AVX2 CPUs without AVX-512), interleaved, best of ``--repeats``,
and prints ms and the ratios per row count. Each timed call walks ``--copies`` copies of the layer
(a model's 30 layers by default), so the weights stream from memory as they do in
a decode step instead of sitting in the cache. Random weights: speed does not depend
on the values.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantized_prefill import best_of  # noqa: E402  (this directory is on sys.path)

from tokenmill.kernels.cpu import (  # noqa: E402
    amx_bf16_available,
    bf16_dot_available,
    f32_panel_available,
)
from tokenmill.kernels.cpu_features import cpu_flags, has_native_bf16  # noqa: E402
from tokenmill.model.prepacked import (  # noqa: E402
    AmxLinear,
    Bf16DotLinear,
    F32PanelLinear,
    PrepackedLinear,
)

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


def _times(shapes: tuple[tuple[int, int], ...], rows: int, repeats: int, bf16: bool,
           native: tuple[type, ...], panel: bool, copies: int) -> list[float]:
    """Seconds for one call of each shape, summed: F.linear, prepacked float32 and, with
    ``bf16``, prepacked bfloat16 (bfloat16 weights and inputs), then each of tokenmill's
    bfloat16 layer classes in ``native``, with ``panel`` the float32 panel kernel; each
    averaged over ``copies`` copies of the weights."""
    weights = [[torch.randn(n, k) * 0.05 for k, n in shapes] for _ in range(copies)]
    inputs = [torch.randn(rows, k) for k, _ in shapes]
    bf16_inputs = [x.bfloat16() for x in inputs]
    variants = [([[PrepackedLinear(w) for w in ws] for ws in weights], inputs)]
    if bf16:
        variants.append(([[PrepackedLinear(w.bfloat16()) for w in ws] for ws in weights],
                         bf16_inputs))
    for cls in native:
        variants.append(([[cls(w.bfloat16()) for w in ws] for ws in weights], bf16_inputs))
    if panel:
        variants.append(([[F32PanelLinear(w) for w in ws] for ws in weights], inputs))

    def aten() -> None:
        for ws in weights:
            for w, x in zip(ws, inputs, strict=True):
                F.linear(x, w)

    def packed(groups: list[list[torch.nn.Module]], xs: list[torch.Tensor]):
        def run() -> None:
            for group in groups:
                for layer, x in zip(group, xs, strict=True):
                    layer(x)
        return run

    runs = [aten, *(packed(groups, xs) for groups, xs in variants)]
    for run in runs:  # warm up (oneDNN builds its kernel per shape on first use)
        run()
    best = [float("inf")] * len(runs)
    for _ in range(3):  # interleaved, so drifting machine load hits all alike
        best = [min(b, best_of(run, repeats)) for b, run in zip(best, runs, strict=True)]
    return [b / copies for b in best]


def _cells(times: list[float], bf16: bool, native: tuple[type, ...], panel: bool) -> str:
    """ms of each variant and the ratios: F.linear / prepacked, prepacked / bfloat16,
    oneDNN bfloat16 / each native bfloat16 kernel, prepacked float32 / panel kernel."""
    cells = f"{times[0] * 1e3:>9.3f} {times[1] * 1e3:>9.3f} {times[0] / times[1]:>5.2f}x"
    i = 2
    if bf16:
        cells += f" {times[i] * 1e3:>9.3f} {times[1] / times[i]:>5.2f}x"
        i += 1
    for _ in native:
        cells += f" {times[i] * 1e3:>9.3f} {times[2] / times[i]:>5.2f}x"
        i += 1
    if panel:
        cells += f" {times[i] * 1e3:>9.3f} {times[1] / times[i]:>5.2f}x"
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+",
                        default=[1, 2, 4, 8, 16, 32, 64, 128, 512])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--num-threads", type=int, default=None)
    parser.add_argument("--bf16", action="store_true",
                        help="time the bfloat16 GEMM also where the CPU emulates bfloat16")
    parser.add_argument("--copies", type=int, default=30,
                        help="copies of the weights each timed call walks (1: cache-hot)")
    args = parser.parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if not torch.backends.mkldnn.is_available():
        print("this PyTorch has no oneDNN: nothing to compare")
        return 1
    bf16 = has_native_bf16() or args.bf16
    native = ((AmxLinear,) if amx_bf16_available() else ()) + (
        (Bf16DotLinear,) if bf16_dot_available() else ())
    panel = f32_panel_available()
    print(f"CPU: {_cpu()}; {torch.get_num_threads()} threads; torch {torch.__version__}")
    print("ms per call, best of interleaved runs; F.linear / f32 = how much oneDNN prepacking "
          "wins" + ("; f32 / bf16 = how much bfloat16 wins on top" if bf16
                    else " (no bfloat16 in hardware: --bf16 times it anyway)")
          + ("; bf16 / amx = tokenmill's AMX kernel against oneDNN's bfloat16"
             if AmxLinear in native else "")
          + ("; bf16 / dot = tokenmill's AVX512-BF16 kernel against oneDNN's bfloat16"
             if Bf16DotLinear in native else "")
          + ("; f32 / panel = tokenmill's float32 panel kernel against oneDNN's float32"
             if panel else ""))
    extra = f" {'bf16':>9} {'f32/bf16':>6}" if bf16 else ""
    extra += f" {'amx':>9} {'bf16/amx':>6}" if AmxLinear in native else ""
    extra += f" {'dot':>9} {'bf16/dot':>6}" if Bf16DotLinear in native else ""
    extra += f" {'panel':>9} {'f32/pnl':>6}" if panel else ""
    head = f"{'F.linear':>9} {'f32':>9} {'ratio':>6}{extra}"
    print(f"{'':>5} {'one decoder layer':^{len(head)}}   {'LM head':^{len(head)}}")
    print(f"{'rows':>5} {head}   {head}")
    with torch.inference_mode():
        for rows in args.rows:
            layer = _times(LAYER_SHAPES, rows, args.repeats, bf16, native, panel, args.copies)
            lm_head = _times((HEAD_SHAPE,), rows, max(2, args.repeats // 3), bf16, native,
                             panel, min(args.copies, 2))
            print(f"{rows:>5} {_cells(layer, bf16, native, panel)}   "
                  f"{_cells(lm_head, bf16, native, panel)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
