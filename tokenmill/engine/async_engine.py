"""Asyncio front of the engine: the engine steps in its own thread.

The HTTP event loop never runs a forward pass. Requests and aborts are handed
to the engine thread through a queue; each request's outputs come back
through an ``asyncio.Queue`` fed with ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from tokenmill.engine.args import EngineArgs
from tokenmill.engine.engine import LLMEngine
from tokenmill.engine.outputs import EngineStats, RequestOutput
from tokenmill.sampling import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread stopped; no request can be served."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncLLMEngine:
    """Thread-backed engine with an ``async`` per-request output stream."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.model_config = engine.model_config
        self.model_name = engine.model_name
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._streams_lock = threading.Lock()
        self._stats = engine.stats()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.dead_error: BaseException | None = None

    @classmethod
    def from_engine_args(cls, **kwargs: Any) -> AsyncLLMEngine:
        """Load the model (blocking: run it in a worker thread) and wrap the engine."""
        return cls(LLMEngine.from_engine_args(**kwargs))

    @classmethod
    def from_args(cls, args: EngineArgs) -> AsyncLLMEngine:
        return cls(LLMEngine(args))

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tokenmill-engine",
                                            daemon=True)
            self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def shutdown(self) -> None:
        """Stop the engine thread; unfinished requests are aborted."""
        self._stop.set()
        self._wakeup.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30)

    # ------------------------------------------------------------- requests
    async def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        request_id: str,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs as they are produced.

        Raises ``ValueError`` (``RequestRejected``) before the first output if
        the request can never be served. Closing the iterator early (client
        gone, timeout) aborts the request and frees its KV blocks.
        """
        if self.dead_error is not None or not self.is_running:
            raise EngineDeadError("the engine is not running")
        text, token_ids, params = self.engine.preprocess(prompt, params)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._streams_lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
        self._commands.put(("add", (request_id, text, token_ids, params, priority, time.time())))
        self._wakeup.set()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    break
        finally:
            with self._streams_lock:
                self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread; its blocks are freed before the next step."""
        self._commands.put(("abort", request_id))
        self._wakeup.set()

    def stats(self) -> EngineStats:
        """The latest snapshot (taken by the engine thread after each step)."""
        return self._stats

    # --------------------------------------------------------- engine thread
    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stop.is_set():
                self._drain_commands()
                if not engine.has_unfinished_requests():
                    self._stats = engine.stats()
                    self._wakeup.wait(0.5)
                    self._wakeup.clear()
                    continue
                try:
                    outputs = engine.step()
                except Exception as exc:  # keep serving: fail only the requests in flight
                    logger.exception("engine step failed; aborting the requests in flight")
                    self._fail_all(exc)
                    continue
                self._stats = engine.stats()
                self._dispatch(outputs)
        except BaseException as exc:  # pragma: no cover - last resort
            logger.exception("engine thread died")
            self.dead_error = exc
        finally:
            self._fail_all(EngineDeadError("the engine stopped"))
            self._stats = engine.stats()

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                request_id, text, token_ids, params, priority, arrival = payload
                with self._streams_lock:
                    alive = request_id in self._streams
                if not alive:
                    continue  # the client left before the engine saw the request
                try:
                    self.engine.add_prepared(request_id, text, token_ids, params, priority,
                                             arrival)
                except Exception as exc:
                    self._send(request_id, exc)
            elif kind == "abort":
                self.engine.abort_request(payload)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self._send(out.request_id, out)

    def _send(self, request_id: str, item: Any) -> None:
        with self._streams_lock:
            stream = self._streams.get(request_id)
        if stream is None:
            if not isinstance(item, BaseException) and not item.finished:
                self.engine.abort_request(request_id)  # nobody is listening any more
            return
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed
            self.engine.abort_request(request_id)

    def _fail_all(self, exc: BaseException) -> None:
        with self._streams_lock:
            ids = list(self._streams)
        for rid in ids:
            self.engine.abort_request(rid)
            self._send(rid, exc)
