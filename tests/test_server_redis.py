"""Rate limits stored in a real Redis server: the limiter itself, and two server
processes that share one budget through it."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from server_utils import RedisProcess, ServerProcess, free_port

from tokenmill.server.ratelimit import RateLimits, RedisRateLimiter


@pytest.fixture(scope="module")
def redis_server():
    proc = RedisProcess()
    yield proc
    proc.stop()


def limiter_run(url, limits, steps):
    """Run ``steps(limiter)`` (a coroutine function) against a fresh limiter."""

    async def main():
        limiter = RedisRateLimiter(limits, url, prefix=f"test-{free_port()}")
        try:
            await limiter.ping()
            return await steps(limiter)
        finally:
            await limiter.close()

    return asyncio.run(main())


def test_redis_requests_bucket(redis_server):
    async def steps(limiter):
        return [await limiter.acquire("client", 5) for _ in range(4)]

    results = limiter_run(redis_server.url, RateLimits(requests_per_minute=3), steps)
    assert [r.allowed for r in results] == [True, True, True, False]
    assert results[0].remaining_requests == pytest.approx(2, abs=0.01)
    assert results[3].limited_by == "requests"
    assert results[3].retry_after == pytest.approx(20, abs=0.5)  # one request per 20 s


def test_redis_tokens_bucket_and_debt(redis_server):
    async def steps(limiter):
        first = await limiter.acquire("client", 100)
        await limiter.charge("client", 900)  # completion: 400 tokens of debt
        second = await limiter.acquire("client", 100)
        other = await limiter.acquire("other-client", 100)
        return first, second, other

    first, second, other = limiter_run(
        redis_server.url, RateLimits(tokens_per_minute=600), steps)
    assert first.allowed and first.remaining_tokens == pytest.approx(500, abs=0.1)
    assert not second.allowed and second.limited_by == "tokens"
    assert second.retry_after == pytest.approx(50, abs=0.5)  # -400 -> 100 at 10/s
    assert other.allowed


def test_redis_keys_expire(redis_server):
    import redis

    async def steps(limiter):
        await limiter.acquire("client", 10)
        return limiter._keys("client")

    keys = limiter_run(redis_server.url, RateLimits(60, 600), steps)
    direct = redis.Redis.from_url(redis_server.url)
    try:
        ttls = [direct.ttl(k) for k in keys]
    finally:
        direct.close()
    assert all(0 < ttl <= 62 for ttl in ttls), ttls


def test_unreachable_redis_fails_open():
    async def steps(limiter):
        return await limiter.acquire("client", 10)

    async def main():
        limiter = RedisRateLimiter(RateLimits(1), f"redis://127.0.0.1:{free_port()}")
        try:
            return await steps(limiter)
        finally:
            await limiter.close()

    assert asyncio.run(main()).allowed


def test_two_servers_share_one_budget(redis_server):
    args = ["--rate-limit-rpm", "2", "--rate-limit-storage", redis_server.url,
            "--api-key", "shared-key", "--max-model-len", "256", "--kv-cache-memory", "64MiB"]
    servers = [ServerProcess(args), ServerProcess(args)]  # load both models at once
    try:
        for server in servers:
            server.wait_ready()

        async def send_all():
            headers = {"Authorization": "Bearer shared-key"}
            body = {"prompt": "Hi", "max_tokens": 1}
            async with httpx.AsyncClient(timeout=600, headers=headers) as client:
                # Together, so the bucket (2 per minute) cannot refill in between.
                return await asyncio.gather(*[
                    client.post(servers[i % 2].url + "/v1/completions", json=body)
                    for i in range(4)
                ])

        statuses = sorted(r.status_code for r in asyncio.run(send_all()))
        # Each server alone would admit 2; together they admit 2 in all.
        assert statuses == [200, 200, 429, 429]
    finally:
        for server in servers:
            server.cleanup()
