"""Triton kernel that stores the new tokens' K and V into their paged-cache slots."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.kernels.kv_quant_triton import (
    check_quantized_cache,
    kv_quant_code,
    quantize_rows,
    scale_view,
)
from tokenmill.kernels.triton_utils import launcher, next_power_of_2


@triton.jit
def _kv_write_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kc_slot, stride_kc_head, stride_vc_slot, stride_vc_head,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, KV_QUANT: tl.constexpr,
):
    # One program per new token: copy its [kv_heads, head_dim] K and V rows.
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    # Padding tokens carry slot -1: no head is in range, so nothing is stored.
    # (A scalar-bool mask term would be simpler but trips Triton's interpreter.)
    heads_in_range = tl.where(slot >= 0, NUM_KV_HEADS, 0)
    mask = (offs_h[:, None] < heads_in_range) & (offs_d[None, :] < HEAD_DIM)
    safe_slot = tl.maximum(slot, 0)

    k = tl.load(k_ptr + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :],
                mask=mask, other=0.0)
    v = tl.load(v_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :],
                mask=mask, other=0.0)
    k_row = safe_slot * stride_kc_slot + offs_h * stride_kc_head
    v_row = safe_slot * stride_vc_slot + offs_h * stride_vc_head
    if KV_QUANT == 0:
        k_out = k.to(k_cache_ptr.dtype.element_ty)
        v_out = v.to(v_cache_ptr.dtype.element_ty)
    else:
        # Quantize each (token, head) row; its scale goes after its codes (byte offset
        # row + HEAD_DIM = float32 offset (row + HEAD_DIM) / 4 in the scale view).
        k_out, k_scale = quantize_rows(k.to(tl.float32), KV_QUANT)
        v_out, v_scale = quantize_rows(v.to(tl.float32), KV_QUANT)
        h_mask = offs_h < heads_in_range
        tl.store(k_scale_ptr + (k_row + HEAD_DIM) // 4, k_scale, mask=h_mask)
        tl.store(v_scale_ptr + (v_row + HEAD_DIM) // 4, v_scale, mask=h_mask)
    tl.store(k_cache_ptr + k_row[:, None] + offs_d[None, :], k_out, mask=mask)
    tl.store(v_cache_ptr + v_row[:, None] + offs_d[None, :], v_out, mask=mask)


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store ``k``/``v`` [T, kv_heads, head_dim] rows at ``slot_mapping`` [T'] (T' <= T).

    A slot is ``block_id * block_size + offset`` in the caches
    [num_blocks, block_size, kv_heads, head_dim]; slots < 0 are padding and are
    skipped. Rows of ``k``/``v`` past ``len(slot_mapping)`` are ignored. A
    quantized cache (int8, or uint8 = fp8) gets each row quantized with its scale
    (rows of ``head_dim + 4`` bytes; :mod:`tokenmill.kernels.kv_quant`).
    """
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    check_quantized_cache(k_cache, head_dim)
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("KV cache must be contiguous in head_dim")
    if k_cache.stride(0) != k_cache.shape[1] * k_cache.stride(1) or (
        v_cache.stride(0) != v_cache.shape[1] * v_cache.stride(1)
    ):
        raise ValueError("KV cache blocks must be laid out slot after slot")
    kernel = launcher(_kv_write_kernel, k.device)
    kernel[(num_tokens,)](
        k, v, k_cache, v_cache, scale_view(k_cache), scale_view(v_cache), slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=next_power_of_2(num_kv_heads), BLOCK_D=next_power_of_2(head_dim),
        KV_QUANT=kv_quant_code(k_cache),
    )
