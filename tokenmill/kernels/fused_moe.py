"""Fused mixture-of-experts matmuls: every expert's grouped GEMM in one Triton launch.

A step's ``T`` tokens each choose ``top_k`` experts, giving ``T * top_k`` rows
(row ``r`` is token ``r // top_k``'s ``r % top_k``-th choice). The rows are
sorted by expert and each expert's run is padded to a multiple of ``BLOCK_M``
(:func:`align_rows_by_expert`, all on the device, no host sync), so every
program of the kernel owns one ``BLOCK_M x BLOCK_N`` output tile of a single
expert and streams that expert's weight tile through on-chip memory, the
gather of its input rows fused into the loads. Two launches make the MoE
layer: gate/up (``[rows, 2I]``), the gated activation, then down (``[rows, H]``)
with the routing weight applied in the epilogue; the ``top_k`` rows of a token
are finally summed.

The grid depends only on ``T``, ``top_k`` and the expert count (padding tiles
exit at once), so a decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.kernels.triton_utils import dot_precision, launcher, needs_fp32_compute


@triton.jit
def _moe_matmul_kernel(
    out_ptr, a_ptr, b_ptr, weights_ptr, sorted_rows_ptr, block_experts_ptr,
    num_rows, N, K,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_om, stride_on,
    TOP_K: tl.constexpr, ROWS_ARE_TOKENS: tl.constexpr, MUL_WEIGHTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_experts_ptr + pid_m)
    if expert < 0:
        return  # a padding tile past the last expert's rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.load(sorted_rows_ptr + offs_m)
    row_mask = rows < num_rows
    # Gate/up reads token rows (row // TOP_K); down reads the activation rows themselves.
    if ROWS_ARE_TOKENS:
        a_rows = rows // TOP_K
    else:
        a_rows = rows
    a_rows = tl.where(row_mask, a_rows, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    b_base = b_ptr + expert.to(tl.int64) * stride_be
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_base + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, b, input_precision=PRECISION, out_dtype=tl.float32)
    if MUL_WEIGHTS:
        w = tl.load(weights_ptr + rows, mask=row_mask, other=0.0)
        acc = acc * w[:, None]
    safe_rows = tl.where(row_mask, rows, 0).to(tl.int64)
    tl.store(out_ptr + safe_rows[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def align_rows_by_expert(
    ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows sorted by expert, each expert's run padded to a multiple of ``block_m``.

    ``ids`` ``[T, top_k]``. Returns ``sorted_rows`` (row indices; padding holds
    ``T * top_k``) and ``block_experts`` (the expert of each ``block_m`` tile,
    -1 for tiles past the end). Sizes are upper bounds known from ``T``,
    ``top_k`` and ``num_experts`` alone.
    """
    flat = ids.reshape(-1)
    num_rows = flat.numel()
    device = flat.device
    # scatter_add, not bincount: bincount sizes its output from the data (a host sync).
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(
        0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    padded_start = padded_end - padded
    start = counts.cumsum(0) - counts
    order = torch.argsort(flat, stable=True)
    sorted_experts = flat[order]
    rank_in_expert = torch.arange(num_rows, device=device) - start[sorted_experts]
    capacity = num_rows + num_experts * (block_m - 1)
    capacity = (capacity + block_m - 1) // block_m * block_m
    sorted_rows = torch.full((capacity,), num_rows, dtype=torch.int32, device=device)
    sorted_rows[padded_start[sorted_experts] + rank_in_expert] = order.to(torch.int32)
    tile_starts = torch.arange(0, capacity, block_m, device=device)
    block_experts = torch.searchsorted(padded_end, tile_starts, right=True)
    block_experts = torch.where(block_experts < num_experts, block_experts,
                                torch.full_like(block_experts, -1)).to(torch.int32)
    return sorted_rows, block_experts


def moe_matmul(
    out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, sorted_rows: torch.Tensor,
    block_experts: torch.Tensor, top_k: int, rows_are_tokens: bool,
    weights: torch.Tensor | None = None, block_m: int = 16,
) -> torch.Tensor:
    """``out[r] = a[row(r)] @ b[expert(r)].T (* weights[r])`` for every routed row ``r``.

    ``a``: ``[T, K]`` token rows (``rows_are_tokens``) or ``[T * top_k, K]``;
    ``b``: ``[E, N, K]``; ``out``: ``[T * top_k, N]``; ``weights``: float32
    ``[T * top_k]`` or None. ``sorted_rows``/``block_experts`` from
    :func:`align_rows_by_expert` with the same ``block_m``.
    """
    num_rows, n = out.shape
    k = a.shape[1]
    block_n = 64 if n >= 64 else max(16, triton.next_power_of_2(n))
    block_k = 64 if k >= 64 else max(16, triton.next_power_of_2(k))
    grid = (block_experts.numel(), triton.cdiv(n, block_n))
    launcher(_moe_matmul_kernel, a.device)[grid](
        out, a, b, weights if weights is not None else out, sorted_rows, block_experts,
        num_rows, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2),
        out.stride(0), out.stride(1),
        TOP_K=top_k, ROWS_ARE_TOKENS=rows_are_tokens, MUL_WEIGHTS=weights is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        UPCAST=needs_fp32_compute(a.device), PRECISION=dot_precision(a.dtype),
    )
    return out


def fused_moe(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
    ids: torch.Tensor, activation: str = "silu", block_m: int = 16,
) -> torch.Tensor:
    """The MoE layer's output ``[T, hidden]`` for tokens ``x`` routed to ``ids`` with
    ``weights`` (float32 ``[T, top_k]``); ``w13`` ``[E, 2I, H]`` (gate rows first),
    ``w2`` ``[E, H, I]``; ``activation`` "silu" or "gelu_pytorch_tanh"."""
    tokens, top_k = ids.shape
    num_experts, two_inter, hidden = w13.shape
    if tokens == 0:
        return torch.zeros_like(x)
    if x.stride(-1) != 1:
        x = x.contiguous()
    sorted_rows, block_experts = align_rows_by_expert(ids, num_experts, block_m)
    rows = tokens * top_k
    gate_up = torch.empty(rows, two_inter, dtype=x.dtype, device=x.device)
    moe_matmul(gate_up, x, w13, sorted_rows, block_experts, top_k, True, block_m=block_m)
    gate, up = gate_up.chunk(2, dim=-1)
    if activation == "gelu_pytorch_tanh":
        act = torch.nn.functional.gelu(gate, approximate="tanh") * up
    else:
        act = torch.nn.functional.silu(gate) * up
    down = torch.empty(rows, hidden, dtype=x.dtype, device=x.device)
    moe_matmul(down, act, w2, sorted_rows, block_experts, top_k, False,
               weights.reshape(-1).float().contiguous(), block_m=block_m)
    return down.view(tokens, top_k, hidden).sum(dim=1)
