"""SiLU-and-multiply for the gated MLP: ``silu(gate) * up`` from one [T, 2I] tensor."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.kernels.triton_utils import launcher

BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(out_ptr, x_ptr, stride_x, stride_o, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + offs, mask=mask, other=0.0).to(tl.float32)
    # Round silu(gate) to the model dtype before the product, as eager PyTorch does.
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate_up[..., :I]) * gate_up[..., I:]``; returns [..., I]."""
    width = gate_up.shape[-1]
    if width % 2:
        raise ValueError(f"last dimension must be even (gate then up), got {width}")
    inter = width // 2
    x2 = gate_up.reshape(-1, width)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], inter, dtype=gate_up.dtype, device=gate_up.device)
    if x2.shape[0]:
        grid = (x2.shape[0], triton.cdiv(inter, BLOCK))
        launcher(_silu_and_mul_kernel, gate_up.device)[grid](
            out, x2, x2.stride(0), out.stride(0), inter, BLOCK=BLOCK,
        )
    return out.view(*gate_up.shape[:-1], inter)
