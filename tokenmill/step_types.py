"""The plain data of one engine step, shared by the scheduler, runner and speculator.

A leaf module (no tokenmill imports), so the layers that produce and consume a
step (``engine``, ``runner``, ``spec``) depend on these types, not on each other:

- :class:`SchedulerOutput`: what to compute (the scheduler's decision);
- :class:`ModelOutput`: the logits the runner computed, with the rows each
  scheduled sequence owns;
- :class:`SampledTokens`: what sampling and verification made of them, handed
  back to ``Scheduler.update``;
- :class:`TokenFill`: with async scheduling, where a step's placeholder tokens
  come from (the previous step's sampled tokens, still on the device).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# With async scheduling a step is planned before the previous step's sampled tokens
# reach the host: a decode then computes this stand-in, which the runner replaces on
# the device with the real token (see TokenFill).
PLACEHOLDER_TOKEN = -1


@dataclass
class ScheduledSeq:
    """One sequence's share of a step, in plain data for the model runner."""

    seq_id: str
    token_ids: list[int]  # the tokens to compute this step
    start_pos: int  # position of token_ids[0] (= tokens already computed)
    block_table: list[int]
    num_logits: int  # trailing positions of this chunk whose logits are needed
    num_draft_tokens: int = 0  # trailing token_ids that are speculative proposals
    # The chunk reaches the sequence's end, so a token is sampled after it (set by the
    # scheduler; read back by it to settle async-scheduling claims).
    samples: bool = False


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


@dataclass
class TokenFill:
    """Placeholder tokens of a step, filled on the device before the forward pass.

    Token row ``rows[i]`` of the step (counted over every scheduled token) gets
    ``source[source_rows[i]]``: the previous step's sampled token, which never
    went through the host. Each index is a ``range`` of consecutive rows (a
    slice) or an int64 tensor on the source's device.
    """

    rows: range | torch.Tensor
    source: torch.Tensor  # [S] int64 on the runner's device
    source_rows: range | torch.Tensor

    def apply_to(self, input_ids: torch.Tensor) -> None:
        """Write the source tokens over the placeholder rows of ``input_ids`` (no host sync)."""
        input_ids[_as_index(self.rows)] = self.source[_as_index(self.source_rows)]


def _as_index(rows: range | torch.Tensor) -> slice | torch.Tensor:
    return slice(rows.start, rows.stop) if isinstance(rows, range) else rows
