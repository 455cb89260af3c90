"""Per-client rate limits: requests per minute and tokens per minute, as token buckets.

Each client (an API key id, or the client IP when keys are off) owns two buckets that
refill continuously at ``limit / 60`` per second up to ``limit``:

* the *requests* bucket must hold the request's engine requests (one per prompt of a
  completions request, capped at the bucket size like tokens) and is charged them;
* the *tokens* bucket must hold the prompt's tokens (capped at the bucket size, so one
  long prompt can still pass a full bucket) and is charged the prompt at admission and
  the completion when it ends. The completion is charged even if that leaves the
  bucket in debt: the client then waits until it has paid the debt back. Over a
  minute a client therefore spends at most about ``tpm`` prompt + completion tokens.

Two storages share this arithmetic: a dict in process memory, and Redis (a Lua script,
so one replica's read-modify-write cannot interleave with another's, timed by the Redis
server's clock so replicas with skewed clocks still agree). If Redis cannot be reached
the limiter lets requests through and logs a warning: an outage of the limiter should
not become an outage of the service.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

logger = logging.getLogger("tokenmill.server.ratelimit")


@dataclass(frozen=True)
class RateLimits:
    """Configured limits; None (or 0) disables that limit."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.requests_per_minute) or bool(self.tokens_per_minute)


@dataclass(frozen=True)
class RateLimitDecision:
    allowed: bool
    retry_after: float = 0.0  # seconds until the request would be admitted
    limited_by: str | None = None  # "requests" | "tokens" when refused
    remaining_requests: float | None = None
    remaining_tokens: float | None = None

    def headers(self, limits: RateLimits) -> dict[str, str]:
        """OpenAI-style ``x-ratelimit-*`` headers describing the client's budget."""
        out = {}
        if limits.requests_per_minute:
            out["x-ratelimit-limit-requests"] = str(limits.requests_per_minute)
            if self.remaining_requests is not None:
                out["x-ratelimit-remaining-requests"] = str(max(0, int(self.remaining_requests)))
        if limits.tokens_per_minute:
            out["x-ratelimit-limit-tokens"] = str(limits.tokens_per_minute)
            if self.remaining_tokens is not None:
                out["x-ratelimit-remaining-tokens"] = str(max(0, int(self.remaining_tokens)))
        return out

    def message(self, limits: RateLimits) -> str:
        if self.limited_by == "requests":
            what = f"requests per minute (limit {limits.requests_per_minute})"
        else:
            what = f"tokens per minute (limit {limits.tokens_per_minute})"
        return f"Rate limit reached for {what}. Please retry after {self.retry_after:.1f}s."


class RateLimiter(Protocol):
    """What the server needs from a rate-limit storage."""

    limits: RateLimits

    async def acquire(self, identity: str, prompt_tokens: int,
                      num_requests: int = 1) -> RateLimitDecision:
        """Admit (and charge) ``num_requests`` requests with this many prompt tokens in
        all, or refuse them."""
        ...

    async def charge(self, identity: str, tokens: int) -> None:
        """Charge tokens produced after admission (the completion)."""
        ...

    async def close(self) -> None: ...


def decide(
    limits: RateLimits, request_level: float, token_level: float, prompt_tokens: int,
    num_requests: int = 1,
) -> RateLimitDecision:
    """The admission rule, given the buckets' current (refilled) levels. Pure function."""
    rpm, tpm = limits.requests_per_minute or 0, limits.tokens_per_minute or 0
    waits: dict[str, float] = {}
    wanted = min(num_requests, rpm)
    if rpm and request_level < wanted:
        waits["requests"] = (wanted - request_level) / (rpm / 60.0)
    if tpm:
        needed = min(prompt_tokens, tpm)
        if token_level < needed:
            waits["tokens"] = (needed - token_level) / (tpm / 60.0)
    if waits:
        limited_by = max(waits, key=lambda k: waits[k])
        return RateLimitDecision(
            False, waits[limited_by], limited_by,
            request_level if rpm else None, token_level if tpm else None,
        )
    return RateLimitDecision(
        True, 0.0, None,
        request_level - num_requests if rpm else None,
        token_level - prompt_tokens if tpm else None,
    )


