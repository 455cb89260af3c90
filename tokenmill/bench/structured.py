"""The ``structured`` workload of ``bench serve``: JSON-schema output vs unconstrained.

Every load point runs twice on the same server with the same prompts: once with
``response_format`` set to a JSON schema (target A) and once without (target B); the
comparison table then shows the cost of constrained decoding as the ratio A/B (time
per output token is the headline). Unless ``--no-ignore-eos``, the default schema
needs far more tokens than ``--random-output-len`` (an array of at least 64 records),
so both runs generate exactly ``max_tokens`` tokens per request and their TPOTs
compare like for like.

The grammar compile time comes from the server's Prometheus counters
(``tokenmill_grammar_compile_seconds_total`` / ``..._compiles_total``), read before
and after the runs; each invocation salts the schema's description so the first
request of the run compiles it (one cold compile, cache hits afterwards).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import httpx

from tokenmill.bench.client import Target

CONSTRAINED_LABEL = "json-schema"
UNCONSTRAINED_LABEL = "unconstrained"


def default_schema(salt: str) -> dict[str, Any]:
    """Records of a few typed fields, at least 64 of them (longer than a benchmark run)."""
    record = {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0},
            "name": {"type": "string", "maxLength": 24},
            "email": {"type": "string", "maxLength": 32},
            "active": {"type": "boolean"},
            "score": {"type": "number"},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue", "other"]},
                     "maxItems": 3},
        },
        "required": ["id", "name", "email", "active", "score", "tags"],
        "additionalProperties": False,
    }
    return {"type": "object", "description": f"bench-{salt}",
            "properties": {"records": {"type": "array", "items": record, "minItems": 64}},
            "required": ["records"], "additionalProperties": False}


def load_schema(path: str | None, salt: str) -> dict[str, Any]:
    """The schema to benchmark: a JSON file, or :func:`default_schema`."""
    if path is None:
        return default_schema(salt)
    with open(path, encoding="utf-8") as handle:
        schema = json.load(handle)
    if not isinstance(schema, dict):
        raise ValueError(f"{path}: a JSON schema must be an object")
    return schema


def structured_targets(target: Target, schema: dict[str, Any]) -> list[Target]:
    """(A) the target asked for ``schema`` via response_format, (B) the same, unconstrained."""
    fmt = {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}}
    constrained = replace(target, label=CONSTRAINED_LABEL,
                          extra_body={**target.extra_body, "response_format": fmt})
    return [constrained, replace(target, label=UNCONSTRAINED_LABEL)]


@dataclass
class GrammarCounters:
    """The server's grammar counters at one moment (None where it exports none)."""

    compiles: float | None
    cache_hits: float | None
    seconds: float | None

    @classmethod
    def scrape(cls, base_url: str, api_key: str | None = None) -> GrammarCounters:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            text = httpx.get(base_url.rstrip("/") + "/metrics", headers=headers,
                             timeout=30).text
        except httpx.HTTPError:
            return cls(None, None, None)
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("tokenmill_grammar_"):
                name, _, value = line.rpartition(" ")
                try:
                    values[name] = float(value)
                except ValueError:
                    pass
        return cls(values.get("tokenmill_grammar_compiles_total"),
                   values.get("tokenmill_grammar_cache_hits_total"),
                   values.get("tokenmill_grammar_compile_seconds_total"))


def format_compile_report(before: GrammarCounters, after: GrammarCounters) -> str:
    """One line: grammars compiled during the runs, mean compile time, cache hits."""
    if after.compiles is None or before.compiles is None:
        return "Grammar compile time: not exported by this server (no tokenmill_grammar_* " \
               "metrics)"
    compiles = after.compiles - before.compiles
    hits = (after.cache_hits or 0) - (before.cache_hits or 0)
    seconds = (after.seconds or 0) - (before.seconds or 0)
    mean = f"{1000 * seconds / compiles:.1f} ms mean" if compiles else "no compile (cached)"
    return (f"Grammar compile time: {mean} over {compiles:.0f} compile(s); "
            f"{hits:.0f} compile-cache hit(s)")


def format_tpot_ratios(pairs: Sequence[tuple[Any, Any]]) -> str:
    """Mean TPOT with the schema / without, per load point and the median over points."""
    ratios = []
    for a, b in pairs:
        ta, tb = a.summary.tpot.mean, b.summary.tpot.mean
        if ta is not None and tb:
            ratios.append(ta / tb)
    if not ratios:
        return "TPOT ratio json-schema / unconstrained: n/a"
    listed = ", ".join(f"{r:.3f}" for r in ratios)
    return (f"TPOT ratio json-schema / unconstrained: median {statistics.median(ratios):.3f}x "
            f"(per load point: {listed})")
