"""Run one HTTP request's prompts through the engine and merge their outputs.

A completions request may carry several prompts; each becomes one engine request
(with its own ``n`` choices). ``GenerationRun`` submits them all (synchronously: the
engine client validates each one, so a request that can never run fails before any
response starts), takes their outputs (deltas) straight from the engine's streams
(``RequestStream.forward_to``) and yields them in arrival order, enforces the
request deadline, records latency metrics as tokens arrive, and - whatever ends the
request (done, timeout, client gone, error) - ``close()`` aborts what is still running
so its KV blocks are freed at once. ``close()`` never awaits, so it is safe in a task
that is being cancelled.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from tokenmill.outputs import RequestOutput
from tokenmill.server.metrics import RequestTiming, ServerMetrics

logger = logging.getLogger("tokenmill.server")


@dataclass
class _Item:
    prompt_index: int
    output: RequestOutput | None = None
    error: BaseException | None = None


class GenerationRun:
    """The engine requests behind one HTTP request."""

    def __init__(
        self,
        engine: Any,
        prompts: list[list[int]],
        params: Any,
        engine_request_ids: list[str],
        priority: int,
        metrics: ServerMetrics,
        deadline: float | None = None,
        prompt_texts: list[str | None] | None = None,
    ) -> None:
        """``deadline`` is in ``loop.time()`` seconds; None means no timeout."""
        self._engine = engine
        self._prompts = prompts
        self._prompt_texts = prompt_texts or [None] * len(prompts)
        self._params = params
        self.engine_request_ids = engine_request_ids
        self._priority = priority
        self._metrics = metrics
        self._deadline = deadline
        self._n = int(getattr(params, "n", 1) or 1)
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._submitted = 0  # prompts handed to the engine
        self._timings = [RequestTiming() for _ in prompts]
        self._choice_tokens: dict[tuple[int, int], int] = {}
        self._finished: set[int] = set()
        self._closed = False
        # Totals for usage and the access log.
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.completion_tokens = 0
        self.cached_tokens: dict[int, int] = {}
        self.finish_reasons: dict[tuple[int, int], str] = {}

    @property
    def ttft(self) -> float | None:
        """Time to the first token of any prompt."""
        values = [t.ttft() for t in self._timings if t.ttft() is not None]
        return min(values) if values else None

    @property
    def total_cached_tokens(self) -> int:
        return sum(self.cached_tokens.values())

    def start(self) -> None:
        """Submit every prompt; raise at once (aborting the rest) if the engine refuses one."""
        pairs = zip(self._prompts, self._prompt_texts, self.engine_request_ids, strict=True)
        try:
            for index, (prompt, text, request_id) in enumerate(pairs):
                stream = self._engine.add_request(
                    request_id, prompt, self._params, prompt_text=text, priority=self._priority)
                self._submitted = index + 1
                stream.forward_to(functools.partial(self._on_output, index))
        except BaseException:
            self.close("error")
            raise

    def _on_output(self, index: int, item: RequestOutput | BaseException) -> None:
        """An engine stream's next output or its error (called by the engine client)."""
        if isinstance(item, BaseException):
            self._queue.put_nowait(_Item(index, error=item))
        else:
            self._queue.put_nowait(_Item(index, item))

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Yield ``(prompt_index, output)`` until every prompt finished.

        Raises ``asyncio.TimeoutError`` when the deadline passes and re-raises engine errors.
        """
        remaining = len(self._prompts) - len(self._finished)
        while remaining:
            item = await self._next_item()
            if item.error is not None:
                raise item.error
            assert item.output is not None
            was_finished = item.prompt_index in self._finished
            self._record(item.prompt_index, item.output)
            if not was_finished and item.prompt_index in self._finished:
                remaining -= 1
            yield item.prompt_index, item.output

    async def _next_item(self) -> _Item:
        if not self._queue.empty():
            return self._queue.get_nowait()
        if self._deadline is None:
            return await self._queue.get()
        remaining = self._deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise asyncio.TimeoutError
        return await asyncio.wait_for(self._queue.get(), remaining)

    def _record(self, index: int, output: RequestOutput) -> None:
        now = time.monotonic()
        timing = self._timings[index]
        new_tokens = 0
        for choice in output.outputs:
            count = len(choice.token_ids)
            if count:
                new_tokens += count
                key = (index, choice.index)
                self._choice_tokens[key] = self._choice_tokens.get(key, 0) + count
                timing.max_choice_tokens = max(timing.max_choice_tokens, self._choice_tokens[key])
            if choice.finish_reason is not None:
                self.finish_reasons[(index, choice.index)] = choice.finish_reason
        if new_tokens:
            self.completion_tokens += new_tokens
            self._metrics.observe_token_output(timing, now)
        self.cached_tokens[index] = output.num_cached_tokens
        if output.finished and index not in self._finished:
            self._finished.add(index)
            reasons = [c.finish_reason or "stop" for c in output.outputs]
            generated = sum(self._choice_tokens.get((index, c.index), 0) for c in output.outputs)
            self._metrics.observe_finished(
                timing, len(self._prompts[index]), generated, reasons, _queue_time(output), now
            )

    def interrupt(self, error: BaseException) -> None:
        """Make the consumer raise ``error`` at its next wait (from the event loop)."""
        self._queue.put_nowait(_Item(-1, error=error))

    def close(self, reason: str) -> None:
        """Stop whatever still runs (idempotent). ``reason`` labels unfinished choices."""
        if self._closed:
            return
        self._closed = True
        for index, request_id in enumerate(self.engine_request_ids[: self._submitted]):
            if index in self._finished:
                continue
            try:
                self._engine.abort(request_id)
            except Exception:  # noqa: BLE001 - aborting an unknown id is harmless
                logger.debug("abort of %s failed", request_id, exc_info=True)
            for choice_index in range(self._n):
                self.finish_reasons.setdefault((index, choice_index), reason)
            self._metrics.finished.labels(finish_reason=reason).inc(self._n)


def _queue_time(output: RequestOutput) -> float | None:
    metrics = output.metrics
    if metrics is None or metrics.scheduled_time is None:
        return None
    return metrics.scheduled_time - metrics.arrival_time
