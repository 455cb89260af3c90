"""Serving-benchmark metrics on hand-built timelines, SSE parsing and payloads."""

from __future__ import annotations

import math

import pytest

from tokenmill.bench.client import (
    RequestRecord,
    SSEDecoder,
    Target,
    build_payload,
    chunk_text,
    error_key,
    render_transcript,
)
from tokenmill.bench.metrics import (
    SLO,
    LatencyStats,
    assign_token_counts,
    itls_of,
    peak_concurrency,
    run_duration,
    summarize,
    tpot_of,
    ttft_of,
)
from tokenmill.bench.report import comparison_rows


def timeline(index: int, send: float, chunks: list[float], end: float,
             tokens: int | None = None, prompt: int = 10) -> RequestRecord:
    """A successful request sent at ``send`` whose text chunks arrive at absolute times."""
    rec = RequestRecord(index=index, success=True, status=200, send_time=send,
                        latency=end - send, chunk_times=[t - send for t in chunks])
    rec.output_tokens = len(chunks) if tokens is None else tokens
    rec.prompt_tokens = prompt
    return rec


def failure(index: int, status: int | None, error: str, send: float = 0.0,
            latency: float = 0.01) -> RequestRecord:
    return RequestRecord(index=index, success=False, status=status, error=error,
                         send_time=send, latency=latency)


def test_one_request_timeline():
    rec = timeline(0, send=1.0, chunks=[1.1, 1.15, 1.25, 1.30], end=1.35)
    assert ttft_of(rec) == pytest.approx(0.1)
    assert itls_of(rec) == pytest.approx([0.05, 0.10, 0.05])
    # TPOT = (e2e - ttft) / (tokens - 1) = (0.35 - 0.1) / 3
    assert tpot_of(rec) == pytest.approx(0.25 / 3)


def test_tpot_uses_token_count_not_chunk_count():
    # Two chunks carried 5 tokens (e.g. a server that batches its stream).
    rec = timeline(0, send=0.0, chunks=[0.2, 0.6], end=1.0, tokens=5)
    assert tpot_of(rec) == pytest.approx((1.0 - 0.2) / 4)
    assert itls_of(rec) == pytest.approx([0.4])


def test_tpot_undefined_below_two_tokens():
    assert tpot_of(timeline(0, 0.0, [0.3], 0.3)) is None
    no_text = timeline(0, 0.0, [], 0.5, tokens=0)
    assert ttft_of(no_text) is None and tpot_of(no_text) is None and itls_of(no_text) == []


def test_latency_stats_percentiles():
    stats = LatencyStats.of_seconds([i / 100 for i in range(1, 11)])  # 10 ms .. 100 ms
    assert stats.count == 10
    assert stats.mean == pytest.approx(55.0)
    assert stats.median == pytest.approx(55.0)
    assert stats.p90 == pytest.approx(91.0)  # linear between order statistics
    assert stats.p99 == pytest.approx(99.1)
    assert stats.max == pytest.approx(100.0) and stats.min == pytest.approx(10.0)
    assert LatencyStats.of_seconds([]).mean is None


def test_summary_of_a_synthetic_run():
    # Four requests, each 3 tokens; TTFTs 100, 200, 300, 400 ms; ITL always 50 ms.
    records = [
        timeline(i, send=0.5 * i, chunks=[0.5 * i + t, 0.5 * i + t + 0.05, 0.5 * i + t + 0.1],
                 end=0.5 * i + t + 0.1, prompt=20)
        for i, t in enumerate([0.1, 0.2, 0.3, 0.4])
    ]
    records.append(failure(4, 401, "HTTP 401: bad key", send=0.2))
    records.append(failure(5, 401, "HTTP 401: bad key", send=0.3))
    records.append(failure(6, None, "ConnectError: refused", send=0.4))
    records.append(failure(7, 200, "stream error: boom", send=0.4))
    s = summarize(records, duration_s=2.0, slo=SLO(ttft_ms=250))

    assert (s.num_requests, s.completed, s.failed) == (8, 4, 4)
    assert s.errors == {"401": 2, "connection_error": 1, "stream_error": 1}
    assert s.total_output_tokens == 12 and s.total_prompt_tokens == 80
    assert s.request_throughput == pytest.approx(2.0)
    assert s.output_throughput == pytest.approx(6.0)
    assert s.total_token_throughput == pytest.approx(46.0)
    assert s.ttft.mean == pytest.approx(250.0)
    assert s.ttft.median == pytest.approx(250.0)
    assert s.ttft.max == pytest.approx(400.0)
    assert s.itl.count == 8 and s.itl.mean == pytest.approx(50.0)
    assert s.tpot.mean == pytest.approx(50.0)  # (e2e - ttft) / 2 = 0.1 / 2
    assert s.e2e.mean == pytest.approx(350.0)
    # Goodput: TTFT <= 250 ms holds for the first two only; failures never count.
    assert s.good_requests == 2
    assert s.request_goodput == pytest.approx(1.0)


