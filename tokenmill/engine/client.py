"""The front end's handle on an engine: a typed protocol and its multi-process client.

:class:`EngineClient` is everything the HTTP server needs from an engine.
:class:`MPEngineClient` implements it for an engine core running in a child
process (:mod:`tokenmill.engine.core_process`):

- ``add_request`` validates synchronously against the engine's limits (so a
  request that can never run is refused before any response starts), sends it,
  and returns a :class:`RequestStream` of output deltas;
- a reader callback on the event loop takes the core's messages as they arrive
  (the output socket's descriptor turns readable), runs them through the
  :class:`~tokenmill.engine.output_processor.OutputProcessor` (detokenization
  and stop strings happen here, in the API process) and feeds each request's
  stream;
- the child's process sentinel is watched: if the core dies, every stream
  fails with :class:`EngineDeadError` within a moment and ``on_dead`` runs
  (the server then reports unhealthy and exits non-zero).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import zmq

from tokenmill.engine.args import EngineArgs
from tokenmill.engine.cpu_threads import engine_core_environment, spawn_environment
from tokenmill.engine.errors import EngineDeadError, RequestFailed
from tokenmill.engine.messages import (
    AbortRequest,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineInfo,
    EngineLoadFailed,
    EngineReady,
    Shutdown,
    decode,
    encode,
)
from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.engine.validation import EngineLimits, validate_request
from tokenmill.outputs import EngineStats, RequestOutput
from tokenmill.sampling.params import SamplingParams

logger = logging.getLogger(__name__)

# How long the engine process gets to exit after a Shutdown message before SIGKILL.
SHUTDOWN_TIMEOUT_S = 10.0


class RequestStream:
    """The output deltas of one request, as an async iterator - or, after
    :meth:`forward_to`, handed to a callback as they arrive.

    Ends after the output that has ``finished``; raises ``RequestFailed`` or
    ``EngineDeadError`` if the engine fails it. Leaving early does not stop the
    request: call ``EngineClient.abort``.
    """

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._sink: Callable[[RequestOutput | BaseException], None] | None = None
        self.finished = False

    def put(self, item: RequestOutput | BaseException) -> None:
        if self._sink is None:
            self._queue.put_nowait(item)
        else:
            self._forward(item)

    def forward_to(self, sink: Callable[[RequestOutput | BaseException], None]) -> None:
        """Call ``sink`` (on the event loop) with each output or error - those already
        queued first - instead of queueing them for iteration: a consumer that merges
        several streams saves a task wake-up per token. The last item is the finished
        output or the error."""
        self._sink = sink
        while not self._queue.empty():
            self._forward(self._queue.get_nowait())

    def _forward(self, item: RequestOutput | BaseException) -> None:
        assert self._sink is not None
        if isinstance(item, BaseException) or item.finished:
            self.finished = True
        self._sink(item)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item


class EngineClient(Protocol):
    """What a front end (the HTTP server) needs from an engine."""

    @property
    def model_name(self) -> str: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def tokenizer(self) -> Any: ...

    @property
    def is_running(self) -> bool: ...

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> SamplingParams:
        """Raise ``RequestRejected`` if the request can never run; else its final params."""
        ...

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
        prompt_text: str | None = None, priority: int = 0,
    ) -> RequestStream:
        """Validate and submit; raises ``RequestRejected`` (never runnable) or
        ``EngineDeadError`` synchronously, before anything is streamed."""
        ...

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks (unknown ids are ignored)."""
        ...

    def num_queued(self) -> int:
        """Submitted requests the engine has not started yet (live count)."""
        ...

    def stats(self) -> EngineStats | None: ...

    async def shutdown(self) -> None: ...


