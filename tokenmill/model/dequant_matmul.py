"""Many-row matmuls of quantized weights as float GEMMs on dequantized tiles.

The native int4/int8 kernels (:mod:`tokenmill.kernels.cpu`) are built for
decode: few input rows, where a step is bound by weight bytes and 4-bit codes
read 8x fewer of them. A prefill chunk has hundreds of rows and is bound by
arithmetic; there the integer dot products spend most of their instructions
unpacking and widening, and PyTorch's GEMM (oneDNN/MKL) is faster - by far in
bfloat16 on CPUs that have it in hardware. So for at least
:data:`DENSE_MIN_ROWS` rows (64 with a bfloat16 GEMM, 512 with float32) a
quantized linear layer dequantizes
its weight, a tile of rows at a time (at most :data:`TILE_BYTES` of float32),
and multiplies with PyTorch.

The weight is exact (``d * q + m`` rounded once, the values the integer
kernels multiply by) and the input stays float32: unlike the integer kernels,
this path does not round activations to 8 bits, as llama.cpp's BLAS path for
large batches does not either. So a prompt's logits differ from what the
integer kernels give by that rounding (a little more accurate, not less);
rounding the input here as well would not make the two paths agree, because
8-bit rounding turns the float summation-order differences of the layer
before into whole rounding steps.

On CPUs with bfloat16 dot products in hardware (AVX512_BF16, AMX-BF16; see
:mod:`tokenmill.kernels.cpu_features`) the GEMM runs in bfloat16 - input and
weight tile rounded to bfloat16, float32 accumulation and output - and in
float32 elsewhere, where bfloat16 is emulated and slower.

Layers on the panel kernels (weights in 16-column panels; int4 on AVX2 or AVX512-VNNI,
int8 on AVX512-VNNI; see
:class:`~tokenmill.model.quantization.Int4Linear`) spend their instructions on
multiply-adds at any row count and beat the dense path throughout on a CPU
without AMX, so they take it only on AMX CPUs (:data:`PANEL_DENSE_MIN_ROWS`), and only
where their AMX tiles cannot run (output size not a multiple of 32): from a few dozen rows
on, int4 and int8 panel layers there multiply on AMX tiles of their own
(``amx_min_rows`` of :class:`~tokenmill.model.quantization.Int4Linear` and ``Int8Linear``).

``TOKENMILL_DENSE_MIN_ROWS`` overrides the threshold (0 turns the dense path
off), ``TOKENMILL_DENSE_DTYPE`` (``float32``/``bfloat16``) the GEMM's type.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from tokenmill.kernels.cpu_features import cpu_flags, has_native_bf16

# Largest dequantized tile: bounds the scratch memory for big layers.
TILE_BYTES = 32 << 20

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def default_dense_dtype(native_bf16: bool | None = None) -> torch.dtype:
    """The GEMM type of the dense path: ``TOKENMILL_DENSE_DTYPE``, else bfloat16 where
    this CPU (``native_bf16`` overrides the detection) has it in hardware."""
    name = os.environ.get("TOKENMILL_DENSE_DTYPE", "")
    if name:
        if name not in _DTYPES:
            raise ValueError(f"TOKENMILL_DENSE_DTYPE={name!r}: choose float32 or bfloat16")
        return _DTYPES[name]
    native = has_native_bf16() if native_bf16 is None else native_bf16
    return torch.bfloat16 if native else torch.float32


DENSE_DTYPE = default_dense_dtype()

# Rows from which the dense path pays, per GEMM type (benchmarks/quantized_prefill.py on a
# Zen 5 EPYC, int4, SmolLM2 shapes: bfloat16 1.2x at 32 rows and 1.9x at 64, but a batch-32
# decode step with the 8-bit LM head dense was slower; float32 0.96x
# at 128 and 1.2x at 512; docs/performance.md).
_MIN_ROWS = {torch.bfloat16: 64, torch.float32: 512}
DENSE_MIN_ROWS = int(os.environ.get("TOKENMILL_DENSE_MIN_ROWS", _MIN_ROWS[DENSE_DTYPE]))
# The panel kernels (kernels/cpu/q4_matmul_panels.c, int8_matmul_panels.c) beat the dense
# path at every row count measured on a Zen 4 EPYC (benchmarks/quantized_prefill.py: dense
# 0.36x / 0.57x at 64 / 512 rows against a bfloat16 GEMM, 0.61x / 0.65x at 128 / 512 held
# to AVX2 against float32), so they have no threshold there. With AMX the bfloat16 GEMM
# catches up at about 256 rows (2-core Sapphire Rapids: int8 0.64x / 0.98x / 1.45x at
# 128 / 256 / 512 rows, int4 0.69x / 1.11x / 1.59x); panel layers there take AMX tiles
# of their own instead (amx_min_rows), faster than both.
_AMX_PANEL_DENSE_MIN_ROWS = 256
PANEL_DENSE_MIN_ROWS = int(os.environ.get(
    "TOKENMILL_DENSE_MIN_ROWS", _AMX_PANEL_DENSE_MIN_ROWS if "amx_bf16" in cpu_flags() else 0))

Dequantizer = Callable[[int, int], "torch.Tensor | None"]


def use_dense(rows: int, min_rows: int) -> bool:
    """Whether a matmul of ``rows`` input rows takes the dense path."""
    return min_rows > 0 and rows >= min_rows


def tiled_dense_matmul(
    x: torch.Tensor, out_features: int, dequantize: Dequantizer,
    bias: torch.Tensor | None = None, tile_bytes: int = TILE_BYTES,
    dtype: torch.dtype | None = None, row_multiple: int = 1,
) -> torch.Tensor | None:
    """``x @ W.T + bias`` with ``W``'s rows ``[start, stop)`` from ``dequantize(start, stop)``.

    ``x`` is float32 ``[M, K]``; the result is float32. ``dtype`` is the GEMM's
    type (default :data:`DENSE_DTYPE`; bfloat16 rounds ``x`` and each tile to
    bfloat16 and adds the bias in float32). Returns None, having done nothing,
    if ``dequantize`` returns None (kernel missing). Tiles start on multiples of
    ``row_multiple`` (a packed layout's panel height).
    """
    dtype = DENSE_DTYPE if dtype is None else dtype
    m, k = x.shape
    tile = max(1, tile_bytes // (4 * k) // row_multiple) * row_multiple
    xg = x.to(dtype)

    def product(weight: torch.Tensor, part: torch.Tensor | None) -> torch.Tensor:
        if dtype == torch.float32:
            return torch.nn.functional.linear(xg, weight, part)
        y = torch.nn.functional.linear(xg, weight.to(dtype)).float()
        return y if part is None else y + part.float()

    if tile >= out_features:
        weight = dequantize(0, out_features)
        return None if weight is None else product(weight, bias)
    out = torch.empty(m, out_features, dtype=torch.float32)
    for start in range(0, out_features, tile):
        stop = min(out_features, start + tile)
        weight = dequantize(start, stop)
        if weight is None:
            return None
        out[:, start:stop] = product(weight, None if bias is None else bias[start:stop])
    return out
