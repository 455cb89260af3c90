"""Unit tests of the server's parts that need no model: validation, SSE, auth, rate
limits (in memory), metrics, flags."""

from __future__ import annotations

import argparse
import asyncio
import json

import pytest

from tokenmill.engine.args import EngineArgs
from tokenmill.outputs import EngineStats, RequestOutput, TokenLogprob
from tokenmill.server import responses
from tokenmill.server.auth import ApiKeyAuth, extract_key, key_id, load_api_keys
from tokenmill.server.body import parse_json
from tokenmill.server.cli import add_serve_arguments, config_from_args
from tokenmill.server.errors import APIError, retry_after_header
from tokenmill.server.metrics import RequestTiming, ServerMetrics
from tokenmill.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    normalize_prompt,
    parse_request,
)
from tokenmill.server.ratelimit import InMemoryRateLimiter, RateLimits, decide
from tokenmill.server.sse import SSE_DONE, sse_event


def run(coro):
    return asyncio.run(coro)


# ----- protocol ------------------------------------------------------------------------------


def chat_body(**fields):
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        ({"messages": "hello"}, "messages"),
        ({"stream": "maybe"}, "stream"),
    ],
)
def test_chat_validation_names_the_param(fields, param):
    with pytest.raises(APIError) as info:
        parse_request(ChatCompletionRequest, chat_body(**fields))
    err = info.value
    assert err.status == 400
    assert err.param == param
    body = err.to_dict()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert body["type"] == "invalid_request_error"


def test_missing_messages_is_missing_parameter():
    with pytest.raises(APIError) as info:
        parse_request(ChatCompletionRequest, {"model": "m"})
    assert info.value.param == "messages"
    assert info.value.code == "missing_required_parameter"


def test_unknown_fields_are_ignored_and_defaults_apply():
    req = parse_request(ChatCompletionRequest, chat_body(frobnicate=True, metadata={"a": 1}))
    assert req.n == 1 and req.stream is False and req.requested_max_tokens is None
    assert req.num_logprobs is None
    kwargs = req.sampling_kwargs(max_tokens=7)
    assert kwargs["max_tokens"] == 7 and "temperature" not in kwargs


def test_max_completion_tokens_wins_over_max_tokens():
    req = parse_request(ChatCompletionRequest, chat_body(max_tokens=5, max_completion_tokens=9))
    assert req.requested_max_tokens == 9
    assert req.max_tokens_param == "max_completion_tokens"


def test_chat_options_are_checked():
    too_many = parse_request(ChatCompletionRequest, chat_body(n=17))
    with pytest.raises(APIError) as info:
        too_many.check_supported(max_n=16)
    assert info.value.param == "n"
    req = parse_request(ChatCompletionRequest, chat_body(top_logprobs=2))
    with pytest.raises(APIError) as info:
        req.check_supported(max_n=16)
    assert info.value.param == "top_logprobs"
    with pytest.raises(APIError) as info:  # a tool needs its function
        parse_request(ChatCompletionRequest, chat_body(tools=[{"type": "function"}]))
    assert info.value.param == "tools[0].function"
    req = parse_request(ChatCompletionRequest, chat_body(logprobs=True, top_logprobs=3))
    req.check_supported(max_n=16)
    assert req.num_logprobs == 3


def test_content_parts_are_flattened_and_non_text_rejected():
    req = parse_request(ChatCompletionRequest, chat_body(messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]))
    assert req.template_messages() == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "a\nb"}
    ]
    req = parse_request(ChatCompletionRequest, chat_body(messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
    ]))
    with pytest.raises(APIError) as info:
        req.template_messages()
    assert info.value.param == "messages[0].content[0].type"


def test_stop_sequences():
    req = parse_request(ChatCompletionRequest, chat_body(stop="\n"))
    assert req.sampling_kwargs(4)["stop"] == ["\n"]
    req = parse_request(ChatCompletionRequest, chat_body(stop=[""]))
    with pytest.raises(APIError) as info:
        req.sampling_kwargs(4)
    assert info.value.param == "stop"


def test_completion_prompt_forms():
    assert normalize_prompt("a") == ["a"]
    assert normalize_prompt(["a", "b"]) == ["a", "b"]
    assert normalize_prompt([1, 2, 3]) == [[1, 2, 3]]
    assert normalize_prompt([[1], [2, 3]]) == [[1], [2, 3]]
    for bad in ([], [[]], [1, "a"], {"a": 1}, None, [True, False], 3):
        with pytest.raises(APIError) as info:
            normalize_prompt(bad)
        assert info.value.param == "prompt"
    req = parse_request(CompletionRequest, {"prompt": "x"})
    assert req.requested_max_tokens == 16  # OpenAI's default for completions
    with pytest.raises(APIError) as info:
        parse_request(CompletionRequest, {"prompt": "x", "logprobs": 21})
    assert info.value.param == "logprobs"


