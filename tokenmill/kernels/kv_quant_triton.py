"""Triton helpers for the quantized KV cache (format in :mod:`tokenmill.kernels.kv_quant`).

Kernels take a ``KV_QUANT`` constexpr: 0 = K/V in the model's dtype, 1 = int8
codes, 2 = float8 e4m3 codes (stored as bytes). A quantized row is
``head_dim`` code bytes followed by a float32 scale; kernels reach the scales
through a float32 view of the same cache tensor (``scale_view``), whose
element offsets are the byte offsets / 4.

Encoding and decoding are written with integer and float arithmetic rather
than Triton's float8 casts: Triton's interpreter truncates where the GPU
rounds, and these helpers give the same bits as PyTorch's round-to-nearest-even
``.to(torch.float8_e4m3fn)`` (and ``torch.round`` for int8) on both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.kernels.kv_quant import cache_format

KV_QUANT_CODES = {"auto": 0, "int8": 1, "fp8": 2}


def kv_quant_code(cache: torch.Tensor) -> int:
    """The ``KV_QUANT`` constexpr for a cache tensor."""
    return KV_QUANT_CODES[cache_format(cache)]


def scale_view(cache: torch.Tensor) -> torch.Tensor:
    """A float32 view of a quantized cache (the scales' pointer); the cache itself otherwise."""
    if kv_quant_code(cache) == 0:
        return cache
    return cache.view(torch.float32)


@triton.jit
def round_half_even(t):
    """Nearest integer (as float), ties to even: ``torch.round``'s rule."""
    f = tl.floor(t)
    r = t - f
    odd = (f.to(tl.int32) & 1) == 1
    return f + tl.where((r > 0.5) | ((r == 0.5) & odd), 1.0, 0.0)


@triton.jit
def encode_fp8_e4m3(y):
    """float32 in [-448, 448] -> e4m3fn bit patterns (uint8), round to nearest even."""
    a = tl.abs(y)
    bits = a.to(tl.int32, bitcast=True)
    # Normal range (a >= 2^-6): re-bias the exponent (127 -> 7), keep 3 mantissa bits.
    keep = bits >> 20
    rem = bits & 0xFFFFF
    up = (rem > 0x80000) | ((rem == 0x80000) & ((keep & 1) == 1))
    normal = keep - (120 << 3) + up.to(tl.int32)
    # Subnormal range: multiples of 2^-9 (a carry into code 8 is the smallest normal).
    sub = round_half_even(a * 512.0).to(tl.int32)
    code = tl.where(a >= 0.015625, normal, sub)
    code = code | tl.where(y < 0, 128, 0)
    return code.to(tl.uint8)


@triton.jit
def decode_codes(x, KV_QUANT: tl.constexpr):
    """Loaded codes -> float32 values before the row scale (int8 value, or fp8 value)."""
    if KV_QUANT == 2:
        # e4m3 -> fp16 bits: sign to bit 15, exponent+mantissa shifted into place; the
        # fp16 exponent bias (15) exceeds e4m3's (7) by 8, hence the factor 2^8.
        u = x.to(tl.int32) & 0xFF
        h = (((u & 0x7F) << 7) | ((u & 0x80) << 8)).to(tl.int16)
        return h.to(tl.float16, bitcast=True).to(tl.float32) * 256.0
    else:
        return x.to(tl.float32)


@triton.jit
def quantize_rows(x, KV_QUANT: tl.constexpr):
    """Rows ``x`` [R, D] (float32, padding zero) -> (codes [R, D], scales [R])."""
    amax = tl.max(tl.abs(x), axis=1)
    top = 127.0 if KV_QUANT == 1 else 448.0
    scale = tl.where(amax > 0, amax / top, 1.0)
    y = x / scale[:, None]
    if KV_QUANT == 1:
        codes = tl.minimum(tl.maximum(round_half_even(y), -127.0), 127.0).to(tl.int8)
    else:
        codes = encode_fp8_e4m3(tl.minimum(tl.maximum(y, -448.0), 448.0))
    return codes, scale


def check_quantized_cache(cache: torch.Tensor, head_dim: int) -> None:
    """Raise if a quantized cache's rows are not ``head_dim`` codes + a 4-byte scale."""
    if kv_quant_code(cache) and cache.shape[-1] != head_dim + 4:
        raise ValueError(f"quantized KV rows must be head_dim + 4 = {head_dim + 4} bytes, "
                         f"got {cache.shape[-1]}")
    if kv_quant_code(cache) and triton.cdiv(cache.stride(-2), 4) * 4 != cache.stride(-2):
        raise ValueError("quantized KV rows must be 4-byte aligned")