@dataclass
class _Bucket:
    capacity: float
    level: float
    updated: float

    def refill(self, now: float) -> float:
        rate = self.capacity / 60.0
        self.level = min(self.capacity, self.level + max(0.0, now - self.updated) * rate)
        self.updated = now
        return self.level


class InMemoryRateLimiter:
    """Buckets in a dict; correct for one server process."""

    # Forget clients whose buckets are full again, every this many acquisitions.
    PRUNE_EVERY = 1024

    def __init__(self, limits: RateLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._buckets: dict[str, tuple[_Bucket, _Bucket]] = {}
        self._acquisitions = 0

    def _buckets_for(self, identity: str, now: float) -> tuple[_Bucket, _Bucket]:
        pair = self._buckets.get(identity)
        if pair is None:
            rpm = float(self.limits.requests_per_minute or 0)
            tpm = float(self.limits.tokens_per_minute or 0)
            pair = (_Bucket(rpm, rpm, now), _Bucket(tpm, tpm, now))
            self._buckets[identity] = pair
        return pair

    async def acquire(self, identity: str, prompt_tokens: int,
                      num_requests: int = 1) -> RateLimitDecision:
        now = self._clock()
        requests, tokens = self._buckets_for(identity, now)
        decision = decide(self.limits, requests.refill(now), tokens.refill(now), prompt_tokens,
                          num_requests)
        if decision.allowed:
            if requests.capacity:
                requests.level -= num_requests
            if tokens.capacity:
                tokens.level -= prompt_tokens
        self._acquisitions += 1
        if self._acquisitions % self.PRUNE_EVERY == 0:
            self._prune(now)
        return decision

    async def charge(self, identity: str, tokens: int) -> None:
        if tokens <= 0 or not self.limits.tokens_per_minute:
            return
        now = self._clock()
        _, bucket = self._buckets_for(identity, now)
        bucket.refill(now)
        bucket.level -= tokens

    def _prune(self, now: float) -> None:
        full = [
            ident for ident, (r, t) in self._buckets.items()
            if r.refill(now) >= r.capacity and t.refill(now) >= t.capacity
        ]
        for ident in full:
            del self._buckets[ident]

    async def close(self) -> None:
        self._buckets.clear()


# Both scripts read the buckets with the refill applied, at the Redis server's time.
# A bucket that does not exist is full; keys expire once their bucket would be full.
_REDIS_COMMON = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function load(key, cap)
  if cap <= 0 then return 0 end
  local v = redis.call('HMGET', key, 'level', 'ts')
  local level = tonumber(v[1])
  if level == nil then return cap end
  local elapsed = now - tonumber(v[2])
  if elapsed < 0 then elapsed = 0 end
  return math.min(cap, level + elapsed * cap / 60)
end
local function store(key, cap, level)
  if cap <= 0 then return end
  redis.call('HSET', key, 'level', string.format('%.6f', level),
             'ts', string.format('%.6f', now))
  redis.call('EXPIRE', key, math.ceil((cap - level) * 60 / cap) + 1)
end
"""

# KEYS: requests bucket, tokens bucket. ARGV: rpm, tpm, prompt tokens, requests.
# Returns {allowed (1/0), retry_after, limited_by, requests level, tokens level}.
_REDIS_ACQUIRE = _REDIS_COMMON + """
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local prompt = tonumber(ARGV[3])
local count = tonumber(ARGV[4])
local req = load(KEYS[1], rpm)
local tok = load(KEYS[2], tpm)
local retry = 0
local limited = ''
local wanted = math.min(count, rpm)
if rpm > 0 and req < wanted then
  retry = (wanted - req) * 60 / rpm
  limited = 'requests'
end
if tpm > 0 then
  local needed = math.min(prompt, tpm)
  if tok < needed then
    local wait = (needed - tok) * 60 / tpm
    if wait > retry then
      retry = wait
      limited = 'tokens'
    end
  end
end
if limited ~= '' then
  return {0, string.format('%.6f', retry), limited,
          string.format('%.6f', req), string.format('%.6f', tok)}
end
req = req - count
tok = tok - prompt
store(KEYS[1], rpm, req)
store(KEYS[2], tpm, tok)
return {1, '0', '', string.format('%.6f', req), string.format('%.6f', tok)}
"""

# KEYS: tokens bucket. ARGV: tpm, tokens to charge.
_REDIS_CHARGE = _REDIS_COMMON + """
local tpm = tonumber(ARGV[1])
local tok = load(KEYS[1], tpm) - tonumber(ARGV[2])
store(KEYS[1], tpm, tok)
return string.format('%.6f', tok)
"""


class RedisRateLimiter:
    """Buckets in Redis, shared by every server replica that points at the same Redis."""

    def __init__(self, limits: RateLimits, url: str, prefix: str = "tokenmill:ratelimit") -> None:
        import redis.asyncio as redis_asyncio  # imported lazily: only needed with Redis

        self.limits = limits
        self.url = url
        self._prefix = prefix
        self._client = redis_asyncio.Redis.from_url(
            url, socket_timeout=2.0, socket_connect_timeout=2.0
        )
        self._acquire = self._client.register_script(_REDIS_ACQUIRE)
        self._charge = self._client.register_script(_REDIS_CHARGE)

    def _keys(self, identity: str) -> list[str]:
        # The hash tag keeps both buckets of a client in one Redis Cluster slot.
        tag = f"{{{self._prefix}:{identity}}}"
        return [f"{tag}:requests", f"{tag}:tokens"]

    async def ping(self) -> None:
        """Raise if Redis cannot be reached (checked once at startup)."""
        await self._client.ping()

    async def acquire(self, identity: str, prompt_tokens: int,
                      num_requests: int = 1) -> RateLimitDecision:
        rpm, tpm = self.limits.requests_per_minute or 0, self.limits.tokens_per_minute or 0
        try:
            allowed, retry, limited, req, tok = await self._acquire(
                keys=self._keys(identity), args=[rpm, tpm, int(prompt_tokens), int(num_requests)]
            )
        except Exception as exc:  # noqa: BLE001 - fail open, see module docstring
            logger.warning("rate limit storage unavailable, admitting request: %s", exc)
            return RateLimitDecision(True)
        limited_by = _text(limited) or None
        return RateLimitDecision(
            bool(int(allowed)), float(_text(retry)), limited_by,
            float(_text(req)) if rpm else None, float(_text(tok)) if tpm else None,
        )

    async def charge(self, identity: str, tokens: int) -> None:
        tpm = self.limits.tokens_per_minute or 0
        if tokens <= 0 or not tpm:
            return
        try:
            await self._charge(keys=self._keys(identity)[1:], args=[tpm, int(tokens)])
        except Exception as exc:  # noqa: BLE001 - fail open
            logger.warning("rate limit storage unavailable, completion not charged: %s", exc)

    async def close(self) -> None:
        await self._client.aclose()


def _text(value: bytes | str | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def create_rate_limiter(limits: RateLimits, storage: str | None) -> RateLimiter | None:
    """The limiter for these flags: None when no limit is set, Redis for redis:// URLs."""
    if not limits.enabled:
        return None
    if storage in (None, "", "memory"):
        return InMemoryRateLimiter(limits)
    if storage.startswith(("redis://", "rediss://", "unix://")):
        return RedisRateLimiter(limits, storage)
    raise ValueError(
        f"unsupported --rate-limit-storage {storage!r}; use 'memory' or redis://host:port"
    )