def test_bad_json_bodies():
    for raw in (b"{not json", b"\xff\xfe", b"[1, 2]", b'"text"'):
        with pytest.raises(APIError) as info:
            parse_json(raw)
        assert info.value.status == 400 and info.value.code == "invalid_json"
    assert parse_json(b'{"a": 1}') == {"a": 1}


# ----- responses and SSE ---------------------------------------------------------------------


def test_sse_framing():
    event = sse_event({"a": "é", "b": [1, 2]})
    assert event == 'data: {"a":"é","b":[1,2]}\n\n'.encode()
    assert SSE_DONE == b"data: [DONE]\n\n"
    with pytest.raises(ValueError):
        sse_event({"x": float("nan")})


def test_logprob_shapes():
    texts = {1: "He", 2: "llo", 3: "y"}
    entries = [
        TokenLogprob(1, -0.5, 1, [(1, -0.5), (3, -1.0)]),
        TokenLogprob(2, float("-inf"), 2, [(3, -0.1), (2, float("-inf"))]),
    ]
    chat = responses.chat_logprobs(entries, 1, texts.__getitem__)
    assert chat["content"][0] == {
        "token": "He", "logprob": -0.5, "bytes": [72, 101],
        "top_logprobs": [{"token": "He", "logprob": -0.5, "bytes": [72, 101]}],
    }
    assert chat["content"][1]["logprob"] == responses.MIN_LOGPROB
    body, offset = responses.completion_logprobs(entries, 2, texts.__getitem__, 10)
    assert body["tokens"] == ["He", "llo"]
    assert body["text_offset"] == [10, 12] and offset == 15
    assert body["top_logprobs"][0] == {"He": -0.5, "y": -1.0}
    json.dumps(chat, allow_nan=False)
    json.dumps(body, allow_nan=False)


def test_usage_shape():
    assert responses.usage_dict(5, 3, 2) == {
        "prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
        "prompt_tokens_details": {"cached_tokens": 2},
    }


# ----- auth ----------------------------------------------------------------------------------


def test_key_extraction():
    assert extract_key({"authorization": "Bearer abc"}) == "abc"
    assert extract_key({"authorization": "bearer  abc "}) == "abc"
    assert extract_key({"x-api-key": "xyz"}) == "xyz"
    assert extract_key({"authorization": "Basic abc"}) is None
    assert extract_key({}) is None


def test_auth_checks_keys(tmp_path):
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# team keys\nalpha\n\n beta \nalpha\n")
    keys = load_api_keys(["gamma"], key_file)
    assert keys == ["gamma", "alpha", "beta"]
    auth = ApiKeyAuth(keys)
    assert auth.authenticate({"authorization": "Bearer beta"}) == key_id("beta")
    assert key_id("beta").startswith("key-") and "beta" not in key_id("beta")
    for headers in ({}, {"authorization": "Bearer nope"}, {"x-api-key": "alph"}):
        with pytest.raises(APIError) as info:
            auth.authenticate(headers)
        assert info.value.status == 401 and info.value.code == "invalid_api_key"
    assert ApiKeyAuth([]).authenticate({}) is None


# ----- rate limits ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_decide_is_a_pure_rule():
    limits = RateLimits(requests_per_minute=60, tokens_per_minute=600)
    ok = decide(limits, 5.0, 600.0, 100)
    assert ok.allowed and ok.remaining_requests == 4.0 and ok.remaining_tokens == 500.0
    no_request = decide(limits, 0.5, 600.0, 100)
    assert not no_request.allowed and no_request.limited_by == "requests"
    assert no_request.retry_after == pytest.approx(0.5)  # 1 request per second refill
    no_tokens = decide(limits, 5.0, 50.0, 100)
    assert no_tokens.limited_by == "tokens" and no_tokens.retry_after == pytest.approx(5.0)
    # A prompt larger than the whole bucket passes a full bucket.
    assert decide(limits, 5.0, 600.0, 5000).allowed


def test_in_memory_requests_per_minute():
    clock = FakeClock()
    limiter = InMemoryRateLimiter(RateLimits(requests_per_minute=3), clock)
    results = [run(limiter.acquire("a", 10)).allowed for _ in range(4)]
    assert results == [True, True, True, False]
    refused = run(limiter.acquire("a", 10))
    assert refused.retry_after == pytest.approx(20.0)  # 3/min: one every 20 s
    assert run(limiter.acquire("b", 10)).allowed  # another client has its own budget
    clock.now += 20.0
    assert run(limiter.acquire("a", 10)).allowed
    assert not run(limiter.acquire("a", 10)).allowed


