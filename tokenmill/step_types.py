"""The plain data of one engine step, shared by the scheduler, runner and speculator.

A leaf module (no tokenmill imports), so the layers that produce and consume a
step (``engine``, ``runner``, ``spec``) depend on these types, not on each other:

- :class:`SchedulerOutput`: what to compute (the scheduler's decision);
- :class:`ModelOutput`: the logits the runner computed, with the rows each
  scheduled sequence owns;
- :class:`SampledTokens`: what sampling and verification made of them, handed
  back to ``Scheduler.update``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass
class ScheduledSeq:
    """One sequence's share of a step, in plain data for the model runner."""

    seq_id: str
    token_ids: list[int]  # the tokens to compute this step
    start_pos: int  # position of token_ids[0] (= tokens already computed)
    block_table: list[int]
    num_logits: int  # trailing positions of this chunk whose logits are needed
    num_draft_tokens: int = 0  # trailing token_ids that are speculative proposals


@dataclass
class SchedulerOutput:
    """One step: the sequences to compute and the KV blocks to copy first."""

    seqs: list[ScheduledSeq]
    num_batched_tokens: int
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) blocks
    preempted_ids: list[str] = field(default_factory=list)
    # (block id, content key): blocks to fill from the prefix cache's offload tiers
    # before the forward pass (staged by the engine's KV offload manager).
    kv_restores: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclass
class ModelOutput:
    """Float32 logits of one step; ``rows[i]`` are the rows of ``SchedulerOutput.seqs[i]``.

    Row ``j`` of a sequence's range holds the logits at position
    ``start_pos + len(token_ids) - num_logits + j`` (predicting the next token).
    """

    logits: torch.Tensor  # [N, V]
    rows: list[range]


@dataclass
class SampledTokens:
    """Tokens a scheduled sequence gained this step, in order.

    Without drafts: the one sampled token. With ``d`` drafts verified:
    ``num_accepted`` of them then the target's own token (``num_accepted + 1``
    tokens). ``Scheduler.update`` appends them until a stop condition hits.
    """

    token_ids: list[int]
    num_accepted: int = 0
