"""Soak test: many clients, some hostile, against a real `tokenmill serve` on 127.0.0.1.

For ``--duration`` seconds:

- ``--concurrency`` streaming clients send seeded (sampled) and greedy requests, and
  some of them hang up after a few chunks on purpose;
- one client works through a fixed catalogue of bad input (malformed, deep or
  surrogate-laden JSON, wrong types, oversized bodies and prompts, unknown models and
  routes, missing keys, too many prompts, half-sent headers...);
- every ``--burst-every`` seconds a burst of non-streamed requests goes over the
  queue bound (``--max-queued-requests``): they must queue or get 503, nothing else;
- one API key hammers the server past its per-minute request limit (429s);
- a prober times ``/health`` every 50 ms.

Then the load stops, the server must settle with no KV block in use, every seeded
request that ran uninterrupted is run again alone and must give the same text, and a
SIGTERM with streams in flight must drain them and exit 0.

It prints requests by status and the goals (all 0 but the health p99):
5xx caused by bad input, KV blocks in use after settling, responses cut other than
deliberately, seeded outputs that differ from the same request alone. Exit status 1
if a goal is missed.

    python benchmarks/soak.py                        # 10 minutes (the documented run)
    python benchmarks/soak.py --duration 30 --concurrency 16   # the short CI run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from server_utils import ServerProcess  # noqa: E402

PROMPTS = [
    "Write one sentence about the sea.", "Name three colors.", "What is two plus two?",
    "Describe a cat in five words.", "Give me a fruit.", "Say hello in French.",
    "What day comes after Monday?", "Tell me a fun fact about bees.",
]
SEEDS = [1, 2, 3]


@dataclass
class Tally:
    statuses: Counter = field(default_factory=Counter)
    bad_input_5xx: list[str] = field(default_factory=list)
    bad_input_unexpected: list[str] = field(default_factory=list)
    cut: list[str] = field(default_factory=list)
    deliberate_cuts: int = 0
    seeded: dict[tuple[str, int, int], set[str]] = field(default_factory=dict)
    uninterrupted: int = 0
    health: list[float] = field(default_factory=list)
    health_failures: int = 0


def chat_body(prompt: str, seed: int | None, max_tokens: int, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}],
                            "max_tokens": max_tokens, "stream": stream}
    if seed is None:
        body["temperature"] = 0
    else:
        body.update(temperature=0.8, seed=seed)
    return body


# ----- well-behaved streaming clients ---------------------------------------------------


async def streaming_client(url: str, key: str, args: argparse.Namespace, tally: Tally,
                           stop: asyncio.Event, rng: random.Random) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as client:
        while not stop.is_set():
            prompt = rng.choice(PROMPTS)
            seed = rng.choice([None, *SEEDS])
            hang_up_after = rng.randint(1, 3) if rng.random() < args.disconnect_rate else None
            body = chat_body(prompt, seed, args.max_tokens, stream=True)
            text, finished, done = [], None, False
            try:
                async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
                    tally.statuses[resp.status_code] += 1
                    if resp.status_code != 200:
                        await resp.aread()
                        if resp.status_code not in (429, 503):
                            tally.cut.append(f"stream status {resp.status_code}")
                        await asyncio.sleep(0.2)
                        continue
                    chunks = 0
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        data = line[6:]
                        if data == "[DONE]":
                            done = True
                            break
                        event = json.loads(data)
                        if "error" in event:
                            tally.cut.append(f"error event {event['error'].get('code')}")
                            break
                        for choice in event["choices"]:
                            text.append(choice["delta"].get("content") or "")
                            finished = choice.get("finish_reason") or finished
                        chunks += 1
                        if hang_up_after is not None and chunks >= hang_up_after:
                            break
            except httpx.HTTPError as exc:
                tally.cut.append(f"transport {type(exc).__name__}")
                continue
            if hang_up_after is not None and not done:
                tally.deliberate_cuts += 1
                continue
            if not done or finished is None:
                tally.cut.append("stream ended without [DONE] and a finish_reason")
                continue
            tally.uninterrupted += 1
            tally.seeded.setdefault((prompt, seed if seed is not None else -1,
                                     args.max_tokens), set()).add("".join(text))


# ----- hostile input ----------------------------------------------------------------------

def catalogue(args: argparse.Namespace) -> list[tuple[str, str, str, bytes | None,
                                                       dict[str, str], set[int]]]:
    """(name, method, path, body, extra headers, acceptable statuses)."""
    ok_chat = json.dumps(chat_body("hi", None, 2, False))
    json_h = {"content-type": "application/json"}
    entries = [
        ("not json", "POST", "/v1/chat/completions", b"{nope", json_h, {400}),
        ("json array", "POST", "/v1/completions", b"[1, 2]", json_h, {400}),
        ("lone surrogate in prompt", "POST", "/v1/completions",
         b'{"prompt": "a\\ud800"}', json_h, {400}),
        ("lone surrogate in model", "POST", "/v1/chat/completions",
         ok_chat.replace('"max_tokens"', '"model": "\\udc00", "max_tokens"').encode(), json_h,
         {400}),
        ("nested 1000 deep", "POST", "/v1/completions",
         b'{"prompt": "x", "extra": ' + b"[" * 1000 + b"]" * 1000 + b"}", json_h, {400}),
        ("body over the limit", "POST", "/v1/completions",
         json.dumps({"prompt": "y" * (5 << 20)}).encode(), json_h, {413}),
        ("prompt far over the context", "POST", "/v1/completions",
         json.dumps({"prompt": "word " * 600_000}).encode(), json_h, {400}),
        ("string max_tokens", "POST", "/v1/chat/completions",
         ok_chat.replace('"max_tokens": 2', '"max_tokens": "10"').encode(), json_h, {400}),
        ("bool n", "POST", "/v1/completions", b'{"prompt": "x", "n": true}', json_h, {400}),
        ("negative max_tokens", "POST", "/v1/completions",
         b'{"prompt": "x", "max_tokens": -5}', json_h, {400}),
        ("temperature 5", "POST", "/v1/completions", b'{"prompt": "x", "temperature": 5}',
         json_h, {400}),
        ("max_tokens past the context", "POST", "/v1/completions",
         b'{"prompt": "x", "max_tokens": 1000000}', json_h, {400}),
        ("unknown model", "POST", "/v1/completions", b'{"prompt": "x", "model": "gpt-9"}',
         json_h, {404}),
        ("too many prompts", "POST", "/v1/completions",
         json.dumps({"prompt": ["x"] * 500}).encode(), json_h, {400}),
        ("token id out of range", "POST", "/v1/completions",
         b'{"prompt": [1, 2, 999999999]}', json_h, {400}),
        ("empty messages", "POST", "/v1/chat/completions", b'{"messages": []}', json_h, {400}),
        ("bad role", "POST", "/v1/chat/completions",
         b'{"messages": [{"role": "wizard", "content": "x"}]}', json_h, {400}),
        ("image part", "POST", "/v1/chat/completions",
         b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', json_h,
         {400}),
        ("GET on a POST route", "GET", "/v1/completions", None, {}, {405}),
        ("unknown route", "POST", "/v1/nothing", b"{}", json_h, {404}),
    ]
    out = []
    for name, method, path, body, headers, statuses in entries:
        out.append((name, method, path, body, {**headers, "Authorization": f"Bearer {args.key}"},
                    statuses))
    out.append(("no key", "POST", "/v1/completions", b'{"prompt": "x"}', json_h, {401}))
    out.append(("wrong key", "POST", "/v1/completions", b'{"prompt": "x"}',
                {**json_h, "Authorization": "Bearer wrong"}, {401}))
    return out


async def hostile_client(url: str, args: argparse.Namespace, tally: Tally,
                         stop: asyncio.Event) -> None:
    entries = catalogue(args)
    port = int(url.rsplit(":", 1)[1])
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        i = 0
        while not stop.is_set():
            name, method, path, body, headers, expected = entries[i % len(entries)]
            i += 1
            try:
                resp = await client.request(method, path, content=body, headers=headers)
                status = resp.status_code
            except httpx.HTTPError as exc:
                tally.bad_input_unexpected.append(f"{name}: {type(exc).__name__}")
                continue
            tally.statuses[status] += 1
            if status >= 500:
                tally.bad_input_5xx.append(f"{name}: {status}")
            elif status not in expected:
                tally.bad_input_unexpected.append(f"{name}: {status} (wanted {expected})")
            if i % len(entries) == 0:
                await slow_headers(port, tally)
            await asyncio.sleep(0.05)


async def slow_headers(port: int, tally: Tally) -> None:
    """Half a request, then silence: the server must close the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    await writer.drain()
    try:
        closed = await asyncio.wait_for(reader.read(), 60) == b""
    except asyncio.TimeoutError:
        closed = False
    writer.close()
    if not closed:
        tally.bad_input_unexpected.append("slow headers: connection not closed in 60 s")


