"""KV-cache storage formats; the quantized one: 8-bit codes with a float32 scale per
token and KV head.

``--kv-cache-dtype``:

- ``auto``: K/V are stored in the model's dtype, ``[..., head_dim]``;
- ``float32`` / ``bfloat16`` / ``float16``: stored in that dtype whatever the model's
  (rounded to nearest even), ``[..., head_dim]``; attended in float32 when the model's
  dtype differs;
- ``int8``: symmetric int8 codes, ``x ~= code * scale`` with
  ``scale = max|x| / 127`` over the token's head (``head_dim`` values);
- ``fp8``: float8 e4m3 (``e4m3fn``: no infinities, largest finite 448) codes,
  ``x ~= fp8(code) * scale`` with ``scale = max|x| / 448``.

A quantized cache row (one token, one KV head) is ``head_dim`` code bytes
followed by the 4 bytes of its float32 scale, so the scale lives *inside the
block*: the cache tensor is ``[..., block_size, kv_heads, head_dim + 4]``, and
whatever moves a block (fork copies, offload tiers, the prefix cache keeping a
freed block) moves its scales with it. The tensor's dtype names the format:
``torch.int8`` is int8, ``torch.uint8`` holds fp8 e4m3 bit patterns (PyTorch's
float8 dtypes lack the CPU index ops the cache needs).

Why per token and head (not per block or per tensor): a token's K/V is written
once and never rewritten, so its scale is known when it is stored; a coarser
scale would have to grow as a block fills, re-quantizing earlier rows. 4
bytes per ``head_dim`` codes cost 6% at ``head_dim`` 64 (3.76x fewer bytes
than float32, 1.88x fewer than bf16).

This module is the reference (PyTorch) implementation of the format; the
native CPU kernel and the Triton kernels read the same bytes.
"""

from __future__ import annotations

import torch

from tokenmill.config import KV_CACHE_DTYPES

__all__ = ["KV_CACHE_DTYPES", "SCALE_BYTES", "cache_format", "check_kv_cache_dtype",
           "dequantize", "is_quantized", "quantize", "row_bytes", "row_width",
           "storage_dtype", "to_cache_rows", "to_model_rows"]
SCALE_BYTES = 4  # float32 scale after each row of codes
INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8 e4m3fn

# Storage dtype of each quantized format, and back.
_STORAGE = {"int8": torch.int8, "fp8": torch.uint8}
_FORMAT = {torch.int8: "int8", torch.uint8: "fp8"}
# Unquantized formats with a fixed dtype.
_FLOAT_STORAGE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_kv_cache_dtype(name: str) -> str:
    """Validate a ``--kv-cache-dtype`` value and return it."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; "
                         f"got {name!r}")
    return name


def storage_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """Element dtype of the cache tensor for ``kv_cache_dtype``."""
    check_kv_cache_dtype(kv_cache_dtype)
    if kv_cache_dtype == "auto":
        return model_dtype
    return _FLOAT_STORAGE.get(kv_cache_dtype) or _STORAGE[kv_cache_dtype]


def row_width(head_dim: int, kv_cache_dtype: str) -> int:
    """Elements in one cache row (one token, one KV head)."""
    return head_dim + SCALE_BYTES if kv_cache_dtype in _STORAGE else head_dim


def row_bytes(head_dim: int, kv_cache_dtype: str, model_dtype: torch.dtype) -> int:
    """Bytes of one cache row (one token, one KV head, K or V)."""
    elem = torch.empty((), dtype=storage_dtype(kv_cache_dtype, model_dtype)).element_size()
    return row_width(head_dim, kv_cache_dtype) * elem


def cache_format(cache: torch.Tensor) -> str:
    """``"int8"``, ``"fp8"`` or ``"auto"`` (unquantized, whatever its dtype) for a cache
    tensor."""
    return _FORMAT.get(cache.dtype, "auto")


def is_quantized(cache: torch.Tensor) -> bool:
    """Whether ``cache`` holds 8-bit codes with scales."""
    return cache.dtype in _FORMAT


def quantize(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Rows ``[..., head_dim]`` -> packed rows ``[..., head_dim + 4]`` of format ``fmt``.

    The scale covers the last dimension; an all-zero row gets scale 1.
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    top = INT8_MAX if fmt == "int8" else FP8_MAX
    scale = torch.where(amax > 0, amax / top, torch.ones_like(amax))
    y = xf / scale
    if fmt == "int8":
        codes = torch.round(y).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    elif fmt == "fp8":
        codes = y.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    else:
        raise ValueError(f"not a quantized KV format: {fmt!r}")
    scale_bytes = scale.contiguous().view(codes.dtype)  # 4 bytes, same element type
    return torch.cat([codes, scale_bytes], dim=-1)


def dequantize(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Packed rows ``[..., head_dim + 4]`` (int8 or uint8 = fp8) -> ``[..., head_dim]``."""
    fmt = cache_format(packed)
    head_dim = packed.shape[-1] - SCALE_BYTES
    codes = packed[..., :head_dim]
    scale = packed[..., head_dim:].contiguous().view(torch.float32)
    if fmt == "int8":
        values = codes.float()
    elif fmt == "fp8":
        values = codes.contiguous().view(torch.float8_e4m3fn).float()
    else:
        raise ValueError(f"not a quantized KV cache: dtype {packed.dtype}")
    return (values * scale).to(dtype)


def to_model_rows(cache_rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cache rows in the model's ``dtype``: dequantized if quantized, else cast."""
    if is_quantized(cache_rows):
        return dequantize(cache_rows, dtype)
    return cache_rows.to(dtype)


def to_cache_rows(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """New K/V rows ``[..., head_dim]`` in ``cache``'s storage format."""
    if is_quantized(cache):
        return quantize(x, cache_format(cache))
    return x.to(cache.dtype)