def test_in_memory_tokens_per_minute_with_completion_debt():
    clock = FakeClock()
    limits = RateLimits(tokens_per_minute=600)  # 10 tokens per second
    limiter = InMemoryRateLimiter(limits, clock)
    first = run(limiter.acquire("a", 100))
    assert first.allowed and first.remaining_tokens == 500
    run(limiter.charge("a", 900))  # completion: the bucket is now 400 in debt
    refused = run(limiter.acquire("a", 100))
    assert not refused.allowed and refused.limited_by == "tokens"
    assert refused.retry_after == pytest.approx(50.0)  # from -400 to 100 at 10/s
    clock.now += 50.0
    assert run(limiter.acquire("a", 100)).allowed
    headers = refused.headers(limits)
    assert headers["x-ratelimit-limit-tokens"] == "600"
    assert headers["x-ratelimit-remaining-tokens"] == "0"


def test_in_memory_prunes_idle_clients():
    clock = FakeClock()
    limiter = InMemoryRateLimiter(RateLimits(requests_per_minute=10), clock)
    limiter.PRUNE_EVERY = 4
    for i in range(3):
        run(limiter.acquire(f"client-{i}", 1))
    clock.now += 3600
    run(limiter.acquire("late", 1))  # the 4th acquisition prunes the full buckets
    assert set(limiter._buckets) == {"late"}


def test_retry_after_header_rounds_up():
    assert retry_after_header(0.2) == "1"
    assert retry_after_header(1.0) == "1"
    assert retry_after_header(20.01) == "21"


# ----- metrics -------------------------------------------------------------------------------


def test_metrics_registry_renders_engine_and_request_metrics():
    stats = EngineStats(
        num_running=2, num_waiting=1, kv_cache_usage=0.25, num_total_blocks=100,
        num_free_blocks=75, prefix_cache_queries=40, prefix_cache_hits=16, num_preemptions=3,
        prompt_tokens_total=500, generation_tokens_total=200, steps_total=50,
        kv_cache_capacity_tokens=1600,
    )
    holder = {"stats": None}
    metrics = ServerMetrics(lambda: holder["stats"])
    text, content_type = metrics.render()
    assert b"tokenmill_kv_cache_usage_ratio 0.0" in text
    assert content_type.startswith("text/plain")
    holder["stats"] = stats
    timing = RequestTiming(arrival=10.0)
    metrics.observe_token_output(timing, 10.5)
    metrics.observe_token_output(timing, 10.7)
    timing.max_choice_tokens = 2
    metrics.observe_finished(timing, 12, 2, ["stop"], 0.1, 11.0)
    metrics.count_http("/v1/completions", 200)
    text = metrics.render()[0].decode()
    for line in (
        "tokenmill_num_requests_running 2.0",
        "tokenmill_num_requests_waiting 1.0",
        "tokenmill_kv_cache_usage_ratio 0.25",
        "tokenmill_kv_cache_capacity_tokens 1600.0",
        "tokenmill_prefix_cache_queries_total 40.0",
        "tokenmill_prefix_cache_hits_total 16.0",
        "tokenmill_preemptions_total 3.0",
        "tokenmill_prompt_tokens_total 500.0",
        "tokenmill_generation_tokens_total 200.0",
        "tokenmill_time_to_first_token_seconds_count 1.0",
        "tokenmill_inter_token_latency_seconds_count 1.0",
        "tokenmill_time_per_output_token_seconds_count 1.0",
        "tokenmill_e2e_request_latency_seconds_sum 1.0",
        "tokenmill_request_queue_time_seconds_count 1.0",
        "tokenmill_request_prompt_tokens_sum 12.0",
        'tokenmill_requests_finished_total{finish_reason="stop"} 1.0',
        'tokenmill_http_requests_total{route="/v1/completions",status="200"} 1.0',
    ):
        assert line in text, line


def test_two_metric_registries_are_independent():
    first, second = ServerMetrics(lambda: None), ServerMetrics(lambda: None)
    first.count_http("/x", 200)
    assert b'route="/x"' not in second.render()[0]


# ----- flags ---------------------------------------------------------------------------------


