"""Plain data that leaves the engine: per-request outputs and engine statistics."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """Log-probability of one generated (or prompt) token and the top alternatives."""

    token_id: int
    logprob: float
    rank: int  # 1 = most likely
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first


@dataclass
class CompletionOutput:
    """One of the ``n`` samples of a request, cumulative up to now."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it
    # What was added since the previous output of this request (for streaming).
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[TokenLogprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (time.time()) of a request's life."""

    arrival_time: float
    scheduled_time: float | None = None  # first time it got tokens in a step
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    """The state of one request after an engine step."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    prompt_logprobs: list[TokenLogprob | None] | None = None
    metrics: RequestMetrics | None = None
    error: str | None = None


@dataclass
class EngineStats:
    """A snapshot for metrics and health endpoints."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks in use, 0..1
    num_total_blocks: int
    num_free_blocks: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of which were found
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    steps_total: int
    # Speculative decoding (zero when off): drafts verified, drafts accepted, and
    # sequence-steps that verified drafts (accepted / verifications = mean
    # accepted drafts per step; each such step also adds one target token).
    spec_draft_tokens_total: int = 0
    spec_accepted_tokens_total: int = 0
    spec_verifications_total: int = 0

    @property
    def spec_acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens (0 when none were proposed)."""
        if not self.spec_draft_tokens_total:
            return 0.0
        return self.spec_accepted_tokens_total / self.spec_draft_tokens_total