async def burst_client(url: str, args: argparse.Namespace, tally: Tally,
                       stop: asyncio.Event) -> None:
    headers = {"Authorization": f"Bearer {args.burst_key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as client:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), args.burst_every)
            except asyncio.TimeoutError:
                pass
            if stop.is_set():
                return
            body = chat_body(random.choice(PROMPTS), None, 4, stream=False)
            results = await asyncio.gather(
                *(client.post("/v1/chat/completions", json=body)
                  for _ in range(args.max_queued_requests + 16)),
                return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    tally.cut.append(f"burst transport {type(r).__name__}")
                    continue
                tally.statuses[r.status_code] += 1
                if r.status_code not in (200, 429, 503):
                    tally.cut.append(f"burst status {r.status_code}")


async def rate_limited_client(url: str, args: argparse.Namespace, tally: Tally,
                              stop: asyncio.Event) -> None:
    """One key, many requests at once: it must be refused with 429 + Retry-After."""
    headers = {"Authorization": f"Bearer {args.limited_key}"}
    seen: Counter = Counter()
    body = {"prompt": "x", "max_tokens": 1}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as client:
        while not stop.is_set():
            results = await asyncio.gather(
                *(client.post("/v1/completions", json=body) for _ in range(20)),
                return_exceptions=True)
            for resp in results:
                if isinstance(resp, BaseException):
                    tally.cut.append(f"rate-limited key transport {type(resp).__name__}")
                    continue
                tally.statuses[resp.status_code] += 1
                seen[resp.status_code] += 1
                if resp.status_code == 429 and "retry-after" not in resp.headers:
                    tally.cut.append("429 without Retry-After")
                if resp.status_code not in (200, 429, 503):
                    tally.cut.append(f"rate-limited key got {resp.status_code}")
            await asyncio.sleep(1.0)
    if not seen[429]:
        tally.cut.append("the rate-limited key was never limited")


async def prober(url: str, tally: Tally, stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                resp = await client.get("/health")
                if resp.status_code != 200:
                    tally.health_failures += 1
            except httpx.HTTPError:
                tally.health_failures += 1
            tally.health.append(time.perf_counter() - t0)
            await asyncio.sleep(0.05)


# ----- phases ---------------------------------------------------------------------------------


async def load_phase(url: str, keys: list[str], args: argparse.Namespace, tally: Tally) -> None:
    stop = asyncio.Event()
    rng = random.Random(args.seed)
    tasks = [asyncio.create_task(streaming_client(url, keys[i], args, tally, stop,
                                                  random.Random(rng.random())))
             for i in range(args.concurrency)]
    tasks += [asyncio.create_task(hostile_client(url, args, tally, stop)),
              asyncio.create_task(burst_client(url, args, tally, stop)),
              asyncio.create_task(rate_limited_client(url, args, tally, stop)),
              asyncio.create_task(prober(url, tally, stop))]
    await asyncio.sleep(args.duration)
    stop.set()
    await asyncio.gather(*tasks)


def alone_mismatches(url: str, args: argparse.Namespace, tally: Tally) -> list[str]:
    """Run every seeded request again, alone; its text must match what the load run got."""
    headers = {"Authorization": f"Bearer {args.key}"}
    bad = []
    with httpx.Client(base_url=url, headers=headers, timeout=600) as client:
        for (prompt, seed, max_tokens), texts in sorted(tally.seeded.items()):
            body = chat_body(prompt, None if seed == -1 else seed, max_tokens, stream=False)
            resp = client.post("/v1/chat/completions", json=body)
            resp.raise_for_status()
            alone = resp.json()["choices"][0]["message"]["content"]
            for text in texts:
                if text != alone:
                    bad.append(f"{prompt!r} seed {seed}: {text!r} != alone {alone!r}")
    return bad


def sigterm_drain(server: ServerProcess, args: argparse.Namespace) -> list[str]:
    """SIGTERM with streams in flight: they must finish cleanly, the process exit 0."""
    problems: list[str] = []

    async def one(client: httpx.AsyncClient, started: asyncio.Event) -> None:
        body = chat_body("Tell me a story.", 7, args.max_tokens, stream=True)
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            lines = []
            async for line in resp.aiter_lines():
                if line:
                    lines.append(line)
                    started.set()
        if not lines or lines[-1] != "data: [DONE]" or any('"error"' in ln for ln in lines):
            problems.append(f"drained stream ended badly: {lines[-2:]}")

    async def main() -> None:
        headers = {"Authorization": f"Bearer {args.key}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers,
                                     timeout=600) as client:
            started = [asyncio.Event() for _ in range(4)]
            tasks = [asyncio.create_task(one(client, e)) for e in started]
            await asyncio.gather(*(e.wait() for e in started))
            server.signal(signal.SIGTERM)
            await asyncio.gather(*tasks)

    asyncio.run(main())
    code = server.wait_exit(300)
    if code != 0:
        problems.append(f"exit status {code} after SIGTERM")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--disconnect-rate", type=float, default=0.15)
    parser.add_argument("--burst-every", type=float, default=20.0)
    parser.add_argument("--max-queued-requests", type=int, default=32)
    parser.add_argument("--rate-limit-rpm", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    args, engine_flags = parser.parse_known_args()

    keys = [f"soak-key-{i}" for i in range(args.concurrency)]
    args.key, args.limited_key, args.burst_key = "soak-main", "soak-limited", "soak-burst"
    with tempfile.NamedTemporaryFile("w", suffix=".keys", delete=False) as f:
        f.write("\n".join([*keys, args.key, args.limited_key, args.burst_key]) + "\n")
        key_file = f.name
    server = ServerProcess([
        "--api-key-file", key_file, "--max-queued-requests", str(args.max_queued_requests),
        "--rate-limit-rpm", str(args.rate_limit_rpm), "--max-model-len", "2048",
        "--header-timeout", "5", "--shutdown-timeout", "300", *engine_flags])
    tally = Tally()
    try:
        server.wait_ready()
        started = time.monotonic()
        asyncio.run(load_phase(server.url, keys, args, tally))
        load_s = time.monotonic() - started
        metrics = server.wait_idle(300)
        blocks_in_use = metrics.get("tokenmill_kv_cache_blocks", 0) - metrics.get(
            "tokenmill_kv_cache_free_blocks", 0)
        mismatches = alone_mismatches(server.url, args, tally)
        drain_problems = sigterm_drain(server, args)
    finally:
        server.cleanup()
        Path(key_file).unlink(missing_ok=True)

    health = sorted(tally.health)
    p99 = health[min(len(health) - 1, int(0.99 * len(health)))] * 1000 if health else float("nan")
    print(f"\nsoak: {load_s:.0f} s of load, {args.concurrency} streaming clients, "
          f"engine flags {engine_flags or 'default'}")
    print("requests by status: " + ", ".join(f"{k}: {v}" for k, v in sorted(
        tally.statuses.items())))
    print(f"deliberate disconnects: {tally.deliberate_cuts}; {tally.uninterrupted} "
          f"uninterrupted streams of {len(tally.seeded)} distinct (prompt, seed) requests, "
          f"{sum(len(v) for v in tally.seeded.values())} distinct texts, each compared with "
          "the same request run alone")
    goals = [
        ("5xx caused by bad input", len(tally.bad_input_5xx), tally.bad_input_5xx),
        ("bad input answered with an unexpected status", len(tally.bad_input_unexpected),
         tally.bad_input_unexpected),
        ("KV blocks in use after settling", int(blocks_in_use), []),
        ("responses cut other than deliberately", len(tally.cut), tally.cut),
        ("seeded outputs that differ from the same request alone", len(mismatches),
         mismatches),
        ("SIGTERM drain problems", len(drain_problems), drain_problems),
        ("/health probes that failed", tally.health_failures, []),
    ]
    failed = False
    for name, value, details in goals:
        mark = "ok " if value == 0 else "MISS"
        failed |= value != 0
        print(f"  [{mark}] {name}: {value} (goal 0)")
        for line in list(dict.fromkeys(details))[:5]:
            print(f"         {line}")
    print(f"  /health p99 during the run: {p99:.1f} ms "
          f"(median {statistics.median(health) * 1000:.1f} ms, {len(health)} probes)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
