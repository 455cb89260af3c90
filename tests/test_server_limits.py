"""Flow control of a real server: API keys, in-memory rate limits, priority scheduling,
a bounded queue and request timeouts."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
from server_utils import start_server

KEYS = {"auth": "k-auth-1111", "rpm": "k-rpm-2222", "tpm": "k-tpm-3333", "prio": "k-prio-4444"}
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 25  # about 250 tokens


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text("# test keys\n" + "\n".join(KEYS.values()) + "\n")
    proc = start_server([
        "--api-key-file", str(key_file), "--api-key", "k-extra", "--protect-metrics",
        "--rate-limit-rpm", "3", "--rate-limit-tpm", "300",
        "--scheduling-policy", "priority", "--max-num-seqs", "1",
        # A KV cache smaller than the context: about 350 tokens.
        "--max-model-len", "512", "--kv-cache-memory", "16MiB",
    ])
    yield proc
    proc.cleanup()


@pytest.fixture(scope="module")
def busy_server():
    """One request at a time, at most one waiting, and a short request timeout."""
    proc = start_server([
        "--max-num-seqs", "1", "--max-queued-requests", "1", "--request-timeout", "3",
        "--max-model-len", "2048", "--kv-cache-memory", "128MiB",
    ])
    yield proc
    proc.cleanup()


def model_of(server, key):
    return server.openai(api_key=key).models.list().data[0].id


# ----- API keys ------------------------------------------------------------------------------


def test_missing_or_wrong_key_is_401(keyed_server):
    with pytest.raises(openai.AuthenticationError) as info:
        keyed_server.openai(api_key="wrong").models.list()
    assert info.value.body["code"] == "invalid_api_key"
    r = httpx.post(keyed_server.url + "/v1/chat/completions", json={"messages": []})
    assert r.status_code == 401
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.post(keyed_server.url + "/tokenize", json={"prompt": "hi"},
                   headers={"X-API-Key": KEYS["auth"]})
    assert r.status_code == 200
    ok = keyed_server.openai(api_key="k-extra").models.list()
    assert len(ok.data) == 1


def test_health_open_metrics_protected(keyed_server):
    assert httpx.get(keyed_server.url + "/health").status_code == 200
    assert httpx.get(keyed_server.url + "/metrics").status_code == 401
    r = httpx.get(keyed_server.url + "/metrics",
                  headers={"Authorization": f"Bearer {KEYS['auth']}"})
    assert r.status_code == 200 and "tokenmill_kv_cache_usage_ratio" in r.text


def test_request_larger_than_kv_cache_is_400(keyed_server):
    client = keyed_server.openai(api_key=KEYS["auth"])
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="", prompt="Hi", max_tokens=480)
    assert info.value.body["code"] == "kv_cache_capacity_exceeded"


# ----- rate limits (in memory) ---------------------------------------------------------------


async def _completions(server, key, prompt, count, **kwargs):
    """Send ``count`` requests at once; return responses or exceptions."""
    async with server.async_openai(api_key=key) as client:
        return await asyncio.gather(
            *[client.completions.with_raw_response.create(
                model="", prompt=prompt, max_tokens=1, temperature=0, **kwargs)
              for _ in range(count)],
            return_exceptions=True,
        )


def test_requests_per_minute(keyed_server):
    # Sent together, so the bucket (3 per minute, refilling one per 20 s) cannot refill
    # in between: exactly three pass.
    results = asyncio.run(_completions(keyed_server, KEYS["rpm"], "Hi", 5))
    passed = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(passed) == 3 and len(refused) == 2, results
    assert passed[0].headers["x-ratelimit-limit-requests"] == "3"
    err = refused[0]
    assert err.body["code"] == "rate_limit_exceeded" and "requests" in err.body["message"]
    assert int(err.response.headers["retry-after"]) >= 1
    # Another key has its own budget.
    other = asyncio.run(_completions(keyed_server, KEYS["auth"], "Hi", 1))
    assert not isinstance(other[0], Exception)


def test_tokens_per_minute(keyed_server):
    count = httpx.post(keyed_server.url + "/tokenize", json={"prompt": LONG_PROMPT},
                       headers={"X-API-Key": KEYS["tpm"]}).json()["count"]
    assert 160 < count <= 300
    results = asyncio.run(_completions(keyed_server, KEYS["tpm"], LONG_PROMPT, 2))
    passed = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(passed) == 1 and len(refused) == 1, results
    assert "tokens per minute" in refused[0].body["message"]
    assert refused[0].response.headers["x-ratelimit-limit-tokens"] == "300"


# ----- priority --------------------------------------------------------------------------


def test_priority_orders_the_queue(keyed_server):
    """One request runs at a time; of two waiting ones, the lower priority value goes first."""
    url = keyed_server.url + "/v1/completions"
    headers = {"Authorization": f"Bearer {KEYS['prio']}"}
    finished: list[str] = []
    first_token, release = threading.Event(), threading.Event()

    def waiting() -> float:
        return keyed_server.metrics(headers)["tokenmill_num_requests_waiting"]

    def wait_for_waiting(count: int) -> None:
        deadline = time.monotonic() + 300
        while waiting() < count:
            assert time.monotonic() < deadline, "requests never reached the queue"
            time.sleep(0.05)

    def blocker():
        body = {"prompt": "Tell me everything.", "max_tokens": 300, "temperature": 0,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url, json=body, headers=headers, timeout=600) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    first_token.set()
                if release.is_set():
                    break  # disconnect: the engine aborts the blocker

    def run(name, priority):
        body = {"prompt": f"Tell me about {name}.", "max_tokens": 2, "temperature": 0,
                "priority": priority}
        r = httpx.post(url, json=body, headers=headers, timeout=600)
        assert r.status_code == 200, r.text
        finished.append(name)

    threads = [threading.Thread(target=blocker)]
    threads[0].start()
    assert first_token.wait(600)
    threads.append(threading.Thread(target=run, args=("low", 5)))
    threads[-1].start()
    wait_for_waiting(1)  # "low" is queued first...
    threads.append(threading.Thread(target=run, args=("high", -5)))
    threads[-1].start()
    wait_for_waiting(2)  # ...then "high", with the smaller priority value
    release.set()
    for thread in threads:
        thread.join(600)
    assert finished == ["high", "low"]


def test_priority_needs_the_priority_policy(busy_server):
    r = httpx.post(busy_server.url + "/v1/completions",
                   json={"prompt": "hi", "max_tokens": 1, "priority": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority"


# ----- timeouts and the bounded queue --------------------------------------------------------

LONG_RUN = {"prompt": "Count slowly:", "max_tokens": 2000, "temperature": 0, "ignore_eos": True}


def test_request_timeout_aborts_and_frees(busy_server):
    client = busy_server.openai()
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model="", prompt=LONG_RUN["prompt"], max_tokens=2000,
                                  temperature=0, extra_body={"ignore_eos": True})
    assert info.value.status_code == 408
    assert info.value.body["code"] == "request_timeout"
    metrics = busy_server.wait_idle()
    assert metrics["tokenmill_kv_cache_usage_ratio"] == 0
    assert metrics['tokenmill_requests_finished_total{finish_reason="timeout"}'] >= 1


def test_streamed_timeout_sends_error_event(busy_server):
    with httpx.stream("POST", busy_server.url + "/v1/completions",
                      json={**LONG_RUN, "stream": True}, timeout=600) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][len("data: "):])
    assert error["error"]["code"] == "request_timeout"
    assert busy_server.wait_idle()["tokenmill_kv_cache_usage_ratio"] == 0


def test_full_queue_is_503_with_retry_after(busy_server):
    async def send_all():
        async with busy_server.async_openai() as client:
            return await asyncio.gather(*[
                client.completions.create(model="", prompt=LONG_RUN["prompt"], max_tokens=2000,
                                          temperature=0, extra_body={"ignore_eos": True})
                for _ in range(4)
            ], return_exceptions=True)

    errors = asyncio.run(send_all())
    # One request runs, one may wait; the rest are refused. Nothing finishes within 3 s.
    assert all(isinstance(e, openai.APIStatusError) for e in errors), errors
    statuses = sorted(e.status_code for e in errors)
    assert set(statuses) <= {408, 503} and 503 in statuses and 408 in statuses, statuses
    for err in errors:
        if err.status_code == 503:
            assert isinstance(err, openai.InternalServerError)  # how openai maps 503
            assert err.body["code"] == "server_overloaded"
            assert int(err.response.headers["retry-after"]) >= 1
    metrics = busy_server.wait_idle()
    assert metrics["tokenmill_kv_cache_usage_ratio"] == 0
    assert metrics['tokenmill_rejected_requests_total{reason="server_overloaded"}'] >= 1
