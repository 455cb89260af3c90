"""Scheduling state of one generated sequence (one of a request's ``n`` samples).

Only scheduling state lives here: tokens, progress, queue attributes, the
token-level finish decision and speculative drafts. What the user sees (text,
logprobs, stream cursors) belongs to the output processor.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from tokenmill.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Tokens, progress and scheduling attributes of one sequence.

    ``token_ids`` holds the prompt followed by the generated tokens;
    ``num_computed_tokens`` of them have K/V in the cache. The scheduler's one
    rule is to give each sequence ``num_tokens - num_computed_tokens`` more
    tokens to compute, as the step's budget allows.
    """

    seq_id: str
    request_id: str
    index: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    arrival_time: float
    arrival_order: int
    priority: int = 0
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache (first schedule)
    num_preemptions: int = 0
    # Async scheduling: tokens that steps planned but not yet updated compute, and the
    # tokens they will sample (the scheduler's claims; 0 when steps run one at a time).
    inflight_tokens: int = 0
    inflight_samples: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    generator: torch.Generator | None = None
    # Speculative decoding: draft tokens proposed to follow token_ids (not part of
    # them until verified), and the proposal distributions q [len, V] they were
    # sampled from (None: deterministic proposals, i.e. one-hot q).
    spec_token_ids: list[int] = field(default_factory=list)
    spec_probs: torch.Tensor | None = None
    # Structured outputs: this sequence's grammar matcher (a SequenceGrammar), advanced
    # by the scheduler as it appends tokens; None for unconstrained requests.
    grammar: Any = None
    # Set by the scheduler's stop check: "stop" (EOS or a stop token id), "length",
    # or "abort"; stop_reason is the stop token id when one ended it.
    finish_reason: str | None = None
    stop_reason: int | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def sort_key(self, policy: str) -> tuple:
        """Queue order: smaller is served first."""
        if policy == "priority":
            return (self.priority, self.arrival_time, self.arrival_order)
        return (self.arrival_time, self.arrival_order)
