"""The structured workload of ``bench serve``: targets, compile-time report, TPOT ratios."""

from __future__ import annotations

from types import SimpleNamespace

from tokenmill.bench.client import Target, build_payload
from tokenmill.bench.serve import build_parser, build_targets
from tokenmill.bench.structured import (
    GrammarCounters,
    default_schema,
    format_compile_report,
    format_tpot_ratios,
    structured_targets,
)
from tokenmill.sampling.grammar import check_structured_outputs
from tokenmill.sampling.params import StructuredOutputsParams


def test_targets_differ_only_by_the_schema():
    base = Target("http://x", model="m", extra_body={"min_tokens": 4})
    schema = default_schema("salt")
    constrained, free = structured_targets(base, schema)
    assert (constrained.label, free.label) == ("json-schema", "unconstrained")
    body = build_payload(constrained, 16, prompt="p")
    assert body["response_format"]["json_schema"]["schema"] == schema
    assert body["min_tokens"] == 4 and "response_format" not in build_payload(free, 16, "p")
    # The default schema is one the engine accepts, and is salted per run.
    check_structured_outputs(StructuredOutputsParams(json=schema))
    assert default_schema("a") != default_schema("b")


def test_cli_builds_the_pair(monkeypatch):
    args = build_parser().parse_args(["--workload", "structured", "--model", "m",
                                      "--max-concurrency", "8"])
    args.prompt_salt = "s"
    targets = build_targets(args)
    assert [t.label for t in targets] == ["json-schema", "unconstrained"]


def test_reports():
    before = GrammarCounters(1, 5, 0.2)
    after = GrammarCounters(2, 28, 0.23)
    assert format_compile_report(before, after) == (
        "Grammar compile time: 30.0 ms mean over 1 compile(s); 23 compile-cache hit(s)")
    assert "not exported" in format_compile_report(GrammarCounters(None, None, None),
                                                   GrammarCounters(None, None, None))

    def run(tpot):
        return SimpleNamespace(summary=SimpleNamespace(tpot=SimpleNamespace(mean=tpot)))

    text = format_tpot_ratios([(run(110), run(100)), (run(90), run(100)), (run(105), run(100))])
    assert text.startswith("TPOT ratio json-schema / unconstrained: median 1.050x")
