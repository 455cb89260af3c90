"""Mixture-of-experts feed-forward (Mixtral, Qwen3-MoE): a router and gated-MLP experts.

Routing: ``softmax(x @ router.T)`` in float32, the ``top_k`` largest, and
(``norm_topk_prob``, always for Mixtral) those weights renormalised to sum to
one. For Mixtral this equals a softmax over the top-k logits; Qwen3-MoE
checkpoints choose per config.

Experts are computed *grouped by expert*: the (token, choice) pairs are sorted
by expert id, each expert multiplies the block of rows routed to it as one
matmul (a weight matrix is read once per step, not once per token), and the
weighted rows are summed back into their tokens. The per-token loop
(``impl="per_token"``) is kept as the baseline the benchmark compares against.
On CUDA with Triton, :func:`tokenmill.kernels.fused_moe.fused_moe` runs both
grouped matmuls as single kernel launches over all experts.

Weights: ``w13`` ``[E, 2 * inter, hidden]`` (gate rows, then up rows) and
``w2`` ``[E, hidden, inter]``. Under tensor parallelism every rank holds every
expert with its slice of the intermediate units (see
:mod:`tokenmill.model.sharding`). ``quantize_experts`` swaps them for per-expert
int4/int8 linears (the router stays dense: it decides which experts run).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.distributed import TPGroup
from tokenmill.model.layers import gated_activation, use_fused_kernels
from tokenmill.model.sharding import ShardPlan

MOE_IMPLS = ("auto", "grouped", "per_token", "triton")


class MoEBlock(nn.Module):
    """Top-k routed experts, each a gated MLP; output all-reduced across TP ranks."""

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype,
        device: torch.device | str | None,
        shard: ShardPlan,
        tp: TPGroup,
    ) -> None:
        super().__init__()
        hidden, inter = config.hidden_size, shard.moe_intermediate_size
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.renormalize = config.norm_topk_prob
        self.hidden_size = hidden
        self.intermediate_size = inter
        self.act_name = config.hidden_act
        self.act = gated_activation(config.hidden_act)
        self.tp = tp
        # A plain parameter, not a Linear: quantization must leave the router alone.
        self.router_weight = nn.Parameter(
            torch.empty(self.num_experts, hidden, dtype=dtype, device=device),
            requires_grad=False)
        self.w13 = nn.Parameter(
            torch.empty(self.num_experts, 2 * inter, hidden, dtype=dtype, device=device),
            requires_grad=False)
        self.w2 = nn.Parameter(
            torch.empty(self.num_experts, hidden, inter, dtype=dtype, device=device),
            requires_grad=False)
        # Per-expert quantized (gate_up, down) linears once quantize_experts ran.
        self.quantized: nn.ModuleList | None = None
        self.impl = "auto"  # one of MOE_IMPLS; "auto": triton on CUDA, grouped elsewhere

    # ---------------------------------------------------------------- routing
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 weights ``[T, k]``, expert ids ``[T, k]``) for tokens ``x`` ``[T, hidden]``."""
        logits = F.linear(x, self.router_weight)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        impl = self.impl
        if impl == "auto":
            impl = "triton" if self.quantized is None and use_fused_kernels(x) else "grouped"
        if impl == "triton":
            from tokenmill.kernels.fused_moe import fused_moe

            out = fused_moe(x, self.w13, self.w2, weights, ids, self.act_name)
        elif impl == "per_token":
            out = self.forward_per_token(x, weights, ids)
        else:
            out = self.forward_grouped(x, weights, ids)
        return self.tp.all_reduce(out)

    # ---------------------------------------------------------------- experts
    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e``'s gated MLP on rows ``x`` ``[n, hidden]``."""
        if self.quantized is not None:
            gate_up, down = self.quantized[e]
            return down(self.act(gate_up(x)))
        return F.linear(self.act(F.linear(x, self.w13[e])), self.w2[e])

    def forward_grouped(self, x: torch.Tensor, weights: torch.Tensor,
                        ids: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert, one matmul per expert that has any; weighted sum back."""
        if x.shape[0] == 1:
            # One token: nothing to group, and the sort/scatter would cost more than it saves.
            return self.forward_per_token(x, weights, ids)
        k = self.top_k
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)  # stable: rows keep token order per expert
        token = order // k
        ends = torch.bincount(flat, minlength=self.num_experts).cumsum(0).tolist()
        rows = x.index_select(0, token)
        out_rows = torch.empty_like(rows)
        start = 0
        for e, end in enumerate(ends):
            if end > start:
                out_rows[start:end] = self.expert(e, rows[start:end])
            start = end
        out_rows = out_rows * weights.reshape(-1)[order].unsqueeze(1).to(out_rows.dtype)
        # Each token's contributions are added in expert order, as transformers does.
        return torch.zeros_like(x).index_add_(0, token, out_rows)

    def forward_per_token(self, x: torch.Tensor, weights: torch.Tensor,
                          ids: torch.Tensor) -> torch.Tensor:
        """Baseline: every token runs its k experts on its own (k matmul pairs per token)."""
        out = torch.zeros_like(x)
        chosen = ids.tolist()
        for t, experts in enumerate(chosen):
            row = x[t : t + 1]
            for j in sorted(range(self.top_k), key=lambda j: experts[j]):
                out[t] += (self.expert(experts[j], row)[0] * weights[t, j].to(x.dtype))
        return out

    # ----------------------------------------------------------- quantization
    def quantize_experts(self, make: Callable[[torch.Tensor], nn.Module]) -> int:
        """Replace the stacked expert weights by per-expert ``make(weight)`` linears.

        Returns how many matrices were quantized. Down projections whose input
        (this rank's intermediate width) is not a multiple of 32 keep their
        dense weights, like any such linear layer.
        """
        if self.quantized is not None:
            return 0
        if self.hidden_size % 32 or self.intermediate_size % 32:
            return 0
        pairs = [nn.ModuleList([make(self.w13.data[e]), make(self.w2.data[e])])
                 for e in range(self.num_experts)]
        self.quantized = nn.ModuleList(pairs)
        # Free the dense copies; the per-expert modules hold the weights now.
        del self.w13, self.w2
        self.register_parameter("w13", None)
        self.register_parameter("w2", None)
        return 2 * self.num_experts

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, top_k={self.top_k}, hidden={self.hidden_size}, "
                f"inter={self.intermediate_size}, renormalize={self.renormalize}, "
                f"quantized={self.quantized is not None}")
