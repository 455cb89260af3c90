"""Prometheus metrics of the server (all names start with ``tokenmill_``).

Two sources feed one registry owned by the app (no global registry):

* per-request observations made by the serving code (latency histograms, lengths,
  finish reasons, HTTP status codes);
* the engine's own counters and gauges (running/waiting requests, KV-cache usage,
  prefix-cache queries and hits, preemptions, token totals, speculative-decoding
  drafts and acceptances, grammar compilations and compile-cache hits), read from
  ``engine.stats()`` each time ``/metrics`` is scraped, so they are never stale.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from tokenmill.outputs import EngineStats

LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0,
    320.0, 640.0,
)
TOKEN_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
    5.0, 10.0,
)
LENGTH_BUCKETS = tuple(float(2**i) for i in range(0, 17))  # 1 .. 65536 tokens

StatsSource = Callable[[], "EngineStats | None"]


class _EngineStatsCollector:
    """Turns one ``EngineStats`` snapshot into Prometheus families at scrape time."""

    def __init__(self, source: StatsSource) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        stats = self._source()
        gauges = {
            "tokenmill_num_requests_running": (
                "Requests the engine is running (prefilling or decoding).",
                stats.num_running if stats else 0),
            "tokenmill_num_requests_waiting": (
                "Requests waiting in the engine's queue.", stats.num_waiting if stats else 0),
            "tokenmill_kv_cache_usage_ratio": (
                "Fraction of KV-cache blocks in use, 0..1.", stats.kv_cache_usage if stats else 0),
            "tokenmill_kv_cache_capacity_tokens": (
                "Tokens the KV-cache pool holds (blocks x block size).",
                stats.kv_cache_capacity_tokens if stats else 0),
            "tokenmill_kv_cache_blocks": (
                "Total number of KV-cache blocks.", stats.num_total_blocks if stats else 0),
            "tokenmill_kv_cache_free_blocks": (
                "KV-cache blocks not held by any request (including cached prefixes).",
                stats.num_free_blocks if stats else 0),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=float(value))
        counters = {
            "tokenmill_prompt_tokens": (
                "Prompt tokens processed (prefilled or served from the prefix cache).",
                stats.prompt_tokens_total if stats else 0),
            "tokenmill_generation_tokens": (
                "Tokens generated.", stats.generation_tokens_total if stats else 0),
            "tokenmill_preemptions": (
                "Requests preempted to free KV-cache memory.",
                stats.num_preemptions if stats else 0),
            "tokenmill_prefix_cache_queries": (
                "Prompt tokens looked up in the prefix cache.",
                stats.prefix_cache_queries if stats else 0),
            "tokenmill_prefix_cache_hits": (
                "Prompt tokens found in the prefix cache.",
                stats.prefix_cache_hits if stats else 0),
            "tokenmill_engine_steps": ("Engine steps run.", stats.steps_total if stats else 0),
            "tokenmill_kv_offload_stores": (
                "KV blocks written to the prefix cache's offload tiers.",
                stats.kv_offload_stores_total if stats else 0),
            "tokenmill_kv_offload_store_bytes": (
                "Bytes of KV blocks written to the offload tiers.",
                stats.kv_offload_store_bytes_total if stats else 0),
            "tokenmill_kv_offload_dropped": (
                "KV blocks not offloaded because the writer's queue was full.",
                stats.kv_offload_dropped_total if stats else 0),
            "tokenmill_kv_offload_hits": (
                "KV blocks restored from the offload tiers.",
                stats.kv_offload_hits_total if stats else 0),
            "tokenmill_kv_offload_hit_bytes": (
                "Bytes of KV blocks restored from the offload tiers.",
                stats.kv_offload_hit_bytes_total if stats else 0),
            "tokenmill_kv_offload_misses": (
                "Offload-tier look-ups that found no valid block.",
                stats.kv_offload_misses_total if stats else 0),
            "tokenmill_kv_offload_restore_seconds": (
                "Seconds spent reading, verifying and copying restored KV blocks.",
                stats.kv_offload_restore_seconds_total if stats else 0),
            "tokenmill_kv_offload_restored_tokens": (
                "Prompt tokens restored from the offload tiers instead of computed.",
                stats.kv_offload_restored_tokens_total if stats else 0),
            "tokenmill_spec_decode_draft_tokens": (
                "Speculative draft tokens verified by the target model.",
                stats.spec_draft_tokens_total if stats else 0),
            "tokenmill_spec_decode_accepted_tokens": (
                "Speculative draft tokens accepted (acceptance rate = accepted / draft).",
                stats.spec_accepted_tokens_total if stats else 0),
            "tokenmill_spec_decode_verifications": (
                "Sequence-steps that verified draft tokens (accepted / verifications = "
                "mean accepted drafts per step).",
                stats.spec_verifications_total if stats else 0),
            "tokenmill_grammar_compiles": (
                "Structured-output grammars compiled (compile-cache misses).",
                stats.grammar_compiles_total if stats else 0),
            "tokenmill_grammar_cache_hits": (
                "Structured-output requests whose grammar came from the compile cache.",
                stats.grammar_cache_hits_total if stats else 0),
            "tokenmill_grammar_compile_errors": (
                "Grammar compilations that failed in the engine.",
                stats.grammar_compile_errors_total if stats else 0),
            "tokenmill_grammar_compile_seconds": (
                "Time spent compiling grammars (mean = this / tokenmill_grammar_compiles).",
                stats.grammar_compile_seconds_total if stats else 0),
        }
        for name, (doc, value) in counters.items():
            # CounterMetricFamily appends the _total suffix itself.
            yield CounterMetricFamily(name, doc, value=float(value))

    def describe(self) -> list[Metric]:
        return []  # collected lazily; nothing to describe up front


@dataclass
class RequestTiming:
    """Monotonic timestamps and counts of one engine request, for latency metrics."""

    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    last_token: float | None = None
    max_choice_tokens: int = 0  # tokens of the longest choice, for time per output token

    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival


class ServerMetrics:
    """All metrics the server exports, in a registry of its own."""

    def __init__(self, stats_source: StatsSource) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.time_to_first_token = Histogram(
            "tokenmill_time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "tokenmill_inter_token_latency_seconds",
            "Time between two consecutive outputs of a request that carry new tokens.",
            buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.time_per_output_token = Histogram(
            "tokenmill_time_per_output_token_seconds",
            "Per request: (last token time - first token time) / (output tokens - 1).",
            buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.e2e_latency = Histogram(
            "tokenmill_e2e_request_latency_seconds",
            "Time from a request's arrival to its last output.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram(
            "tokenmill_request_queue_time_seconds",
            "Time a request waited in the engine before it was first scheduled.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_length = Histogram(
            "tokenmill_request_prompt_tokens", "Prompt length of finished requests, in tokens.",
            buckets=LENGTH_BUCKETS, registry=r)
        self.generation_length = Histogram(
            "tokenmill_request_generation_tokens",
            "Generated tokens of finished requests (all choices), in tokens.",
            buckets=LENGTH_BUCKETS, registry=r)
        self.finished = Counter(
            "tokenmill_requests_finished",
            "Finished choices by finish reason (stop, length, abort, timeout, error).",
            ["finish_reason"], registry=r)
        self.http_responses = Counter(
            "tokenmill_http_requests",
            "HTTP requests by route and response status code.",
            ["route", "status"], registry=r)
        self.rate_limited = Counter(
            "tokenmill_rate_limited_requests",
            "Requests refused with 429, by the limit they hit.",
            ["limit"], registry=r)
        self.rejected = Counter(
            "tokenmill_rejected_requests",
            "Requests refused with 503, by reason (server_overloaded, server_draining, "
            "model_loading).",
            ["reason"], registry=r)
        self.in_flight = Gauge(
            "tokenmill_http_requests_in_flight",
            "Completion requests admitted and not yet answered.", registry=r)
        self.server_ready = Gauge(
            "tokenmill_server_ready", "1 when the server accepts requests, else 0.", registry=r)
        r.register(_EngineStatsCollector(stats_source))

    def observe_token_output(self, timing: RequestTiming, now: float) -> None:
        """Record a new output that carries tokens (time to first token or between tokens)."""
        if timing.first_token is None:
            timing.first_token = now
            self.time_to_first_token.observe(now - timing.arrival)
        elif timing.last_token is not None:
            self.inter_token_latency.observe(now - timing.last_token)
        timing.last_token = now

    def observe_finished(
        self,
        timing: RequestTiming,
        prompt_tokens: int,
        generation_tokens: int,
        finish_reasons: list[str],
        queue_time: float | None,
        now: float,
    ) -> None:
        """Record a finished engine request (one per prompt, covering its ``n`` choices)."""
        self.e2e_latency.observe(now - timing.arrival)
        if queue_time is not None and queue_time >= 0:
            self.queue_time.observe(queue_time)
        if (
            timing.first_token is not None
            and timing.last_token is not None
            and timing.max_choice_tokens > 1
        ):
            tpot = (timing.last_token - timing.first_token) / (timing.max_choice_tokens - 1)
            self.time_per_output_token.observe(tpot)
        self.prompt_length.observe(prompt_tokens)
        self.generation_length.observe(generation_tokens)
        for reason in finish_reasons:
            self.finished.labels(finish_reason=reason).inc()

    def count_http(self, route: str, status: int) -> None:
        self.http_responses.labels(route=route, status=str(status)).inc()

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
