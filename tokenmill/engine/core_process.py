"""The engine core in its own process: read requests, step, send deltas - over ZeroMQ.

The API server spawns this process (see :mod:`tokenmill.engine.client`); the
two exchange msgpack-encoded messages (:mod:`tokenmill.engine.messages`) over
two ZeroMQ IPC sockets: front end -> core (requests, aborts, shutdown) and
core -> front end (readiness, per-step deltas and statistics). The core owns
the compute threads; the API process never runs a forward pass.

The loop blocks on its input socket while idle; while requests run it drains
the input between steps (so a new request joins the very next step) and
sends, per step, one message right after scheduling (which requests started,
live counts for admission) and one with the step's deltas.

It exits when told to shut down, on SIGTERM, or within a second of its parent
disappearing. A load failure is reported as :class:`EngineLoadFailed` before
exiting non-zero; a step that raises fails only the requests in flight.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
from typing import Any

import zmq

from tokenmill.engine.args import EngineArgs
from tokenmill.engine.core import EngineCore
from tokenmill.engine.cpu_threads import pin_engine_core
from tokenmill.engine.errors import RequestRejected
from tokenmill.engine.messages import (
    AbortRequest,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineLoadFailed,
    EngineReady,
    Shutdown,
    decode,
    encode,
)

logger = logging.getLogger("tokenmill.engine.core")

# How long an idle core blocks on its input before checking that its parent lives.
IDLE_POLL_MS = 500
# How long a core with nothing to run but grammars compiling waits between checks.
GRAMMAR_POLL_MS = 5


def run_engine_core(
    args: EngineArgs, input_address: str, output_address: str, parent_pid: int,
    log_level: str = "info",
) -> None:
    """Process entry point: build the engine, announce it, serve until told to stop."""
    _configure_logging(log_level)
    pin_engine_core(os.environ)
    # Ctrl-C reaches the whole process group; the API server decides what happens.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _raise_system_exit)
    context = zmq.Context(io_threads=1)
    inputs = context.socket(zmq.PULL)
    inputs.connect(input_address)
    outputs = context.socket(zmq.PUSH)
    outputs.setsockopt(zmq.LINGER, 2000)
    outputs.connect(output_address)
    status = 0
    core = None
    try:
        from tokenmill.engine.builder import build_engine

        try:
            built = build_engine(args, log_level)
        except Exception as exc:  # noqa: BLE001 - reported to the front end, then exit
            logger.exception("engine failed to load")
            outputs.send(encode(EngineLoadFailed(f"{type(exc).__name__}: {exc}")))
            status = 1
            return
        core = built.core
        # What is alive now (modules, the model, tokenizer tables) lives as long as the
        # process: keep it out of the cyclic collector's full passes, which would walk it
        # again and again while requests run.
        gc.collect()
        gc.freeze()
        _watch_workers(core)
        outputs.send(encode(EngineReady(built.info)))
        status = CoreLoop(core, inputs, outputs, parent_pid).run()
    except SystemExit:
        logger.info("engine core stopping (signal)")
    finally:
        if core is not None:
            core.shutdown()
        inputs.close(linger=0)
        outputs.close()
        context.term()
        if status:
            sys.exit(status)


def _watch_workers(core: EngineCore) -> None:
    """With tensor parallelism: if a worker rank dies, this process exits at once, so the
    API server sees the engine die (a step blocked in a collective would wait for the
    collective timeout otherwise)."""
    from tokenmill.engine.tensor_parallel import TPExecutor

    if not isinstance(core.executor, TPExecutor):
        return

    def die(rank: int, code: Any) -> None:
        logger.error("tensor-parallel rank %d died (exit code %s); engine core exiting",
                     rank, code)
        logging.shutdown()
        os._exit(1)

    core.executor.launch.workers.watch(die)


class CoreLoop:
    """Steps the engine core while it has work; handles messages between steps."""

    def __init__(self, core: EngineCore, inputs: Any, outputs: Any, parent_pid: int) -> None:
        self.core = core
        self.inputs = inputs
        self.outputs = outputs
        self.parent_pid = parent_pid
        self._poller = zmq.Poller()
        self._poller.register(inputs, zmq.POLLIN)

    def run(self) -> int:
        """Serve until shutdown (0) or until the executor fails for good (1)."""
        from tokenmill.engine.tensor_parallel import WorkerFailure

        core = self.core
        while True:
            if not core.has_unfinished_requests():
                self._poller.poll(IDLE_POLL_MS)
            if os.getppid() != self.parent_pid:
                logger.warning("the API server process is gone; engine core exiting")
                return 0
            handled = self._handle_inputs()
            if handled is None:
                return 0
            if not core.has_unfinished_requests():
                if handled:  # e.g. the last request was aborted: publish the freed blocks
                    self._send(EngineCoreOutputs([], core.stats()))
                continue
            sched = core.schedule()
            started = core.pop_started()
            if started:
                self._send(EngineCoreOutputs([], core.stats(), started))
            if sched.is_empty and core.num_awaiting_grammar:
                # Only grammars compiling (in the background): report failures, else wait
                # a moment for a grammar or a new message instead of spinning.
                failed = core.execute(sched)
                if failed:
                    self._send(EngineCoreOutputs(failed, core.stats()))
                else:
                    self._poller.poll(GRAMMAR_POLL_MS)
                continue
            try:
                step_outputs = core.execute(sched)
            except WorkerFailure as exc:  # a rank is gone: no further step can run
                # Exit without answering: the front end sees the engine die and fails
                # everything in flight as engine_dead.
                logger.error("tensor-parallel failure: %s; engine core exiting", exc)
                return 1
            except Exception as exc:  # noqa: BLE001 - keep serving; fail what was running
                logger.exception("engine step failed; failing the requests in flight")
                step_outputs = core.fail_all(f"{type(exc).__name__}: {exc}")
            self._send(EngineCoreOutputs(step_outputs, core.stats()))

    def _handle_inputs(self) -> int | None:
        """Apply every pending message; how many there were, or None on shutdown."""
        handled = 0
        while True:
            try:
                frame = self.inputs.recv(zmq.NOBLOCK)
            except zmq.Again:
                return handled
            messages = decode(frame)
            for message in messages if isinstance(messages, list) else [messages]:
                handled += 1
                if isinstance(message, EngineCoreRequest):
                    self._add(message)
                elif isinstance(message, AbortRequest):
                    self.core.abort_request(message.request_id, message.index)
                elif isinstance(message, Shutdown):
                    logger.info("engine core shutting down")
                    return None
                else:
                    logger.error("unexpected message %s", type(message).__name__)

    def _add(self, request: EngineCoreRequest) -> None:
        try:
            self.core.add_request(request)
        except RequestRejected as exc:  # the front end validates first; stay safe
            self._send(EngineCoreOutputs(
                [EngineCoreOutput(request.request_id, finished=True, error=str(exc))],
                self.core.stats()))

    def _send(self, message: Any) -> None:
        self.outputs.send(encode(message), copy=False)


def _raise_system_exit(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def _configure_logging(level: str) -> None:
    root = logging.getLogger()
    root.setLevel(level.upper())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s[core]: %(message)s"))
    root.handlers[:] = [handler]
