"""Memory plan: weights, KV-cache bytes per token, and how many tokens and sequences fit."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tokenmill.config import ModelConfig
from tokenmill.plan.inputs import PlanInputs, kv_heads_per_gpu


def kv_bytes_per_token(cfg: ModelConfig, kv_dtype_bytes: float, tp: int = 1) -> float:
    """KV-cache bytes one token occupies on each GPU.

    2 (K and V) x layers x KV heads x head_dim x bytes per element. With GQA it
    is the KV heads that count; with tensor parallelism each GPU holds
    ``kv_heads_per_gpu`` of them.
    """
    return 2 * cfg.num_hidden_layers * kv_heads_per_gpu(cfg, tp) * cfg.head_dim * kv_dtype_bytes


@dataclass(frozen=True)
class MemoryPlan:
    """How one GPU's memory divides between weights, a reserve and the KV cache."""

    gpu_memory_bytes: int
    gpu_memory_utilization: float
    usable_bytes: float  # utilization x memory
    weight_bytes_total: float  # all GPUs together
    weight_bytes_per_gpu: float
    reserve_bytes: int
    kv_budget_bytes: float  # usable - weights - reserve; negative when weights do not fit
    kv_bytes_per_token: float  # per GPU
    max_model_len: int
    kv_bytes_per_sequence: float  # one max_model_len sequence, per GPU
    block_size: int
    kv_blocks: int
    kv_tokens: int  # kv_blocks x block_size
    max_seqs_at_max_model_len: int

    @property
    def weights_fit(self) -> bool:
        return self.kv_budget_bytes > 0

    @property
    def full_sequence_fits(self) -> bool:
        """Whether one sequence of ``max_model_len`` tokens fits in the KV cache."""
        return self.max_seqs_at_max_model_len >= 1

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def max_concurrent_sequences(self, context: int) -> int:
        """Sequences of ``context`` tokens whose KV blocks fit at the same time."""
        if context < 1:
            raise ValueError("context must be positive")
        return self.kv_blocks // self.blocks_for(context)


def plan_memory(inputs: PlanInputs) -> MemoryPlan:
    """Divide one GPU's memory: weights, a fixed reserve, and paged KV blocks."""
    per_token = kv_bytes_per_token(inputs.config, inputs.kv_dtype_bytes, inputs.tp)
    usable = inputs.gpu.memory_bytes * inputs.gpu_memory_utilization
    weights_per_gpu = inputs.weights.per_gpu(inputs.tp)
    budget = usable - weights_per_gpu - inputs.reserve_bytes
    block_bytes = per_token * inputs.block_size
    blocks = max(0, math.floor(budget / block_bytes))
    blocks_per_full_seq = math.ceil(inputs.max_model_len / inputs.block_size)
    return MemoryPlan(
        gpu_memory_bytes=inputs.gpu.memory_bytes,
        gpu_memory_utilization=inputs.gpu_memory_utilization,
        usable_bytes=usable,
        weight_bytes_total=inputs.weights.total,
        weight_bytes_per_gpu=weights_per_gpu,
        reserve_bytes=inputs.reserve_bytes,
        kv_budget_bytes=budget,
        kv_bytes_per_token=per_token,
        max_model_len=inputs.max_model_len,
        kv_bytes_per_sequence=per_token * inputs.max_model_len,
        block_size=inputs.block_size,
        kv_blocks=blocks,
        kv_tokens=blocks * inputs.block_size,
        max_seqs_at_max_model_len=blocks // blocks_per_full_seq,
    )