class MPEngineClient:
    """An engine core in a child process, driven over ZeroMQ from this event loop."""

    def __init__(self, args: EngineArgs, log_level: str = "info",
                 on_dead: Callable[[], None] | None = None) -> None:
        self.args = args
        self.log_level = log_level
        self.on_dead = on_dead
        self.info: EngineInfo | None = None
        self._tokenizer: Any = None
        self.dead_error: BaseException | None = None
        self._process: Any = None
        self._tmpdir: str | None = None
        self._ctx: zmq.Context[Any] | None = None
        self._input: Any = None
        self._output: Any = None
        self._processor: OutputProcessor | None = None
        self._streams: dict[str, RequestStream] = {}
        self._unstarted: set[str] = set()
        self._stats: EngineStats | None = None
        self._reading = False
        self._closing = False

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Spawn the engine core, load the tokenizer meanwhile, wait until both are ready.

        Raises ``RuntimeError`` with the core's error if the model fails to load.
        """
        from tokenmill.engine.builder import load_tokenizer

        loop = asyncio.get_running_loop()
        self._tmpdir = tempfile.mkdtemp(prefix="tokenmill-ipc-")
        input_address = f"ipc://{self._tmpdir}/input"
        output_address = f"ipc://{self._tmpdir}/output"
        # Plain sockets: outputs are drained from the event loop when the socket's file
        # descriptor turns readable (_drain_outputs). pyzmq's asyncio sockets (a future,
        # callbacks and flag enums per message) cost 13% more CPU per streamed token, time
        # taken from the engine's cores on a small machine (docs/performance.md).
        self._ctx = zmq.Context(io_threads=1)
        self._input = self._ctx.socket(zmq.PUSH)
        self._input.setsockopt(zmq.LINGER, 0)
        self._input.bind(input_address)
        self._output = self._ctx.socket(zmq.PULL)
        self._output.setsockopt(zmq.LINGER, 0)
        self._output.bind(output_address)
        mp = multiprocessing.get_context("spawn")
        from tokenmill.engine.core_process import run_engine_core

        self._process = mp.Process(
            target=run_engine_core, name="tokenmill-engine-core",
            args=(self.args, input_address, output_address, os.getpid(), self.log_level),
        )
        # OpenMP settings are read once, when the child loads libgomp: pass them at spawn.
        with spawn_environment(engine_core_environment(os.environ)):
            self._process.start()
        logger.info("engine core process started (pid %d)", self._process.pid)
        tokenizer_task = loop.run_in_executor(None, load_tokenizer, self.args)
        died = loop.create_future()
        loop.add_reader(self._process.sentinel, _set_result, died, None)
        first: asyncio.Future[bytes] = loop.create_future()
        self._watch_output(lambda: _recv_first(self._output, first))
        try:
            await asyncio.wait({first, died}, return_when=asyncio.FIRST_COMPLETED)
            if not first.done():
                first.cancel()
                raise RuntimeError(f"the engine core exited with code "
                                   f"{self._process.exitcode} while loading")
            message = decode(first.result())
            if isinstance(message, EngineLoadFailed):
                raise RuntimeError(message.error)
            if not isinstance(message, EngineReady):
                raise RuntimeError(f"unexpected first message {type(message).__name__}")
            self.info = message.info
            self._tokenizer = await tokenizer_task
        except BaseException:
            loop.remove_reader(self._process.sentinel)
            self._closing = True
            if self._process.is_alive():
                self._process.terminate()  # still loading: no Shutdown message is read yet
            await self._stop_process()
            raise
        self._unwatch_output()
        loop.remove_reader(self._process.sentinel)
        loop.add_reader(self._process.sentinel, self._on_process_exit)
        self._processor = OutputProcessor(self._tokenizer)
        self._watch_output(self._drain_outputs)

    def _watch_output(self, on_readable: Callable[[], None]) -> None:
        """Call ``on_readable`` whenever the output socket may hold messages, and once now.

        ZeroMQ's descriptor signals edges, not levels: a callback must receive until
        ``zmq.Again``; the call now catches what arrived before the watch began.
        """
        loop = asyncio.get_running_loop()
        loop.add_reader(self._output.getsockopt(zmq.FD), on_readable)
        self._reading = True
        loop.call_soon(on_readable)

    def _unwatch_output(self) -> None:
        if self._reading:
            self._reading = False
            asyncio.get_running_loop().remove_reader(self._output.getsockopt(zmq.FD))

    async def shutdown(self) -> None:
        """Stop the engine core (abandoning what runs) and release the sockets."""
        self._closing = True
        if self._process is not None and self._process.is_alive():
            try:
                self._input.send(encode(Shutdown()), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        await self._stop_process()
        self._fail_all(EngineDeadError("the engine was shut down"))

    async def _stop_process(self) -> None:
        loop = asyncio.get_running_loop()
        self._unwatch_output()
        if self._process is not None:
            try:
                loop.remove_reader(self._process.sentinel)
            except (ValueError, OSError):
                pass
            await loop.run_in_executor(None, self._process.join, SHUTDOWN_TIMEOUT_S)
            if self._process.is_alive():
                logger.warning("engine core did not exit; killing it")
                self._process.kill()
                await loop.run_in_executor(None, self._process.join, 5)
        for sock in (self._input, self._output):
            if sock is not None:
                sock.close(linger=0)
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def _on_process_exit(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._process.sentinel)
        if self._closing:
            return
        self._process.join(0)
        code = self._process.exitcode
        logger.error("the engine core process died (exit code %s)", code)
        self.dead_error = EngineDeadError(f"the engine core process died (exit code {code})")
        self._fail_all(self.dead_error)
        if self.on_dead is not None:
            self.on_dead()

    # ----------------------------------------------------------- properties
    @property
    def is_running(self) -> bool:
        return (self.dead_error is None and not self._closing and self._process is not None
                and self._process.is_alive())

    @property
    def model_name(self) -> str:
        return self._info.model_name

    @property
    def max_model_len(self) -> int:
        return self._info.max_model_len

    @property
    def limits(self) -> EngineLimits:
        return self._info.limits

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def _info(self) -> EngineInfo:
        if self.info is None:
            raise EngineDeadError("the engine has not started")
        return self.info

    # ------------------------------------------------------------- requests
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> SamplingParams:
        return validate_request(self._info.limits, prompt_token_ids, params)

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
        prompt_text: str | None = None, priority: int = 0,
    ) -> RequestStream:
        if not self.is_running:
            raise self.dead_error or EngineDeadError("the engine is not running")
        assert self._processor is not None
        params = validate_request(self._info.limits, prompt_token_ids, params)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        now = time.time()
        stream = RequestStream(request_id)
        self._processor.add_request(request_id, prompt_text, prompt_token_ids, params, now)
        self._streams[request_id] = stream
        self._unstarted.add(request_id)
        self._send(EngineCoreRequest(request_id, prompt_token_ids, params, now, priority))
        return stream

    def abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is None:
            return
        self._unstarted.discard(request_id)
        if self._processor is not None:
            self._processor.abort_request(request_id)
        if self.is_running:
            self._send(AbortRequest(request_id))

    def num_queued(self) -> int:
        return len(self._unstarted)

    def stats(self) -> EngineStats | None:
        """The core's latest snapshot, with waiting counted live on this side."""
        if self._stats is None:
            return None
        waiting = max(self._stats.num_waiting, len(self._unstarted))
        return dataclasses.replace(self._stats, num_waiting=waiting)

    def _send(self, message: Any) -> None:
        try:
            self._input.send(encode(message), zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the core is gone or its queue is full
            raise EngineDeadError(f"cannot reach the engine core: {exc}") from None

    # ------------------------------------------------------------- outputs
    def _drain_outputs(self) -> None:
        """Handle every message the core has sent (the output socket's reader callback)."""
        if not self._reading:
            return
        try:
            while True:
                try:
                    frame = self._output.recv(zmq.NOBLOCK)
                except zmq.Again:
                    return
                message = decode(frame)
                if isinstance(message, EngineCoreOutputs):
                    self._handle(message)
                else:
                    logger.error("unexpected message from the engine core: %s",
                                 type(message).__name__)
        except Exception:  # noqa: BLE001 - a broken channel is a dead engine
            self._unwatch_output()
            if not self._closing:
                logger.exception("reading from the engine core failed")
                self.dead_error = EngineDeadError("lost the connection to the engine core")
                self._fail_all(self.dead_error)
                if self.on_dead is not None:
                    self.on_dead()

    def _handle(self, message: EngineCoreOutputs) -> None:
        assert self._processor is not None
        self._stats = message.stats
        for request_id in message.started:
            self._unstarted.discard(request_id)
        if not message.outputs:
            return
        processed = self._processor.process(message.outputs)
        for abort in processed.aborts:
            self._send(AbortRequest(abort.request_id, abort.index))
        for request_id, error in processed.errors.items():
            stream = self._streams.pop(request_id, None)
            self._unstarted.discard(request_id)
            if stream is not None:
                stream.put(RequestFailed(error))
        for output in processed.request_outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            stream.put(output)
            if output.finished:
                del self._streams[output.request_id]
                self._unstarted.discard(output.request_id)

    def _fail_all(self, error: BaseException) -> None:
        streams, self._streams = self._streams, {}
        self._unstarted.clear()
        for request_id, stream in streams.items():
            if self._processor is not None:
                self._processor.abort_request(request_id)
            stream.put(error)


def _recv_first(sock: Any, first: asyncio.Future[bytes]) -> None:
    """Resolve ``first`` with the core's first message, if one has arrived."""
    if first.done():
        return
    try:
        first.set_result(sock.recv(zmq.NOBLOCK))
    except zmq.Again:
        pass


def _set_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)
