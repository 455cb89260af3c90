"""Many-row matmuls of quantized weights as float GEMMs on dequantized tiles.

The native int4/int8 kernels (:mod:`tokenmill.kernels.cpu`) are built for
decode: few input rows, where a step is bound by weight bytes and 4-bit codes
read 8x fewer of them. A prefill chunk has hundreds of rows and is bound by
arithmetic; on AVX2 without VNNI the integer dot products spend most of their
instructions unpacking and widening, and PyTorch's float32 GEMM is faster. So
for at least :data:`DENSE_MIN_ROWS` rows a quantized linear layer dequantizes
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

``TOKENMILL_DENSE_MIN_ROWS`` overrides the threshold (0 turns the dense path
off).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

# Rows from which the dense path pays (measured; see docs/performance.md).
DENSE_MIN_ROWS = int(os.environ.get("TOKENMILL_DENSE_MIN_ROWS", "64"))
# Largest dequantized tile: bounds the scratch memory for big layers.
TILE_BYTES = 32 << 20

Dequantizer = Callable[[int, int], "torch.Tensor | None"]


def use_dense(rows: int, min_rows: int) -> bool:
    """Whether a matmul of ``rows`` input rows takes the dense path."""
    return min_rows > 0 and rows >= min_rows


def tiled_dense_matmul(
    x: torch.Tensor, out_features: int, dequantize: Dequantizer,
    bias: torch.Tensor | None = None, tile_bytes: int = TILE_BYTES,
) -> torch.Tensor | None:
    """``x @ W.T + bias`` with ``W``'s rows ``[start, stop)`` from ``dequantize(start, stop)``.

    ``x`` is float32 ``[M, K]`` (already rounded as the caller wants). Returns
    None, having done nothing, if ``dequantize`` returns None (kernel missing).
    """
    m, k = x.shape
    tile = max(1, tile_bytes // (4 * k))
    if tile >= out_features:
        weight = dequantize(0, out_features)
        if weight is None:
            return None
        return torch.nn.functional.linear(x, weight, bias)
    out = torch.empty(m, out_features, dtype=torch.float32)
    for start in range(0, out_features, tile):
        stop = min(out_features, start + tile)
        weight = dequantize(start, stop)
        if weight is None:
            return None
        part = None if bias is None else bias[start:stop]
        out[:, start:stop] = torch.nn.functional.linear(x, weight, part)
    return out
