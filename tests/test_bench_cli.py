"""``tokenmill bench serve`` command line, reports and plots (no server needed)."""

from __future__ import annotations

import argparse
import json
import math
import socket

import pytest

from tokenmill.bench import serve
from tokenmill.bench.client import RequestRecord, Target
from tokenmill.bench.metrics import SLO, summarize
from tokenmill.bench.report import RunResult, format_comparison, format_run, format_sweep
from tokenmill.bench.runner import LoadSpec


def timeline(index: int, send: float, chunks: list[float], end: float) -> RequestRecord:
    rec = RequestRecord(index=index, success=True, status=200, send_time=send,
                        latency=end - send, chunk_times=[t - send for t in chunks])
    rec.output_tokens, rec.prompt_tokens = len(chunks), 10
    return rec


def failure(index: int, status: int, error: str) -> RequestRecord:
    return RequestRecord(index=index, status=status, error=error, latency=0.01)


def parse(*argv: str) -> argparse.Namespace:
    return serve.build_parser().parse_args(list(argv))


def test_add_cli_registers_serve_under_bench():
    root = argparse.ArgumentParser(prog="tokenmill")
    bench = root.add_subparsers(dest="command").add_parser("bench")
    serve.add_cli(bench.add_subparsers(dest="bench_command"))
    args = root.parse_args(["bench", "serve", "--num-prompts", "3", "--request-rate", "2.5"])
    assert args.func is serve.run_from_args
    assert args.num_prompts == 3 and args.request_rate == 2.5


def test_defaults():
    args = parse()
    assert args.request_rate == math.inf and args.burstiness == 1.0
    assert args.max_concurrency is None and args.ignore_eos is True
    assert args.endpoint == "/v1/completions" and args.extra_body == {}
    assert serve.load_points(args) == [LoadSpec()]


def test_sweeps():
    points = serve.load_points(parse("--sweep", "concurrency=1,8,32", "--request-rate", "4"))
    assert [(p.request_rate, p.max_concurrency) for p in points] == [(4, 1), (4, 8), (4, 32)]
    points = serve.load_points(parse("--sweep", "rate=0.5,2,inf", "--max-concurrency", "4"))
    assert [(p.request_rate, p.max_concurrency) for p in points] == [
        (0.5, 4), (2, 4), (math.inf, 4)]
    for bad in ("concurrency=0", "rate=-1", "speed=1,2", "rate=", "concurrency=1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            serve.parse_sweep(bad)


def test_extra_body_must_be_a_json_object():
    assert parse("--extra-body", '{"min_tokens": 4}').extra_body == {"min_tokens": 4}
    with pytest.raises(SystemExit):
        parse("--extra-body", "[1, 2]")


def _result(name: str, point: int, concurrency: int, scale: float) -> RunResult:
    records = [timeline(i, 0.1 * i, [0.1 * i + scale * t for t in (0.1, 0.15, 0.2, 0.25)],
                        0.1 * i + scale * 0.3) for i in range(12)]
    records.append(failure(12, 401, "HTTP 401: no"))
    load = LoadSpec(max_concurrency=concurrency)
    return RunResult(target=Target(base_url="http://x", label=name, model="m"), load=load,
                     workload="random", summary=summarize(records, slo=SLO(ttft_ms=150)),
                     records=records, point=point)


def test_tables_and_plots(tmp_path):
    results = [_result("tokenmill", 0, 1, 1.0), _result("llama.cpp", 0, 1, 2.0),
               _result("tokenmill", 1, 8, 1.5), _result("llama.cpp", 1, 8, 3.0)]
    text = format_run(results[0])
    for needle in ("Successful requests", "errors 401", "TTFT", "TPOT", "ITL", "E2E",
                   "Request goodput"):
        assert needle in text
    sweep = format_sweep(results)
    assert sweep.count("tokenmill") == 2 and sweep.count("llama.cpp") == 2
    pairs = serve.comparison_pairs(results)
    assert [(a.target.name, b.target.name, a.point) for a, b in pairs] == [
        ("tokenmill", "llama.cpp", 0), ("tokenmill", "llama.cpp", 1)]
    table = format_comparison(*pairs[0])
    assert "Mean TTFT (ms)" in table and "0.50×" in table  # half of B's TTFT

    from tokenmill.bench.plots import plot_results
    from tokenmill.bench.report import write_json

    for name, runs in (("single.png", results[:1]), ("sweep.png", results)):
        plot_results(runs, str(tmp_path / name))
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_json(str(tmp_path / "r.json"), results, {"tool": "t"}, pairs)
    doc = json.loads((tmp_path / "r.json").read_text())
    assert len(doc["runs"]) == 4 and len(doc["comparisons"]) == 2
    assert doc["runs"][0]["summary"]["errors"] == {"401": 1}
    assert len(doc["runs"][0]["requests"]) == 13


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_counts_failures(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = serve.main(["--base-url", f"http://127.0.0.1:{_closed_port()}", "--model", "m",
                     "--num-prompts", "3", "--random-input-len", "8", "--disable-tqdm",
                     "--result-json", str(out)])
    assert rc == 1  # nothing got through
    doc = json.loads(out.read_text())
    summary = doc["runs"][0]["summary"]
    assert summary["failed"] == 3 and summary["errors"] == {"connection_error": 3}
    assert doc["args"]["request_rate"] == "inf" and "prompt_salt" in doc["args"]
    assert "Failed requests                   3" in capsys.readouterr().out


def test_model_discovery_failure_is_an_error(capsys):
    rc = serve.main(["--base-url", f"http://127.0.0.1:{_closed_port()}", "--disable-tqdm"])
    assert rc == 2
    assert "error" in capsys.readouterr().err
