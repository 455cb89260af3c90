"""RMSNorm and fused residual-add + RMSNorm in one pass over each row.

Memory-bound: reading the row once, keeping it in registers for the
statistics and the scaling, and writing the result once is the whole game.
Roundings follow the Hugging Face layer (see ``reference.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.kernels.triton_utils import launcher, next_power_of_2


@triton.jit
def _rms_norm_kernel(
    out_ptr, residual_out_ptr, x_ptr, residual_ptr, weight_ptr,
    stride_x, stride_r, stride_o, stride_ro,
    hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        # The sum is rounded to the model dtype, exactly as an eager add would be.
        summed = (x + r).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_ro + offs, summed, mask=mask)
        x = summed.to(tl.float32)
    mean_sq = tl.sum(x * x, axis=0) / hidden
    normed = (x * tl.rsqrt(mean_sq + eps)).to(out_ptr.dtype.element_ty)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = normed.to(tl.float32) * w
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def num_warps_for(block: int) -> int:
    """More warps for wider rows so each thread keeps a handful of elements."""
    return min(16, max(1, block // 512))


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
            eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {hidden}")
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if residual is None:
        r2 = res_out = x2  # unused placeholders
    else:
        r2 = _rows(residual)
        res_out = torch.empty_like(out)
    block = next_power_of_2(hidden)
    if x2.shape[0] == 0:
        return out.view(x.shape), (None if residual is None else res_out.view(x.shape))
    launcher(_rms_norm_kernel, x.device)[(x2.shape[0],)](
        out, res_out, x2, r2, weight,
        x2.stride(0), r2.stride(0), out.stride(0), res_out.stride(0),
        hidden, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block,
        num_warps=num_warps_for(block),
    )
    new_residual = None if residual is None else res_out.view(x.shape)
    return out.view(x.shape), new_residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of ``x`` [..., hidden]; returns a new tensor."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``new_residual = residual + x``; returns (RMSNorm(new_residual), new_residual)."""
    if residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    out, new_residual = _launch(x, residual, weight, eps)
    assert new_residual is not None
    return out, new_residual
