"""Serving metrics from per-request timelines.

Definitions (all per successful request, times from the client's clock):

* TTFT — time to first token: from sending the request to the first chunk with text.
* ITL — inter-token latency: the gaps between consecutive chunks with text.
* TPOT — time per output token after the first: ``(e2e - ttft) / (output_tokens - 1)``,
  defined only when a request produced at least two tokens.
* E2E — end-to-end latency: from sending the request to the end of its stream.

Throughputs divide totals over successful requests by the run's duration (from the
first send to the last response). Goodput counts only the requests that met every
given SLO. Failed requests are counted by error kind and never enter latency figures.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise

import numpy as np

from tokenmill.bench.client import RequestRecord, error_key

PERCENTILES = (50.0, 90.0, 99.0)


@dataclass
class LatencyStats:
    """Summary of one latency distribution, in milliseconds."""

    count: int = 0
    mean: float | None = None
    median: float | None = None
    p90: float | None = None
    p99: float | None = None
    max: float | None = None
    min: float | None = None
    std: float | None = None

    @classmethod
    def of_seconds(cls, values: Sequence[float]) -> LatencyStats:
        """Statistics of ``values`` (seconds), reported in milliseconds.

        Percentiles interpolate linearly between order statistics (numpy's default).
        """
        if len(values) == 0:
            return cls()
        ms = np.asarray(values, dtype=float) * 1000.0
        p50, p90, p99 = np.percentile(ms, PERCENTILES)
        return cls(count=int(ms.size), mean=float(ms.mean()), median=float(p50),
                   p90=float(p90), p99=float(p99), max=float(ms.max()), min=float(ms.min()),
                   std=float(ms.std()))


@dataclass(frozen=True)
class SLO:
    """Service-level objectives for goodput, in milliseconds; ``None`` = no limit."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2e_ms))

    def met_by(self, record: RequestRecord) -> bool:
        """Whether a successful request met every objective that is set."""
        if not record.success:
            return False
        ttft, tpot = ttft_of(record), tpot_of(record)
        if self.ttft_ms is not None and (ttft is None or ttft * 1000.0 > self.ttft_ms):
            return False
        # A request with fewer than two tokens has no TPOT, so it cannot miss that SLO.
        if self.tpot_ms is not None and tpot is not None and tpot * 1000.0 > self.tpot_ms:
            return False
        if self.e2e_ms is not None and (record.latency is None
                                        or record.latency * 1000.0 > self.e2e_ms):
            return False
        return True


def ttft_of(record: RequestRecord) -> float | None:
    """Send to first text chunk, seconds; ``None`` when no text came."""
    return record.chunk_times[0] if record.chunk_times else None


def itls_of(record: RequestRecord) -> list[float]:
    """Gaps between consecutive text chunks, seconds."""
    return [b - a for a, b in pairwise(record.chunk_times)]


def tpot_of(record: RequestRecord) -> float | None:
    """``(e2e - ttft) / (output_tokens - 1)``; ``None`` below two output tokens."""
    ttft = ttft_of(record)
    n = record.output_tokens
    if ttft is None or record.latency is None or n is None or n < 2:
        return None
    return (record.latency - ttft) / (n - 1)


@dataclass
class RunSummary:
    """The metrics of one benchmark run (one target at one load point)."""

    num_requests: int
    completed: int
    failed: int
    errors: dict[str, int]
    duration_s: float
    total_prompt_tokens: int
    total_output_tokens: int
    count_sources: dict[str, int]
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    good_requests: int | None
    request_goodput: float | None
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2e: LatencyStats
    max_concurrent_observed: int = 0
    usage_prompt_tokens: int | None = None  # totals the server reported, for cross-checks
    usage_completion_tokens: int | None = None
    # Token-level prefix-cache hit rate: sum(cached) / sum(prompt tokens) from usage.
    prefix_hit_rate: float | None = None
    requests_by_server: dict[str, int] = field(default_factory=dict)
    slo: dict[str, float | None] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def peak_concurrency(records: Sequence[RequestRecord]) -> int:
    """Most requests in flight at once, from send times and latencies."""
    events = []
    for r in records:
        if r.latency is not None:
            events.append((r.send_time, 1))
            events.append((r.send_time + r.latency, -1))
    events.sort(key=lambda e: (e[0], e[1]))  # ends before starts at the same instant
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


def run_duration(records: Sequence[RequestRecord]) -> float:
    """First send to last response, seconds."""
    spans = [(r.send_time, r.send_time + (r.latency or 0.0)) for r in records]
    if not spans:
        return 0.0
    return max(end for _, end in spans) - min(start for start, _ in spans)


def summarize(records: Sequence[RequestRecord], duration_s: float | None = None,
              slo: SLO | None = None) -> RunSummary:
    """Aggregate per-request records into a :class:`RunSummary`.

    ``duration_s`` defaults to :func:`run_duration`; token counts must already be set
    on successful records (``output_tokens``/``prompt_tokens``).
    """
    slo = slo or SLO()
    duration = run_duration(records) if duration_s is None else duration_s
    ok = [r for r in records if r.success]
    errors = Counter(error_key(r) for r in records if not r.success)
    prompt_tokens = sum(r.prompt_tokens or 0 for r in ok)
    output_tokens = sum(r.output_tokens or 0 for r in ok)
    per_second = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    good = sum(slo.met_by(r) for r in ok) if slo.any else None
    usage_p = [r.usage_prompt_tokens for r in ok]
    usage_c = [r.usage_completion_tokens for r in ok]
    return RunSummary(
        num_requests=len(records),
        completed=len(ok),
        failed=len(records) - len(ok),
        errors=dict(sorted(errors.items())),
        duration_s=duration,
        total_prompt_tokens=prompt_tokens,
        total_output_tokens=output_tokens,
        count_sources=dict(Counter(r.count_source for r in ok if r.count_source)),
        request_throughput=per_second(len(ok)),
        output_throughput=per_second(output_tokens),
        total_token_throughput=per_second(prompt_tokens + output_tokens),
        good_requests=good,
        request_goodput=per_second(good) if good is not None else None,
        ttft=LatencyStats.of_seconds([t for r in ok if (t := ttft_of(r)) is not None]),
        tpot=LatencyStats.of_seconds([t for r in ok if (t := tpot_of(r)) is not None]),
        itl=LatencyStats.of_seconds([g for r in ok for g in itls_of(r)]),
        e2e=LatencyStats.of_seconds([r.latency for r in ok if r.latency is not None]),
        max_concurrent_observed=peak_concurrency(records),
        usage_prompt_tokens=sum(usage_p) if ok and None not in usage_p else None,
        usage_completion_tokens=sum(usage_c) if ok and None not in usage_c else None,
        prefix_hit_rate=_hit_rate(ok),
        requests_by_server=dict(sorted(Counter(r.served_by for r in ok if r.served_by).items())),
        slo={"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms, "e2e_ms": slo.e2e_ms},
    )


def _hit_rate(ok: Sequence[RequestRecord]) -> float | None:
    pairs = [(r.usage_cached_tokens, r.usage_prompt_tokens) for r in ok
             if r.usage_cached_tokens is not None and r.usage_prompt_tokens]
    total = sum(p for _, p in pairs)
    return sum(c for c, _ in pairs) / total if total else None


def assign_token_counts(record: RequestRecord, prompt_count: int | None,
                        tokenizer_output_count: int | None, prefer: str = "auto") -> None:
    """Set ``prompt_tokens``/``output_tokens`` on ``record`` from the best source.

    ``prefer``: ``auto`` = the local tokenizer when given, else the server's usage;
    ``usage`` or ``tokenizer`` force one source where it exists. The count of text
    chunks is the last resort for output tokens (one token per chunk).
    ``prompt_count`` and ``tokenizer_output_count`` are the tokenizer's counts (or None).
    """
    use_tokenizer = prefer in ("auto", "tokenizer") and tokenizer_output_count is not None
    if prefer == "usage" and record.usage_completion_tokens is None:
        use_tokenizer = tokenizer_output_count is not None
    if use_tokenizer:
        record.output_tokens = tokenizer_output_count
        record.count_source = "tokenizer"
    elif record.usage_completion_tokens is not None:
        record.output_tokens = record.usage_completion_tokens
        record.count_source = "usage"
    else:
        record.output_tokens = len(record.chunk_times)
        record.count_source = "chunks"
    if use_tokenizer and prompt_count is not None:
        record.prompt_tokens = prompt_count
    elif record.usage_prompt_tokens is not None:
        record.prompt_tokens = record.usage_prompt_tokens
    else:
        record.prompt_tokens = prompt_count
