"""The HTTP layer against a scripted engine (tests/fake_engine.py): real sockets, real
uvicorn and FastAPI, no model and no engine process. Seconds per test.

Covers each rejection and its status, timeouts, disconnects, drain, engine death,
and the hostile-client defences (body size, JSON depth, lone surrogates, prompt lists,
strict types, slow headers, X-Forwarded-For, bounded log lines).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from typing import Any

import httpx
import pytest
from fake_engine import FakeEngine, running_app

from tokenmill.server.config import ServerConfig
from tokenmill.server.ratelimit import RateLimits

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def run(scenario: Any, config: ServerConfig | None = None, engine: FakeEngine | None = None,
        **engine_kwargs: Any) -> Any:
    """Run ``scenario(client, app, engine)`` against a fresh server."""

    async def main() -> Any:
        fake = engine or FakeEngine(**engine_kwargs)
        async with running_app(config or ServerConfig(), fake) as (url, app):
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                return await scenario(client, app, fake)

    return asyncio.run(main())


def chat(content: str = "hi", **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], **fields}


def error_of(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body


def sse_events(text: str) -> list[Any]:
    events = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ----- the happy path --------------------------------------------------------------------


def test_chat_and_completions_answer_through_the_output_processor():
    async def scenario(client, app, engine):
        resp = await client.post(CHAT, json=chat(max_tokens=5))
        body = resp.json()
        assert resp.status_code == 200
        assert body["choices"][0]["message"]["content"] == "Hello"
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 5
        resp = await client.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 11,
                                                   "stream": True, "stop": [" fr"]})
        events = sse_events(resp.text)
        assert events[-1] == "[DONE]"
        text = "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])
        assert text == "Hello"  # the stop string ended it (and was held back, not sent)
        assert events[-2]["choices"][0]["finish_reason"] == "stop"
        assert engine.aborted == []  # finished normally: nothing left to abort

    run(scenario)


def test_null_max_tokens_in_completions_means_openais_default_of_16():
    async def scenario(client, app, engine):
        resp = await client.post(COMPLETIONS, json={"prompt": "x", "max_tokens": None})
        assert resp.json()["usage"]["completion_tokens"] == 16

    run(scenario)


def test_head_health_and_get_health():
    async def scenario(client, app, engine):
        assert (await client.head("/health")).status_code == 200
        assert (await client.get("/health")).json() == {"status": "ok"}

    run(scenario)


# ----- each rejection, mapped to its status -----------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("max_tokens", "10"), ("n", True), ("stream", "yes"), ("temperature", "0.5"),
    ("logprobs", 1), ("seed", 1.5),
])
def test_wrong_types_are_refused_not_coerced(field, value):
    async def scenario(client, app, engine):
        resp = await client.post(CHAT, json=chat(**{field: value}))
        assert error_of(resp, 400)["param"] == field

    run(scenario)


def test_engine_rejections_name_the_parameter():
    async def scenario(client, app, engine):
        # The prompt alone is longer than the context (fake: 512 tokens, one per byte).
        resp = await client.post(CHAT, json=chat("x" * 600))
        err = error_of(resp, 400)
        assert (err["code"], err["param"]) == ("context_length_exceeded", "messages")
        resp = await client.post(COMPLETIONS, json={"prompt": "abc", "max_tokens": 600})
        err = error_of(resp, 400)
        assert (err["code"], err["param"]) == ("context_length_exceeded", "max_tokens")
        resp = await client.post(CHAT, json=chat(max_completion_tokens=600))
        assert error_of(resp, 400)["param"] == "max_completion_tokens"
        resp = await client.post(COMPLETIONS, json={"prompt": [1, 2, 99999]})
        assert error_of(resp, 400)["param"] == "prompt"
        resp = await client.post(COMPLETIONS, json={"prompt": "x", "model": "nope"})
        assert error_of(resp, 404)["code"] == "model_not_found"
        assert engine.submitted == []  # nothing bad reached the engine

    run(scenario)


def test_kv_capacity_is_a_400():
    async def scenario(client, app, engine):
        resp = await client.post(COMPLETIONS, json={"prompt": "abc", "max_tokens": 100})
        assert error_of(resp, 400)["code"] == "kv_cache_capacity_exceeded"

    run(scenario, num_kv_blocks=4, block_size=16)  # 64 tokens of KV in all


def test_body_over_the_limit_is_413_before_reading_it():
    config = ServerConfig(max_request_body_size=64 << 10)

    async def scenario(client, app, engine):
        resp = await client.post(COMPLETIONS, content=b"{" + b" " * (100 << 10) + b"}",
                                 headers={"content-type": "application/json"})
        err = error_of(resp, 413)
        assert err["code"] == "request_too_large"

        async def chunked():
            for _ in range(100):
                yield b" " * 1024

        resp = await client.post(COMPLETIONS, content=chunked())
        assert error_of(resp, 413)["code"] == "request_too_large"
        assert (await client.get("/health")).status_code == 200

    run(scenario, config)


def test_huge_prompt_is_refused_without_tokenizing_it():
    async def scenario(client, app, engine):
        resp = await client.post(COMPLETIONS, json={"prompt": "word " * 200_000})
        err = error_of(resp, 400)
        assert err["code"] == "context_length_exceeded" and "far longer" in err["message"]

    run(scenario)


def test_deeply_nested_json_is_a_400():
    async def scenario(client, app, engine):
        for depth in (100, 5000):
            body = '{"prompt": "x", "extra": ' + "[" * depth + "]" * depth + "}"
            resp = await client.post(COMPLETIONS, content=body.encode(),
                                     headers={"content-type": "application/json"})
            assert error_of(resp, 400)["code"] == "invalid_json"

    run(scenario)


def test_lone_surrogate_is_a_400_naming_the_field_and_the_connection_survives():
    async def scenario(client, app, engine):
        for body, param in [
            ('{"prompt": "a\\ud800b"}', "prompt"),
            ('{"prompt": "x", "model": "\\udfff"}', "model"),
            ('{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages[0].content"),
        ]:
            path = CHAT if "messages" in body else COMPLETIONS
            resp = await client.post(path, content=body.encode(),
                                     headers={"content-type": "application/json"})
            assert error_of(resp, 400)["param"] == param
        # The same keep-alive connection still serves requests.
        resp = await client.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 2})
        assert resp.status_code == 200

    run(scenario)


def test_prompt_lists_are_capped_and_each_prompt_is_counted():
    config = ServerConfig(max_prompts_per_request=4, max_queued_requests=3,
                          rate_limits=RateLimits(requests_per_minute=6))

    async def scenario(client, app, engine):
        resp = await client.post(COMPLETIONS, json={"prompt": ["a"] * 5})
        err = error_of(resp, 400)
        assert err["param"] == "prompt" and "At most 4" in err["message"]
        engine.hold()
        first = asyncio.ensure_future(client.post(COMPLETIONS, json={"prompt": ["a", "b"]}))
        while len(engine.submitted) < 2:
            await asyncio.sleep(0.01)
        # Two queued; two more prompts would make four of three places.
        resp = await client.post(COMPLETIONS, json={"prompt": ["a", "b"]})
        assert error_of(resp, 503)["code"] == "server_overloaded"
        assert resp.headers["retry-after"]
        engine.release()
        assert (await first).status_code == 200
        # The rate limit counts prompts: 2 spent, 4 left; a 4-prompt request passes,
        # then nothing is left for even one more prompt.
        assert (await client.post(COMPLETIONS, json={"prompt": ["a"] * 4})).status_code == 200
        resp = await client.post(COMPLETIONS, json={"prompt": "a"})
        assert error_of(resp, 429)["code"] == "rate_limit_exceeded"

    run(scenario, config)


def test_queue_bound_counts_live_not_a_step_old():
    config = ServerConfig(max_queued_requests=2)

    async def scenario(client, app, engine):
        engine.running_limit = 2
        engine.interval = 0.02
        body = {"prompt": "x", "max_tokens": 20}
        tasks = []
        for expected_running, expected_queued in ((1, 0), (2, 0), (2, 1), (2, 2)):
            tasks.append(asyncio.ensure_future(client.post(COMPLETIONS, json=body)))
            while (engine.num_running, engine.num_queued()) != (expected_running,
                                                                 expected_queued):
                await asyncio.sleep(0.005)
        # Two run, two wait: the queue is full right now...
        resp = await client.post(COMPLETIONS, json=body)
        assert error_of(resp, 503)["code"] == "server_overloaded"
        # ...and has room again as soon as the engine starts the waiting ones.
        await asyncio.gather(*tasks[:2])
        while engine.num_queued():
            await asyncio.sleep(0.005)
        assert (await client.post(COMPLETIONS, json=body)).status_code == 200
        assert all(r.status_code == 200 for r in await asyncio.gather(*tasks))

    run(scenario, config)


def test_request_timeout_is_408_or_an_error_event_and_aborts():
    config = ServerConfig(request_timeout=0.3)

    async def scenario(client, app, engine):
        body = {"prompt": "x", "max_tokens": 200}
        resp = await client.post(COMPLETIONS, json=body)
        assert error_of(resp, 408)["code"] == "request_timeout"
        resp = await client.post(COMPLETIONS, json={**body, "stream": True})
        events = sse_events(resp.text)
        assert events[-2]["error"]["code"] == "request_timeout" and events[-1] == "[DONE]"
        assert len(engine.aborted) == 2 and not engine.requests

    run(scenario, config, interval=0.01)


def test_client_disconnect_aborts_the_request():
    async def scenario(client, app, engine):
        body = {"prompt": "x", "max_tokens": 400}
        with pytest.raises(httpx.ReadTimeout):
            await client.post(COMPLETIONS, json=body, timeout=httpx.Timeout(30, read=0.2))
        async with client.stream("POST", COMPLETIONS, json={**body, "stream": True}) as resp:
            async for _ in resp.aiter_lines():
                break
        for _ in range(500):
            if len(engine.aborted) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(engine.aborted) == 2 and not engine.requests

    run(scenario, interval=0.01)


def test_drain_finishes_running_requests_and_refuses_new_ones():
    async def scenario(client, app, engine):
        host = app.state.host
        running = asyncio.ensure_future(client.post(COMPLETIONS, json={"prompt": "x",
                                                                      "max_tokens": 30}))
        while not engine.submitted:
            await asyncio.sleep(0.01)
        done = asyncio.Event()
        host.start_drain(30, done.set)
        resp = await client.get("/health")
        assert error_of(resp, 503)["code"] == "server_draining"
        resp = await client.post(COMPLETIONS, json={"prompt": "x"})
        assert error_of(resp, 503)["code"] == "server_draining"
        assert (await running).status_code == 200
        await asyncio.wait_for(done.wait(), 10)

    run(scenario, interval=0.01)


def test_engine_death_fails_requests_turns_unhealthy_and_exits():
    async def scenario(client, app, engine):
        stream_req = client.stream("POST", COMPLETIONS,
                                   json={"prompt": "x", "max_tokens": 400, "stream": True})
        async with stream_req as resp:
            lines = resp.aiter_lines()
            async for line in lines:
                if line.startswith("data:"):
                    break
            engine.die()
            rest = [line async for line in lines]
        events = sse_events("\n".join(rest))
        assert events[-2]["error"]["code"] == "engine_dead" and events[-1] == "[DONE]"
        resp = await client.get("/health")
        assert error_of(resp, 503)["code"] == "engine_dead"
        resp = await client.post(COMPLETIONS, json={"prompt": "x"})
        assert error_of(resp, 503)["code"] == "engine_dead"
        await asyncio.wait_for(app.state.fatal.wait(), 10)  # the server exits non-zero

    run(scenario, interval=0.01)


# ----- connections, proxies, logs --------------------------------------------------------


def test_slow_headers_are_timed_out():
    config = ServerConfig(header_timeout=0.5)

    async def scenario(client, app, engine):
        port = int(str(client.base_url).rsplit(":", 1)[1].rstrip("/"))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # never finished
        await writer.drain()
        start = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server
        assert time.monotonic() - start < 10
        writer.close()
        assert (await client.get("/health")).status_code == 200

    run(scenario, config)


def _rate_limited_by_ip(config: ServerConfig) -> list[int]:
    async def scenario(client, app, engine):
        statuses = []
        for fake_ip in ("10.0.0.1", "10.0.0.2"):
            resp = await client.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 1},
                                     headers={"X-Forwarded-For": fake_ip})
            statuses.append(resp.status_code)
        return statuses

    return run(scenario, config)


def test_x_forwarded_for_is_trusted_only_from_named_proxies():
    limits = RateLimits(requests_per_minute=1)
    # Untrusted: both requests come from 127.0.0.1 whatever the header says.
    assert _rate_limited_by_ip(ServerConfig(rate_limits=limits)) == [200, 429]
    trusted = ServerConfig(rate_limits=limits, forwarded_allow_ips=("127.0.0.1",))
    assert _rate_limited_by_ip(trusted) == [200, 200]


def test_every_request_gets_one_bounded_log_line(caplog):
    async def scenario(client, app, engine):
        with caplog.at_level(logging.INFO, logger="tokenmill.access"):
            await client.post(COMPLETIONS, content=b'{"prompt": "x", "user": "\\ud800"}',
                              headers={"content-type": "application/json"})
            await client.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 1,
                                                 "user": "u" * 100_000})
            await asyncio.sleep(0.05)
        lines = [r.getMessage() for r in caplog.records if r.name == "tokenmill.access"]
        return lines

    lines = run(scenario)
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["status"] == 400
    assert second["status"] == 200 and len(lines[1]) < 2000


def test_protect_metrics_without_keys_is_refused():
    with pytest.raises(ValueError, match="protect-metrics"):
        ServerConfig(protect_metrics=True)


def test_health_answers_while_a_big_prompt_is_tokenized():
    config = ServerConfig(max_request_body_size=8 << 20)

    async def scenario(client, app, engine):
        # Long enough to take a while, short enough to pass the length pre-check.
        prompt = "ab " * 60_000
        big = asyncio.ensure_future(client.post(COMPLETIONS, json={"prompt": prompt}))
        probes = 0
        while not big.done():
            assert (await client.get("/health")).status_code == 200
            probes += 1
        assert big.result().status_code == 400  # 180k tokens do not fit 512
        return probes

    assert run(scenario, config) >= 1


def test_server_config_rejects_nonsense():
    for bad in ({"max_prompts_per_request": 0}, {"max_request_body_size": 10},
                {"header_timeout": 0}):
        with pytest.raises(ValueError):
            dataclasses.replace(ServerConfig(), **bad)



def test_render_endpoints_give_vllm_shaped_token_ids_and_live_stays_up():
    async def scenario(client, app, engine):
        resp = await client.post("/v1/chat/completions/render", json=chat("hello"))
        body = resp.json()
        assert resp.status_code == 200 and body["request_id"].startswith("chatcmpl-")
        want = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": "hello"}]), add_special_tokens=False)
        assert body["token_ids"] == want
        resp = await client.post("/v1/completions/render", json={"prompt": ["ab", "cd"]})
        assert [r["token_ids"] for r in resp.json()] == [engine.tokenizer.encode(t)
                                                         for t in ("ab", "cd")]
        resp = await client.post("/v1/completions/render", json={"prompt": [[1, 2], [3]]})
        assert [r["token_ids"] for r in resp.json()] == [[1, 2], [3]]
        assert engine.submitted == []  # nothing ran
        done = asyncio.Event()
        app.state.host.start_drain(5, done.set)
        assert (await client.get("/health")).status_code == 503
        assert (await client.get("/live")).status_code == 200  # draining, still alive
        await asyncio.wait_for(done.wait(), 10)

    run(scenario)
