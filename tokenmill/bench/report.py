"""Human-readable tables and the machine-readable JSON of a benchmark."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.bench.client import RequestRecord, Target
from tokenmill.bench.metrics import LatencyStats, RunSummary, itls_of, tpot_of, ttft_of
from tokenmill.bench.runner import LoadSpec


@dataclass
class RunResult:
    """One target at one load point: what was asked, what happened, what it adds up to."""

    target: Target
    load: LoadSpec
    workload: str
    summary: RunSummary
    records: list[RequestRecord] = field(default_factory=list)
    point: int = 0  # index of the load point in a sweep

    def title(self) -> str:
        return f"{self.target.name} — {self.load.describe()}"

    def to_dict(self, with_requests: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "target": {
                "label": self.target.name,
                "base_url": self.target.base_url,
                "endpoint": self.target.endpoint,
                "model": self.target.model,
                "extra_body": self.target.extra_body,
                "ignore_eos": self.target.ignore_eos,
            },
            "load": {
                "request_rate": _finite_or_str(self.load.request_rate),
                "burstiness": self.load.burstiness,
                "max_concurrency": self.load.max_concurrency,
            },
            "point": self.point,
            "workload": self.workload,
            "summary": self.summary.to_dict(),
        }
        if with_requests:
            out["requests"] = [record_to_dict(r) for r in self.records]
        return out


def _finite_or_str(x: float) -> float | str:
    return x if math.isfinite(x) else "inf"


def record_to_dict(r: RequestRecord) -> dict[str, Any]:
    """One request for the JSON file: timings in seconds, without the generated text."""
    return {
        "index": r.index,
        "success": r.success,
        "status": r.status,
        "error": r.error,
        "send_time": r.send_time,
        "ttft": ttft_of(r),
        "tpot": tpot_of(r) if r.success else None,
        "e2e": r.latency,
        "itl": itls_of(r),
        "prompt_tokens": r.prompt_tokens,
        "output_tokens": r.output_tokens,
        "count_source": r.count_source,
        "usage_prompt_tokens": r.usage_prompt_tokens,
        "usage_completion_tokens": r.usage_completion_tokens,
        "finish_reason": r.finish_reason,
        "conversation": r.conversation,
        "turn": r.turn,
    }


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def format_run(result: RunResult) -> str:
    """The end-of-run table for one target at one load point."""
    s = result.summary
    width = 64
    lines = [f" {result.target.name} ".center(width, "="),
             f"{'Endpoint':<34}{result.target.url}",
             f"{'Model':<34}{result.target.model}",
             f"{'Workload':<34}{result.workload}",
             f"{'Load':<34}{result.load.describe()}",
             f"{'Successful requests':<34}{s.completed}",
             f"{'Failed requests':<34}{s.failed}"]
    for key, count in s.errors.items():
        lines.append(f"{'  errors ' + key:<34}{count}")
    sources = ", ".join(f"{k}: {v}" for k, v in sorted(s.count_sources.items())) or "-"
    lines += [
        f"{'Peak concurrency observed':<34}{s.max_concurrent_observed}",
        f"{'Duration (s)':<34}{s.duration_s:,.2f}",
        f"{'Prompt tokens':<34}{s.total_prompt_tokens:,}",
        f"{'Output tokens':<34}{s.total_output_tokens:,}",
        f"{'Token counts from':<34}{sources}",
        f"{'Request throughput (req/s)':<34}{s.request_throughput:,.3f}",
        f"{'Output token throughput (tok/s)':<34}{s.output_throughput:,.2f}",
        f"{'Total token throughput (tok/s)':<34}{s.total_token_throughput:,.2f}",
    ]
    if s.prefix_hit_rate is not None:
        lines.append(f"{'Prefix cache hit rate (tokens)':<34}{s.prefix_hit_rate:.3f}")
    if s.requests_by_server:
        total = sum(s.requests_by_server.values())
        shares = ", ".join(f"{k} {v / total:.0%}" for k, v in s.requests_by_server.items())
        lines.append(f"{'Requests by replica':<34}{shares}")
    if s.request_goodput is not None:
        slo = ", ".join(f"{k.split('_')[0].upper()} ≤ {v:g} ms"
                        for k, v in s.slo.items() if v is not None)
        lines.append(f"{'Good requests (' + slo + ')':<34}{s.good_requests}")
        lines.append(f"{'Request goodput (req/s)':<34}{s.request_goodput:,.3f}")
    lines.append("-" * width)
    lines.append(f"{'Latency (ms)':<14}{'mean':>10}{'median':>10}{'p90':>10}{'p99':>10}{'max':>10}")
    for name, st in (("TTFT", s.ttft), ("TPOT", s.tpot), ("ITL", s.itl), ("E2E", s.e2e)):
        lines.append(f"{name:<14}{_fmt(st.mean):>10}{_fmt(st.median):>10}{_fmt(st.p90):>10}"
                     f"{_fmt(st.p99):>10}{_fmt(st.max):>10}")
    lines.append("=" * width)
    return "\n".join(lines)


def format_sweep(results: Sequence[RunResult]) -> str:
    """One row per run: the throughput–latency picture of a sweep as a table."""
    header = (f"{'target':<18}{'rate':>7}{'conc':>6}{'ok':>6}{'fail':>5}{'req/s':>8}"
              f"{'out tok/s':>11}{'TTFT mean':>11}{'TTFT p99':>10}{'TPOT mean':>11}"
              f"{'ITL p50':>9}{'E2E mean':>10}{'goodput':>9}")
    lines = [header, "-" * len(header)]
    for r in results:
        s, load = r.summary, r.load
        rate = "inf" if math.isinf(load.request_rate) else f"{load.request_rate:g}"
        conc = str(load.max_concurrency) if load.max_concurrency else "-"
        lines.append(
            f"{r.target.name[:17]:<18}{rate:>7}{conc:>6}{s.completed:>6}{s.failed:>5}"
            f"{s.request_throughput:>8.2f}{s.output_throughput:>11.1f}{_fmt(s.ttft.mean, 0):>11}"
            f"{_fmt(s.ttft.p99, 0):>10}{_fmt(s.tpot.mean, 1):>11}{_fmt(s.itl.median, 1):>9}"
            f"{_fmt(s.e2e.mean, 0):>10}{_fmt(s.request_goodput):>9}")
    lines.append("(latencies in ms)")
    return "\n".join(lines)


# (label, getter, higher_is_better)
COMPARED_METRICS: tuple[tuple[str, Any, bool], ...] = (
    ("Request throughput (req/s)", lambda s: s.request_throughput, True),
    ("Output token throughput (tok/s)", lambda s: s.output_throughput, True),
    ("Total token throughput (tok/s)", lambda s: s.total_token_throughput, True),
    ("Mean TTFT (ms)", lambda s: s.ttft.mean, False),
    ("Median TTFT (ms)", lambda s: s.ttft.median, False),
    ("P99 TTFT (ms)", lambda s: s.ttft.p99, False),
    ("Mean TPOT (ms)", lambda s: s.tpot.mean, False),
    ("Median ITL (ms)", lambda s: s.itl.median, False),
    ("Mean E2E (ms)", lambda s: s.e2e.mean, False),
    ("Failed requests", lambda s: s.failed, False),
)


def comparison_rows(a: RunSummary, b: RunSummary) -> list[dict[str, Any]]:
    """Each compared metric with both values and the ratio ``a / b``."""
    rows = []
    for label, get, higher_better in COMPARED_METRICS:
        va, vb = get(a), get(b)
        ratio = va / vb if va is not None and vb not in (None, 0) else None
        rows.append({"metric": label, "a": va, "b": vb, "ratio": ratio,
                     "higher_is_better": higher_better})
    return rows


def format_comparison(a: RunResult, b: RunResult) -> str:
    """Side-by-side table of two targets at the same load, with the ratio A/B."""
    name_a, name_b = a.target.name[:17], b.target.name[:17]
    header = f"{'metric':<34}{name_a:>18}{name_b:>18}{'A/B':>9}  better"
    lines = [f"Comparison at {a.load.describe()}: A = {a.target.name}, B = {b.target.name}",
             header, "-" * len(header)]
    for row in comparison_rows(a.summary, b.summary):
        va, vb, ratio = row["a"], row["b"], row["ratio"]
        better = ""
        if va is not None and vb is not None and va != vb:
            a_wins = (va > vb) == row["higher_is_better"]
            better = "A" if a_wins else "B"
        digits = 0 if row["metric"] == "Failed requests" else 2
        ratio_text = "-" if ratio is None else f"{ratio:.2f}×"
        lines.append(f"{row['metric']:<34}{_fmt(va, digits):>18}{_fmt(vb, digits):>18}"
                     f"{ratio_text:>9}  {better}")
    return "\n".join(lines)


def write_json(path: str, results: Sequence[RunResult], meta: dict[str, Any],
               comparisons: Sequence[tuple[RunResult, RunResult]] = ()) -> None:
    """Write every run (with per-request records) and any comparisons to ``path``."""
    doc = dict(meta)
    doc["runs"] = [r.to_dict() for r in results]
    doc["comparisons"] = [
        {"point": a.point, "a": a.target.name, "b": b.target.name,
         "rows": comparison_rows(a.summary, b.summary)}
        for a, b in comparisons
    ]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n", encoding="utf-8")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, LatencyStats):
        return obj.__dict__
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
