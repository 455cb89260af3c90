"""Triton kernel that stores the new tokens' K and V into their paged-cache slots."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.kernels.triton_utils import launcher, next_power_of_2


@triton.jit
def _kv_write_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kc_slot, stride_kc_head, stride_vc_slot, stride_vc_head,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
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
    k_dst = k_cache_ptr + safe_slot * stride_kc_slot + offs_h[:, None] * stride_kc_head
    v_dst = v_cache_ptr + safe_slot * stride_vc_slot + offs_h[:, None] * stride_vc_head
    tl.store(k_dst + offs_d[None, :], k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst + offs_d[None, :], v.to(v_cache_ptr.dtype.element_ty), mask=mask)


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
    skipped. Rows of ``k``/``v`` past ``len(slot_mapping)`` are ignored.
    """
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    _, _, num_kv_heads, head_dim = k_cache.shape
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
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=next_power_of_2(num_kv_heads), BLOCK_D=next_power_of_2(head_dim),
    )
