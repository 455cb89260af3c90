"""Plain-PyTorch versions of the fused kernels: the CPU path and the test oracle.

They follow Hugging Face's Llama/Qwen2 arithmetic step by step, including where
results are rounded to the model dtype, so that in bfloat16 the Triton kernels
(which mimic the same roundings) agree with them bit for bit or nearly so.
This module imports no Triton, so CPU-only installs can use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / rms(x))`` over the last dimension, statistics in float32."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * normed.to(x.dtype)).to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual + x`` (in the model dtype), then RMSNorm of it; returns (normed, new residual)."""
    new_residual = residual + x
    return rms_norm_ref(new_residual, weight, eps), new_residual


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up`` = [..., 2 * I] holding gate then up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE applied in place to ``q`` [T, Hq, D] and ``k`` [T, Hk, D].

    ``cos``/``sin``: [max_positions, D // 2] (one value per rotated pair) or
    [max_positions, D] with both halves equal (Hugging Face's layout).
    ``positions``: [T] absolute position of each token. Returns (q, k).
    """
    half = q.shape[-1] // 2
    c = cos[positions, :half].unsqueeze(1).to(q.dtype)
    s = sin[positions, :half].unsqueeze(1).to(q.dtype)
    for x in (q, k):
        x1, x2 = x[..., :half], x[..., half:]
        rotated = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
        x.copy_(rotated)
    return q, k
