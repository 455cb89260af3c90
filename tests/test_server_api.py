"""The OpenAI-compatible API of a real server process on the bundled SmolLM2 model,
driven by the official ``openai`` client (and raw HTTP where the client hides details)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from server_utils import start_server, stream_then_disconnect

from tokenmill.llm import LLM
from tokenmill.sampling import SamplingParams

MAX_MODEL_LEN = 512
SERVER_ARGS = ["--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", "256MiB",
               "--served-model-name", "smollm2", "smol-alias"]
MODEL = "smollm2"
SECRET_PROMPT = "Zanzibar-quokka-7781 tell me a fact"
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def server():
    proc = start_server(SERVER_ARGS)
    yield proc
    proc.cleanup()


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


@pytest.fixture(scope="module")
def offline():
    """The offline engine, the reference for greedy outputs."""
    return LLM(max_model_len=MAX_MODEL_LEN, kv_cache_memory="128MiB")


def greedy(max_tokens, **kw):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def sse_lines(response: httpx.Response) -> list[str]:
    return [line for line in response.iter_lines() if line]


# ----- basics ----------------------------------------------------------------------------------


def test_health_version_models(server, client):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/version").json()["version"]
    models = client.models.list()
    assert [m.id for m in models.data] == ["smollm2", "smol-alias"]
    assert client.models.retrieve("smol-alias").id == "smol-alias"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat_greedy_matches_offline_engine(client, offline):
    resp = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12,
                                          temperature=0)
    expected = offline.chat(CHAT, greedy(12))[0].outputs[0]
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-") and resp.model == MODEL
    choice = resp.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert resp.usage.completion_tokens == len(expected.token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_completion_greedy_matches_offline_engine(client, offline):
    prompt = "The three primary colors are"
    resp = client.completions.create(model="smol-alias", prompt=prompt, max_tokens=10,
                                     temperature=0)
    expected = offline.generate(prompt, greedy(10))[0]
    assert resp.object == "text_completion" and resp.model == "smol-alias"
    assert resp.choices[0].text == expected.outputs[0].text
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert resp.usage.completion_tokens == 10


def test_chat_stream_with_usage(client):
    full = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8,
                                          temperature=0)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert text == full.choices[0].message.content
    assert content[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert all(c.usage is None for c in content)
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == full.usage.completion_tokens
    assert last.usage.prompt_tokens == full.usage.prompt_tokens


def test_stream_wire_format(server):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = sse_lines(r)
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert all("usage" not in e for e in events)  # no include_usage: no usage key
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(len(e["choices"]) for e in events) >= 1


def test_completion_stream_matches_non_stream(client):
    kwargs = dict(model=MODEL, prompt="def fibonacci(n):", max_tokens=10, temperature=0)
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n2_and_seed_reproducibility(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}],
                  max_tokens=5, temperature=1.0, seed=1234, n=2)
    first = client.chat.completions.create(**kwargs)
    second = client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [
        c.message.content for c in second.choices]
    assert first.usage.completion_tokens <= 10
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    texts = {0: "", 1: ""}
    finished = set()
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1}
    assert [texts[0], texts[1]] == [c.message.content for c in first.choices]


def test_completion_n2_multiple_prompts_and_token_ids(client, server):
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "Hello, my name is"}).json()
    resp = client.completions.create(
        model=MODEL, prompt=["Hello, my name is", "The sky is"], max_tokens=3,
        temperature=0, n=2,
    )
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert resp.choices[0].text == resp.choices[1].text  # greedy: both samples agree
    by_ids = client.completions.create(model=MODEL, prompt=ids["tokens"], max_tokens=3,
                                       temperature=0)
    assert by_ids.choices[0].text == resp.choices[0].text
    echo = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=3,
                                     temperature=0, echo=True)
    assert echo.choices[0].text == "The sky is" + resp.choices[2].text


def test_stop_strings(client):
    base = client.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=8,
                                     temperature=0)
    text = base.choices[0].text
    assert "," in text[1:], text
    stop = ","
    resp = client.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=8,
                                     temperature=0, stop=[stop])
    assert resp.choices[0].finish_reason == "stop"
    assert stop not in resp.choices[0].text
    assert text.startswith(resp.choices[0].text)


def test_chat_logprobs(client):
    resp = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)
        assert bytes(entry.bytes) == entry.token.encode()
    assert "".join(e.token for e in content).startswith(resp.choices[0].message.content[:1])


def test_completion_logprobs(client):
    resp = client.completions.create(model=MODEL, prompt="The capital of Italy is",
                                     max_tokens=3, temperature=0, logprobs=2)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0
    assert "".join(lp.tokens) == resp.choices[0].text


def test_prefix_cache_hits_show_in_usage(client):
    prompt = "Here is a long shared system prompt about the history of tea. " * 6
    client.completions.create(model=MODEL, prompt=prompt + "First", max_tokens=1,
                              temperature=0)
    again = client.completions.create(model=MODEL, prompt=prompt + "Second", max_tokens=1,
                                      temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens > 0


def test_extra_sampling_fields_and_unknown_fields(client):
    resp = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=6, temperature=0.7, top_p=0.9,
        presence_penalty=0.5, frequency_penalty=0.5, user="user-42",
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True,
                    "min_tokens": 6, "unknown_field": {"x": 1}},
    )
    assert resp.usage.completion_tokens == 6
    assert resp.choices[0].finish_reason == "length"


def test_tokenize_detokenize(server):
    tok = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == MAX_MODEL_LEN
    text = httpx.post(server.url + "/detokenize", json={"tokens": tok["tokens"]}).json()
    assert text["prompt"].endswith("Hello world")
    chat = httpx.post(server.url + "/tokenize", json={"messages": CHAT}).json()
    assert chat["count"] > tok["count"]
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


# ----- errors ----------------------------------------------------------------------------------


def assert_error(exc_info, status, param=None, code=None):
    err = exc_info.value
    assert err.status_code == status
    body = err.body
    assert set(body) >= {"message", "type", "param", "code"}, body
    if param is not None:
        assert body["param"] == param
    if code is not None:
        assert body["code"] == code
    return body


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"max_tokens": -5}, "max_tokens"),
        ({"temperature": 3.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 500}, "n"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}, 5]}, "messages[1]"),
        ({"extra_body": {"min_tokens": 50}, "max_tokens": 5}, "min_tokens"),
        ({"extra_body": {"priority": 3}}, "priority"),
        ({"extra_body": {"top_k": -7}}, "top_k"),
    ],
)
def test_bad_parameters_are_400_naming_the_param(client, kwargs, param):
    kwargs = {"model": MODEL, "messages": CHAT, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**kwargs)
    assert_error(info, 400, param=param)


def test_context_length_exceeded(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5000)
    body = assert_error(info, 400, code="context_length_exceeded")
    assert str(MAX_MODEL_LEN) in body["message"] and "5000" in body["message"]
    long_prompt = "word " * (MAX_MODEL_LEN + 10)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=1)
    assert_error(info, 400, param="prompt", code="context_length_exceeded")


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-5", messages=CHAT, max_tokens=2)
    assert_error(info, 404, param="model", code="model_not_found")


def test_raw_http_errors_are_openai_error_objects(server):
    url = server.url
    cases = [
        httpx.post(url + "/v1/chat/completions", content=b"{oops",
                   headers={"content-type": "application/json"}),
        httpx.post(url + "/v1/completions", json=[1, 2]),
        httpx.post(url + "/v1/completions", json={"prompt": []}),
        httpx.get(url + "/v1/nope"),
        httpx.get(url + "/v1/chat/completions"),
        httpx.delete(url + "/health"),
    ]
    assert [r.status_code for r in cases] == [400, 400, 400, 404, 405, 405]
    for r in cases:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
    assert cases[0].json()["error"]["code"] == "invalid_json"
    assert cases[2].json()["error"]["param"] == "prompt"


def test_bad_requests_never_5xx(server):
    bodies = [
        {}, {"messages": None}, {"messages": [{}]}, {"messages": [{"role": "user",
         "content": [{"type": "text"}]}]}, {"messages": CHAT, "stop": 5},
        {"messages": CHAT, "n": "two"}, {"messages": CHAT, "logprobs": True,
         "top_logprobs": 50}, {"messages": CHAT, "stream_options": "yes", "stream": True},
        {"messages": CHAT, "seed": 1.5}, {"messages": CHAT, "max_tokens": 10**12},
        {"messages": CHAT, "logit_bias": {"1": 500}}, {"messages": CHAT, "stop": [""]},
    ]
    for body in bodies:
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
        assert "error" in r.json()


# ----- load, disconnects, metrics, logs --------------------------------------------------


def test_64_concurrent_streams_and_disconnects(server, offline):
    prompts = [f"Question {i}: what is {i} plus {i}? Answer:" for i in range(64)]
    expected = [o.outputs[0].text for o in offline.generate(prompts, greedy(5), use_tqdm=False)]

    async def stream_one(client, prompt):
        text, finish = "", None
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=5,
                                                 temperature=0, stream=True)
        async for chunk in stream:
            for choice in chunk.choices:
                text += choice.text
                finish = choice.finish_reason or finish
        return text, finish

    def disconnect_one(client, i):
        return stream_then_disconnect(client, MODEL, f"Write a very long essay number {i}.",
                                      chunks=2, max_tokens=400)

    async def main():
        async with server.async_openai() as client:
            results = await asyncio.gather(
                *[stream_one(client, p) for p in prompts],
                *[disconnect_one(client, i) for i in range(8)],
            )
        return results[:64]

    results = asyncio.run(main())
    assert [text for text, _ in results] == expected
    assert all(finish in ("stop", "length") for _, finish in results)
    metrics = server.wait_idle()
    assert metrics["tokenmill_kv_cache_usage_ratio"] == 0
    assert metrics["tokenmill_num_requests_running"] == 0
    assert metrics['tokenmill_requests_finished_total{finish_reason="abort"}'] >= 8


def test_non_streamed_disconnect_aborts(server):
    body = {"model": MODEL, "prompt": "Count to a million:", "max_tokens": 480,
            "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(
            connect=30, read=1.0, write=30, pool=30))
    metrics = server.wait_idle()
    assert metrics["tokenmill_kv_cache_usage_ratio"] == 0
    lines = [json.loads(line) for line in server.log_text().splitlines()
             if line.startswith('{"event": "request"')]
    assert any(line.get("disconnected") and line["status"] == 499 for line in lines)


def test_metrics_and_request_log(server, client):
    client.chat.completions.create(model=MODEL, messages=[
        {"role": "user", "content": SECRET_PROMPT}], max_tokens=2, user="alice")
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "tokenmill_time_to_first_token_seconds_bucket",
        "tokenmill_inter_token_latency_seconds_bucket",
        "tokenmill_time_per_output_token_seconds_bucket",
        "tokenmill_e2e_request_latency_seconds_bucket",
        "tokenmill_request_queue_time_seconds_bucket",
        "tokenmill_request_prompt_tokens_bucket",
        "tokenmill_request_generation_tokens_bucket",
        'tokenmill_requests_finished_total{finish_reason="length"}',
        'tokenmill_http_requests_total{route="/v1/chat/completions",status="200"}',
        'tokenmill_http_requests_total{route="/v1/chat/completions",status="400"}',
        "tokenmill_prompt_tokens_total",
        "tokenmill_generation_tokens_total",
        "tokenmill_preemptions_total",
        "tokenmill_prefix_cache_queries_total",
        "tokenmill_prefix_cache_hits_total",
        "tokenmill_num_requests_running",
        "tokenmill_num_requests_waiting",
        "tokenmill_kv_cache_usage_ratio",
        "tokenmill_server_ready 1.0",
    ):
        assert name in text, name
    log = server.log_text()
    assert SECRET_PROMPT not in log  # no prompt text without --log-prompts
    lines = [json.loads(line) for line in log.splitlines() if line.startswith('{"event"')]
    mine = [line for line in lines if line.get("user") == "alice"]
    assert len(mine) == 1
    entry = mine[0]
    assert entry["status"] == 200 and entry["path"] == "/v1/chat/completions"
    assert entry["completion_tokens"] == 2 and entry["prompt_tokens"] > 0
    assert entry["ttft_s"] >= 0 and entry["total_s"] >= entry["ttft_s"]
    assert entry["finish_reason"] == "length" and "request_id" in entry
    assert "key_id" in entry
