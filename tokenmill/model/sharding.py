"""How a Llama-family model is split across tensor-parallel ranks (Megatron style).

- Q/K/V and gate/up are *column-parallel*: each rank computes its own heads and
  its own slice of the MLP's intermediate units, with no communication;
- o_proj and down_proj are *row-parallel*: each rank multiplies its slice of the
  input and the partial outputs are summed (one all-reduce each per layer);
- the embedding and the LM head are *vocabulary-parallel*: each rank holds
  ``ceil(vocab / tp)`` rows; lookups are masked and all-reduced, logits are
  gathered on rank 0 (the only rank that samples).

Query heads must divide evenly. KV heads divide evenly too, or, when there are
fewer KV heads than ranks, each rank keeps one (replicated: rank ``r`` holds KV
head ``r * num_kv_heads // tp``, the one its query heads use). Quantized layers
keep whole 32-wide groups: column-parallel shards split output rows, and a
row-parallel shard whose input width is not a multiple of 32 stays dense (as
any such layer does), so a shard is quantized exactly as the same rows of the
unsharded layer would be.

Mixture-of-experts layers shard the same way as a dense MLP: every rank holds
every expert, with its slice of each expert's intermediate units (column-parallel
gate/up, row-parallel down, one all-reduce per layer); the small router is
replicated so every rank picks the same experts. Splitting experts across ranks
instead (expert parallelism) would need an all-to-all exchange of tokens and
leaves ranks idle when routing is skewed; with the few ranks tokenmill runs
(CPU processes, one node of GPUs) the intermediate split keeps the work even.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.config import ModelConfig
from tokenmill.distributed import divisors, padded_shard, shard_range


@dataclass(frozen=True)
class ShardPlan:
    """Which heads, intermediate units and vocabulary rows one rank holds."""

    rank: int = 0
    world_size: int = 1
    num_heads: int = 0  # query heads on this rank
    q_head_start: int = 0
    num_kv_heads: int = 0  # KV heads on this rank
    kv_head_start: int = 0
    intermediate_size: int = 0
    intermediate_start: int = 0
    vocab_start: int = 0
    vocab_rows: int = 0  # real rows on this rank
    vocab_padded: int = 0  # rows every rank allocates
    moe_intermediate_size: int = 0  # each expert's units on this rank (MoE models)
    moe_intermediate_start: int = 0

    @property
    def sharded(self) -> bool:
        return self.world_size > 1


def shard_plan(config: ModelConfig, rank: int = 0, world_size: int = 1) -> ShardPlan:
    """The layout of ``rank``; ValueError naming the count that does not divide."""
    check_tensor_parallel(config, world_size)
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    q_start, q_local = shard_range(heads, rank, world_size)
    if kv >= world_size:
        kv_start, kv_local = shard_range(kv, rank, world_size)
    else:
        kv_start, kv_local = rank * kv // world_size, 1
    inter_start, inter_local = shard_range(config.intermediate_size, rank, world_size)
    vocab_start, vocab_rows, vocab_padded = padded_shard(config.vocab_size, rank, world_size)
    moe_start, moe_local = shard_range(config.moe_intermediate_size, rank, world_size)
    return ShardPlan(rank, world_size, q_local, q_start, kv_local, kv_start, inter_local,
                     inter_start, vocab_start, vocab_rows, vocab_padded, moe_local, moe_start)


def check_tensor_parallel(config: ModelConfig, tp: int) -> None:
    """Raise ValueError if ``config`` cannot be split ``tp`` ways, saying which sizes can."""
    if tp < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tp}")
    if tp == 1:
        return
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    arch = config.architecture
    valid = [d for d in divisors(heads) if _kv_fits(kv, d) and _mlp_fits(config, d)]
    hint = f"; sizes that work for this model: {', '.join(map(str, valid))}"
    if heads % tp:
        raise ValueError(f"{arch} has {heads} attention heads, which tensor_parallel_size {tp} "
                         f"does not divide{hint}")
    if not _kv_fits(kv, tp):
        raise ValueError(f"{arch} has {kv} key/value heads: tensor_parallel_size {tp} must "
                         f"divide them, or be a multiple of them (to replicate){hint}")
    if not _mlp_fits(config, tp):
        if config.is_moe and config.moe_intermediate_size % tp:
            what, size = "expert intermediate size", config.moe_intermediate_size
        else:
            what, size = "intermediate size", config.intermediate_size
        raise ValueError(f"{arch}'s {what} {size} is not divisible by "
                         f"tensor_parallel_size {tp}{hint}")


def _kv_fits(kv: int, tp: int) -> bool:
    return kv % tp == 0 if kv >= tp else tp % kv == 0


def _mlp_fits(config: ModelConfig, tp: int) -> bool:
    dense = not config.is_moe or bool(config.dense_layers)
    if dense and config.intermediate_size % tp:
        return False
    return not config.is_moe or config.moe_intermediate_size % tp == 0
