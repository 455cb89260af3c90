"""Fused kernels for the model's memory-bound steps, with a device dispatch.

Call these from model code; each picks the Triton kernel when its input lives
on a CUDA device and Triton is installed, and the plain-PyTorch reference
(``reference.py``) otherwise. Triton modules are imported lazily, so a
CPU-only install never needs Triton.

- ``rms_norm(x, weight, eps) -> out``
- ``fused_add_rms_norm(x, residual, weight, eps) -> (out, new_residual)``
- ``silu_and_mul(gate_up) -> out``  (gate_up = [..., 2 * intermediate], gate first)
- ``apply_rotary(q, k, cos, sin, positions) -> (q, k)``  (in place, rotate-half)

Pass ``use_triton=True``/``False`` to force a path (tests, benchmarks); forcing
Triton on CPU tensors needs ``TRITON_INTERPRET=1`` set before Triton's import.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from tokenmill.kernels import reference

__all__ = [
    "apply_rotary",
    "fused_add_rms_norm",
    "rms_norm",
    "silu_and_mul",
    "triton_available",
]


@functools.cache
def triton_available() -> bool:
    """Whether the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def _want_triton(x: torch.Tensor, use_triton: bool | None) -> bool:
    if use_triton is not None:
        return use_triton
    return x.is_cuda and triton_available()


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, use_triton: bool | None = None
) -> torch.Tensor:
    """RMSNorm over the last dimension: ``weight * x / sqrt(mean(x^2) + eps)``."""
    if _want_triton(x, use_triton):
        from tokenmill.kernels.rmsnorm import rms_norm as triton_rms_norm

        return triton_rms_norm(x, weight, eps)
    return reference.rms_norm_ref(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    use_triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``new_residual = residual + x``; returns ``(rms_norm(new_residual), new_residual)``.

    Inputs are not modified. This is the pre-norm decoder pattern: the layer's
    output is added to the residual stream and the sum is normalised for the
    next sub-layer, all in one pass.
    """
    if _want_triton(x, use_triton):
        from tokenmill.kernels.rmsnorm import fused_add_rms_norm as triton_fused

        return triton_fused(x, residual, weight, eps)
    return reference.fused_add_rms_norm_ref(x, residual, weight, eps)


def silu_and_mul(gate_up: torch.Tensor, use_triton: bool | None = None) -> torch.Tensor:
    """``silu(gate) * up`` where ``gate_up`` = [..., 2 * I] holds gate then up; returns [..., I]."""
    if _want_triton(gate_up, use_triton):
        from tokenmill.kernels.activation import silu_and_mul as triton_silu_and_mul

        return triton_silu_and_mul(gate_up)
    return reference.silu_and_mul_ref(gate_up)


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    use_triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE in place on ``q`` [T, Hq, D] and ``k`` [T, Hk, D]; returns (q, k).

    ``cos``/``sin``: [max_positions, D // 2] or HF-style [max_positions, D];
    ``positions``: [T] absolute token positions.
    """
    if _want_triton(q, use_triton):
        from tokenmill.kernels.rotary import apply_rotary as triton_apply_rotary

        return triton_apply_rotary(q, k, cos, sin, positions)
    return reference.rotary_ref(q, k, cos, sin, positions)
