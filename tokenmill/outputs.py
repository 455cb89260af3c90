"""Plain data that leaves the engine: generated text and tokens, timings, statistics.

A leaf module (no tokenmill imports): the sampler, the engine core, the output
processor, the offline API and the HTTP server all speak these types.

Streaming APIs (``LLMEngine.step``, ``EngineClient.generate``) hand out *deltas*:
each :class:`RequestOutput` carries only what is new since the previous one.
``LLM.generate`` returns whole results (the deltas merged with :func:`merge_outputs`).
"""

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
    """One of the ``n`` samples of a request.

    In a stream, ``text``, ``token_ids`` and ``logprobs`` hold what is new since
    the previous output of the request; in a whole result, everything so far.
    """

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it

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
    """A request's progress: a delta in a stream, or the whole result.

    ``outputs`` holds the samples that changed (a delta) or all of them (a
    whole result). ``prompt_logprobs`` likewise holds the new entries of a
    delta (entry 0, for the first prompt token, is None).
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    prompt_logprobs: list[TokenLogprob | None] | None = None
    metrics: RequestMetrics | None = None


def merge_outputs(whole: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """Fold a streamed ``delta`` into the accumulated ``whole`` result (in place)."""
    if whole is None:
        whole = RequestOutput(
            request_id=delta.request_id, prompt=delta.prompt,
            prompt_token_ids=delta.prompt_token_ids, outputs=[], finished=False,
        )
    by_index = {c.index: c for c in whole.outputs}
    for piece in delta.outputs:
        sample = by_index.get(piece.index)
        if sample is None:
            sample = CompletionOutput(
                index=piece.index, logprobs=[] if piece.logprobs is not None else None)
            by_index[piece.index] = sample
            whole.outputs.append(sample)
            whole.outputs.sort(key=lambda c: c.index)
        sample.text += piece.text
        sample.token_ids.extend(piece.token_ids)
        if piece.logprobs is not None:
            if sample.logprobs is None:
                sample.logprobs = []
            sample.logprobs.extend(piece.logprobs)
        sample.finish_reason = piece.finish_reason
        sample.stop_reason = piece.stop_reason
    if delta.prompt_logprobs is not None:
        if whole.prompt_logprobs is None:
            whole.prompt_logprobs = []
        whole.prompt_logprobs.extend(delta.prompt_logprobs)
    whole.finished = delta.finished
    whole.num_cached_tokens = delta.num_cached_tokens
    whole.metrics = delta.metrics or whole.metrics
    return whole


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
    # Structured outputs: grammars compiled (cache misses), compile-cache hits, failed
    # compilations, and the total seconds spent compiling.
    grammar_compiles_total: int = 0
    grammar_cache_hits_total: int = 0
    grammar_compile_errors_total: int = 0
    grammar_compile_seconds_total: float = 0.0
    # The device pool's size in tokens (blocks x block size): what --kv-cache-memory and
    # --kv-cache-dtype buy.
    kv_cache_capacity_tokens: int = 0
    # Prefix-cache offload tiers (zero without --kv-offload-*): blocks written, their
    # bytes, blocks dropped (writer queue full), blocks restored and their bytes, look-ups
    # that missed, seconds spent reading/verifying/copying restored blocks, prompt tokens
    # restored.
    kv_offload_stores_total: int = 0
    kv_offload_store_bytes_total: int = 0
    kv_offload_dropped_total: int = 0
    kv_offload_hits_total: int = 0
    kv_offload_hit_bytes_total: int = 0
    kv_offload_misses_total: int = 0
    kv_offload_restore_seconds_total: float = 0.0
    kv_offload_restored_tokens_total: int = 0

    @property
    def spec_acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens (0 when none were proposed)."""
        if not self.spec_draft_tokens_total:
            return 0.0
        return self.spec_accepted_tokens_total / self.spec_draft_tokens_total
