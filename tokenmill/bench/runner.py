"""Drive a workload against one target: arrivals, the concurrency cap, chat turns, counting.

Each request waits for its arrival time, then (for a chat turn) for the previous turn
of its conversation, then for a concurrency slot, and only then is sent: its timings
start at the send, so time spent queued in the client never counts as server latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from dataclasses import dataclass

import httpx
import numpy as np

from tokenmill.bench.arrivals import arrival_offsets
from tokenmill.bench.client import (
    RequestRecord,
    Target,
    build_payload,
    render_transcript,
    send_request,
)
from tokenmill.bench.metrics import assign_token_counts
from tokenmill.bench.tokens import TokenCounter
from tokenmill.bench.workloads import BenchRequest


@dataclass(frozen=True)
class LoadSpec:
    """How hard to push: arrival rate (req/s, inf = all at once), burstiness, cap."""

    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None

    def describe(self) -> str:
        rate = "inf" if math.isinf(self.request_rate) else f"{self.request_rate:g} req/s"
        cap = self.max_concurrency if self.max_concurrency else "unlimited"
        text = f"rate {rate}, max concurrency {cap}"
        if self.burstiness != 1.0 and not math.isinf(self.request_rate):
            text += f", burstiness {self.burstiness:g}"
        return text


@dataclass
class RunOutcome:
    """Records of one run, in request order, and its wall-clock duration."""

    records: list[RequestRecord]
    duration_s: float


class _Conversations:
    """Chat histories, and an event per finished turn so the next turn can follow."""

    def __init__(self) -> None:
        self.history: dict[int, list[dict[str, str]]] = {}
        self.finished: dict[tuple[int, int], asyncio.Event] = {}

    def event(self, conv: int, turn: int) -> asyncio.Event:
        return self.finished.setdefault((conv, turn), asyncio.Event())

    async def wait_previous(self, request: BenchRequest) -> None:
        if request.conversation is not None and request.turn > 0:
            await self.event(request.conversation, request.turn - 1).wait()

    def messages_for(self, request: BenchRequest) -> list[dict[str, str]] | None:
        if request.messages is not None:
            return request.messages
        if request.conversation is None:
            return None
        past = self.history.get(request.conversation, [])
        return past + [{"role": "user", "content": request.prompt}]

    def record_answer(self, request: BenchRequest, messages: list[dict[str, str]] | None,
                      answer: str) -> None:
        if request.conversation is None:
            return
        self.history[request.conversation] = (messages or []) + [
            {"role": "assistant", "content": answer}]
        self.event(request.conversation, request.turn).set()


async def run_load_async(target: Target, requests: list[BenchRequest], load: LoadSpec,
                         seed: int = 0, tokens: TokenCounter | None = None,
                         count_tokens: str = "auto", progress: bool = True,
                         description: str = "") -> RunOutcome:
    """Send ``requests`` to ``target`` under ``load``; return one record per request."""
    offsets = arrival_offsets(len(requests), load.request_rate, load.burstiness,
                              np.random.default_rng(seed))
    slots = asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else None
    chats = _Conversations()
    sent_inputs: dict[int, tuple[str | None, list[dict[str, str]] | None]] = {}
    bar = _progress_bar(len(requests), description, progress)
    # Unlimited connections: a pool limit would queue sends inside httpx and add the
    # wait to TTFT; the concurrency cap is ours to enforce, with the semaphore.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(target.timeout_s, connect=min(60.0, target.timeout_s))

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        start = time.perf_counter()

        async def one(i: int, request: BenchRequest) -> RequestRecord:
            delay = start + float(offsets[i]) - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await chats.wait_previous(request)
            messages = chats.messages_for(request)
            prompt = None if messages is not None else request.prompt
            record = RequestRecord(index=request.index, conversation=request.conversation,
                                   turn=request.turn)
            payload = build_payload(target, request.output_len, prompt=prompt,
                                    messages=messages)
            async with slots or contextlib.nullcontext():
                await send_request(client, target, payload, record, start)
            sent_inputs[i] = (prompt, messages)
            chats.record_answer(request, messages, record.generated_text)
            if bar is not None:
                bar.update(1)
            return record

        try:
            records = await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
        finally:
            if bar is not None:
                bar.close()
        duration = time.perf_counter() - start

    for i, record in enumerate(records):
        prompt, messages = sent_inputs[i]
        _count(record, target, prompt, messages, tokens, count_tokens)
    return RunOutcome(records=list(records), duration_s=duration)


def run_load(target: Target, requests: list[BenchRequest], load: LoadSpec, seed: int = 0,
             tokens: TokenCounter | None = None, count_tokens: str = "auto",
             progress: bool = True, description: str = "") -> RunOutcome:
    """Synchronous wrapper of :func:`run_load_async`."""
    return asyncio.run(run_load_async(target, requests, load, seed, tokens, count_tokens,
                                      progress, description))


def _count(record: RequestRecord, target: Target, prompt: str | None,
           messages: list[dict[str, str]] | None, tokens: TokenCounter | None,
           count_tokens: str) -> None:
    """Token counts for one finished request, after the run (off the timed path)."""
    prompt_count = output_count = None
    if tokens is not None:
        if target.is_chat:
            prompt_count = tokens.count_chat(messages or [{"role": "user",
                                                           "content": prompt or ""}])
        else:
            prompt_count = tokens.count(prompt if prompt is not None
                                        else render_transcript(messages or []))
        output_count = tokens.count(record.generated_text)
    assign_token_counts(record, prompt_count, output_count, count_tokens)


def _progress_bar(total: int, description: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=description or "requests", unit="req", leave=False)
