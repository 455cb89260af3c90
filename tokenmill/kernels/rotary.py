"""Rotary position embedding (rotate-half convention) applied in place to q and k.

One program per token rotates all of its query and key heads, loading that
position's cos/sin row once. Roundings follow Hugging Face's eager
``q * cos + rotate_half(q) * sin`` in the model dtype (see ``reference.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.kernels.triton_utils import launcher, next_power_of_2


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, positions_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cos, stride_sin,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    dmask = offs < HALF
    dtype = q_ptr.dtype.element_ty
    # cos/sin are rounded to the model dtype first, as the reference does.
    c = tl.load(cos_ptr + pos * stride_cos + offs, mask=dmask, other=0.0)
    c = c.to(dtype).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + pos * stride_sin + offs, mask=dmask, other=0.0)
    s = s.to(dtype).to(tl.float32)[None, :]

    offs_qh = tl.arange(0, BLOCK_QH)
    q_mask = (offs_qh[:, None] < NUM_Q_HEADS) & dmask[None, :]
    q1_ptrs = q_ptr + token * stride_qt + offs_qh[:, None] * stride_qh + offs[None, :]
    q1 = tl.load(q1_ptrs, mask=q_mask, other=0.0).to(tl.float32)
    q2 = tl.load(q1_ptrs + HALF, mask=q_mask, other=0.0).to(tl.float32)
    # Each product is rounded on its own before the sum, like eager bf16/fp16 math.
    q_out1 = (q1 * c).to(dtype).to(tl.float32) - (q2 * s).to(dtype).to(tl.float32)
    q_out2 = (q2 * c).to(dtype).to(tl.float32) + (q1 * s).to(dtype).to(tl.float32)
    tl.store(q1_ptrs, q_out1.to(dtype), mask=q_mask)
    tl.store(q1_ptrs + HALF, q_out2.to(dtype), mask=q_mask)

    offs_kh = tl.arange(0, BLOCK_KH)
    k_mask = (offs_kh[:, None] < NUM_K_HEADS) & dmask[None, :]
    k1_ptrs = k_ptr + token * stride_kt + offs_kh[:, None] * stride_kh + offs[None, :]
    k1 = tl.load(k1_ptrs, mask=k_mask, other=0.0).to(tl.float32)
    k2 = tl.load(k1_ptrs + HALF, mask=k_mask, other=0.0).to(tl.float32)
    k_out1 = (k1 * c).to(dtype).to(tl.float32) - (k2 * s).to(dtype).to(tl.float32)
    k_out2 = (k2 * c).to(dtype).to(tl.float32) + (k1 * s).to(dtype).to(tl.float32)
    tl.store(k1_ptrs, k_out1.to(dtype), mask=k_mask)
    tl.store(k1_ptrs + HALF, k_out2.to(dtype), mask=k_mask)


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` [T, Hq, D] and ``k`` [T, Hk, D] in place; returns (q, k).

    ``cos``/``sin``: [max_positions, D // 2], or [max_positions, D] with equal
    halves (only the first half is read). ``positions``: [T] integer positions.
    ``q``/``k`` may be strided views (e.g. slices of a fused QKV output) as long
    as head_dim is contiguous.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    if head_dim % 2 or k.shape[2] != head_dim or k.shape[0] != num_tokens:
        raise ValueError(f"incompatible q {tuple(q.shape)} / k {tuple(k.shape)} for rotary")
    if q.dtype != k.dtype:
        raise ValueError("q and k must share a dtype")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("rotary works in place: q and k need a contiguous head_dim")
    half = head_dim // 2
    if cos.shape[-1] not in (half, head_dim) or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError(f"cos/sin last dimension must be {half} or {head_dim} and contiguous")
    if num_tokens == 0:
        return q, k
    launcher(_rotary_kernel, q.device)[(num_tokens,)](
        q, k, cos, sin, positions,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=num_k_heads, HALF=half,
        BLOCK_QH=next_power_of_2(num_q_heads), BLOCK_KH=next_power_of_2(num_k_heads),
        BLOCK_HALF=next_power_of_2(half),
    )
    return q, k
