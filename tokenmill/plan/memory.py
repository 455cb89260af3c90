"""Memory plan: weights, KV-cache bytes per token, and how many tokens and sequences fit.

Sliding-window layers: tokenmill keeps every layer of a token in one KV block,
so a block is released only once it is outside *every* layer's window. For a
model whose layers all slide (Mistral 7B v0.1, Phi-3-mini-4k) a sequence then
holds at most the blocks its window spans, whatever its length, and the plan
counts that. Models that mix windowed and global layers (Gemma 3) keep every
block; ``window_limited_bytes_per_token`` says what per-layer pools would need.
"""

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
    kv_window: int | None = None  # every layer slides within this many tokens
    sliding_layers: int = 0  # layers with a sliding window (of num_hidden_layers)
    sliding_window: int | None = None

    @property
    def weights_fit(self) -> bool:
        return self.kv_budget_bytes > 0

    @property
    def full_sequence_fits(self) -> bool:
        """Whether one sequence of ``max_model_len`` tokens fits in the KV cache."""
        return self.max_seqs_at_max_model_len >= 1

    def blocks_for(self, tokens: int) -> int:
        """KV blocks one sequence of ``tokens`` tokens holds at most."""
        blocks = math.ceil(tokens / self.block_size)
        if self.kv_window is not None:
            blocks = min(blocks, window_blocks(self.kv_window, self.block_size))
        return blocks

    def max_concurrent_sequences(self, context: int) -> int:
        """Sequences of ``context`` tokens whose KV blocks fit at the same time."""
        if context < 1:
            raise ValueError("context must be positive")
        return self.kv_blocks // self.blocks_for(context)


def window_blocks(window: int, block_size: int) -> int:
    """Blocks a sliding window of ``window`` tokens can touch (it may start mid-block)."""
    return (window - 1) // block_size + 2


def plan_memory(inputs: PlanInputs) -> MemoryPlan:
    """Divide one GPU's memory: weights, a fixed reserve, and paged KV blocks."""
    cfg = inputs.config
    per_token = kv_bytes_per_token(cfg, inputs.kv_dtype_bytes, inputs.tp)
    usable = inputs.gpu.memory_bytes * inputs.gpu_memory_utilization
    weights_per_gpu = inputs.weights.per_gpu(inputs.tp)
    budget = usable - weights_per_gpu - inputs.reserve_bytes
    block_bytes = per_token * inputs.block_size
    blocks = max(0, math.floor(budget / block_bytes))
    blocks_per_full_seq = math.ceil(inputs.max_model_len / inputs.block_size)
    if cfg.kv_window is not None:
        blocks_per_full_seq = min(blocks_per_full_seq,
                                  window_blocks(cfg.kv_window, inputs.block_size))
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
        kv_bytes_per_sequence=per_token * min(inputs.max_model_len,
                                              blocks_per_full_seq * inputs.block_size),
        block_size=inputs.block_size,
        kv_blocks=blocks,
        kv_tokens=blocks * inputs.block_size,
        max_seqs_at_max_model_len=blocks // blocks_per_full_seq,
        kv_window=cfg.kv_window,
        sliding_layers=sum(cfg.layer_window(i) is not None for i in range(cfg.num_hidden_layers)),
        sliding_window=cfg.sliding_window,
    )


def window_limited_kv_bytes(cfg: ModelConfig, kv_dtype_bytes: float, context: int,
                            tp: int = 1) -> float:
    """KV bytes of one ``context``-token sequence if each layer kept only what it can
    attend to (per-layer pools); tokenmill's one pool keeps all of it unless every
    layer slides."""
    per_layer_token = kv_bytes_per_token(cfg, kv_dtype_bytes, tp) / cfg.num_hidden_layers
    return per_layer_token * sum(min(context, cfg.layer_window(i) or context)
                                 for i in range(cfg.num_hidden_layers))