def parse_flags(argv):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_flags_become_config(tmp_path, monkeypatch):
    monkeypatch.delenv("TOKENMILL_API_KEY", raising=False)
    key_file = tmp_path / "keys"
    key_file.write_text("k2\n")
    config = parse_flags([
        "--model", "m.gguf", "--max-model-len", "512", "--kv-cache-memory", "1GiB",
        "--scheduling-policy", "priority", "--served-model-name", "a", "b",
        "--api-key", "k1", "--api-key-file", str(key_file), "--rate-limit-rpm", "10",
        "--rate-limit-storage", "redis://127.0.0.1:6379", "--request-timeout", "5",
        "--log-level", "DEBUG",
    ])
    args = config.engine_args
    assert (args["model"], args["max_model_len"], args["kv_cache_memory"]) == (
        "m.gguf", 512, "1GiB")
    assert args["scheduling_policy"] == "priority"
    assert set(args) <= EngineArgs.field_names()
    assert config.served_model_names == ("a", "b")
    assert config.api_keys == ("k1", "k2")
    assert config.rate_limits == RateLimits(10, None)
    assert config.rate_limit_storage == "redis://127.0.0.1:6379"
    assert config.request_timeout == 5.0 and config.log_level == "debug"
    defaults = parse_flags([])
    assert defaults.engine_args["model"] is None and defaults.rate_limit_storage is None
    assert defaults.engine_args["scheduling_policy"] == "fcfs"
    assert defaults.max_queued_requests == 256 and defaults.log_level == "info"


def test_api_key_from_environment(monkeypatch):
    monkeypatch.setenv("TOKENMILL_API_KEY", "from-env")
    assert parse_flags([]).api_keys == ("from-env",)


def _delta(request_id: str, finished: bool = False) -> RequestOutput:
    return RequestOutput(request_id, None, [1], [], finished)


def test_request_stream_iterates_or_forwards_in_order():
    from tokenmill.engine.client import RequestStream
    from tokenmill.engine.errors import RequestFailed

    async def main() -> None:
        iterated = RequestStream("a")  # consumed by iteration: ends after the finished output
        outputs = [_delta("a"), _delta("a"), _delta("a", finished=True)]
        for output in outputs:
            iterated.put(output)
        assert [o async for o in iterated] == outputs and iterated.finished

        forwarded = RequestStream("b")  # what arrived before forward_to comes first
        early, late, last = _delta("b"), _delta("b"), _delta("b", finished=True)
        forwarded.put(early)
        seen: list[object] = []
        forwarded.forward_to(seen.append)
        assert seen == [early] and not forwarded.finished
        forwarded.put(late)
        forwarded.put(last)
        assert seen == [early, late, last] and forwarded.finished

        failed = RequestStream("c")
        failed.forward_to(seen.append)
        error = RequestFailed("boom")
        failed.put(error)
        assert seen[-1] is error and failed.finished

    asyncio.run(main())


def test_generation_run_merges_prompts_and_raises_their_errors():
    """Two prompts' deltas in arrival order, straight from the engine's streams (no task
    per prompt); an engine error reaches the consumer."""
    from tokenmill.engine.client import RequestStream
    from tokenmill.engine.errors import RequestFailed
    from tokenmill.server.generation import GenerationRun

    class Engine:
        def __init__(self) -> None:
            self.streams: dict[str, RequestStream] = {}
            self.aborted: list[str] = []

        def add_request(self, request_id, prompt, params, prompt_text=None, priority=0):
            self.streams[request_id] = RequestStream(request_id)
            return self.streams[request_id]

        def abort(self, request_id: str) -> None:
            self.aborted.append(request_id)

    async def main() -> None:
        engine, metrics = Engine(), ServerMetrics(lambda: None)
        run = GenerationRun(engine, [[1], [2]], None, ["p0", "p1"], 0, metrics)
        run.start()
        a0, b0 = _delta("p0"), _delta("p1")
        a1, b1 = _delta("p0", finished=True), _delta("p1", finished=True)
        for stream, item in ((engine.streams["p1"], b0), (engine.streams["p0"], a0),
                             (engine.streams["p0"], a1), (engine.streams["p1"], b1)):
            stream.put(item)
        got = [(index, output) async for index, output in run.outputs()]
        assert got == [(1, b0), (0, a0), (0, a1), (1, b1)]
        run.close("abort")
        assert engine.aborted == []  # both finished: nothing to abort

        failing = GenerationRun(engine, [[3]], None, ["p2"], 0, metrics)
        failing.start()
        engine.streams["p2"].put(RequestFailed("no"))
        with pytest.raises(RequestFailed):
            async for _ in failing.outputs():
                pass
        failing.close("error")
        assert engine.aborted == ["p2"]

    asyncio.run(main())