def test_goodput_with_tpot_and_e2e_slos():
    fast = timeline(0, 0.0, [0.1, 0.2, 0.3], 0.3)  # TPOT 100 ms, e2e 300 ms
    slow = timeline(1, 0.0, [0.1, 0.5, 0.9], 0.9)  # TPOT 400 ms, e2e 900 ms
    single = timeline(2, 0.0, [0.1], 0.1)  # no TPOT: cannot miss the TPOT SLO
    recs = [fast, slow, single]
    assert summarize(recs, 1.0, SLO(tpot_ms=200)).good_requests == 2
    assert summarize(recs, 1.0, SLO(e2e_ms=500)).good_requests == 2
    assert summarize(recs, 1.0, SLO(tpot_ms=500, e2e_ms=200)).good_requests == 1
    no_slo = summarize(recs, 1.0)
    assert no_slo.good_requests is None and no_slo.request_goodput is None


def test_duration_and_peak_concurrency():
    recs = [timeline(0, 0.0, [0.5], 1.0), timeline(1, 0.5, [0.8], 2.0),
            timeline(2, 1.0, [1.2], 1.5), timeline(3, 3.0, [3.1], 3.5)]
    assert run_duration(recs) == pytest.approx(3.5)
    # Request 0 ends at 1.0 exactly when request 2 starts: they do not overlap.
    assert peak_concurrency(recs) == 2
    assert summarize(recs).duration_s == pytest.approx(3.5)


def test_token_count_sources():
    rec = RequestRecord(index=0, success=True, chunk_times=[0.1, 0.2, 0.3],
                        usage_prompt_tokens=12, usage_completion_tokens=4)
    assign_token_counts(rec, prompt_count=None, tokenizer_output_count=None)
    assert (rec.prompt_tokens, rec.output_tokens, rec.count_source) == (12, 4, "usage")
    assign_token_counts(rec, prompt_count=11, tokenizer_output_count=3)
    assert (rec.prompt_tokens, rec.output_tokens, rec.count_source) == (11, 3, "tokenizer")
    assign_token_counts(rec, prompt_count=11, tokenizer_output_count=3, prefer="usage")
    assert (rec.prompt_tokens, rec.output_tokens, rec.count_source) == (12, 4, "usage")
    bare = RequestRecord(index=1, success=True, chunk_times=[0.1, 0.2])
    assign_token_counts(bare, prompt_count=None, tokenizer_output_count=None, prefer="usage")
    assert (bare.prompt_tokens, bare.output_tokens, bare.count_source) == (None, 2, "chunks")


def test_error_keys():
    assert error_key(failure(0, 429, "HTTP 429")) == "429"
    assert error_key(failure(0, None, "timeout: ReadTimeout")) == "timeout"
    assert error_key(failure(0, 200, "bad stream chunk: x")) == "bad_chunk"
    assert error_key(failure(0, None, "RemoteProtocolError: closed")) == "connection_error"


def test_sse_decoder_events():
    dec = SSEDecoder()
    lines = [": keep-alive", "", "event: message", "data: {\"a\":", "data: 1}", "id: 7", "",
             "data:[DONE]", ""]
    out = [p for line in lines if (p := dec.feed(line)) is not None]
    assert out == ['{"a":\n1}', "[DONE]"]
    dec.feed("data: tail")
    assert dec.flush() == "tail" and dec.flush() is None


def test_chunk_text_for_both_endpoints():
    assert chunk_text({"choices": [{"index": 0, "text": " hi"}]}) == " hi"
    assert chunk_text({"choices": [{"index": 0, "delta": {"content": "yo"}}]}) == "yo"
    assert chunk_text({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}) == ""
    assert chunk_text({"choices": [], "usage": {"completion_tokens": 3}}) == ""


def test_payloads():
    comp = Target(base_url="http://h:1/", model="m", extra_body={"min_tokens": 8, "top_k": 5})
    body = build_payload(comp, 32, prompt="hello")
    assert comp.url == "http://h:1/v1/completions"
    assert body["prompt"] == "hello" and body["max_tokens"] == 32 and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["min_tokens"] == 8 and body["top_k"] == 5
    chat = Target(base_url="http://h:1", endpoint="/v1/chat/completions", model="m",
                  ignore_eos=False, api_key="k")
    body = build_payload(chat, 4, prompt="hi")
    assert body["messages"] == [{"role": "user", "content": "hi"}] and "ignore_eos" not in body
    assert chat.headers() == {"Authorization": "Bearer k"}
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert build_payload(comp, 4, messages=history)["prompt"] == render_transcript(history)
    assert render_transcript(history).endswith("\nAssistant:")


def test_comparison_ratios():
    a = summarize([timeline(0, 0.0, [0.1, 0.2], 0.2)], duration_s=1.0)
    b = summarize([timeline(0, 0.0, [0.4, 0.5], 0.5)], duration_s=2.0)
    rows = {r["metric"]: r for r in comparison_rows(a, b)}
    assert rows["Request throughput (req/s)"]["ratio"] == pytest.approx(2.0)
    assert rows["Mean TTFT (ms)"]["ratio"] == pytest.approx(0.25)
    assert rows["Failed requests"]["ratio"] is None  # 0 / 0
    assert not math.isnan(rows["Mean E2E (ms)"]["ratio"])
