"""Tensor-parallel execution: worker ranks, the step channel, and their supervision.

Rank 0 lives in the engine core (the scheduler, block manager and sampler run
there, once). Every other rank is a worker process that holds its shard of the
weights and of the KV cache and runs only the model. Per step, rank 0
publishes the plain :class:`~tokenmill.step_types.SchedulerOutput` on a ZeroMQ
PUB socket (IPC on one machine, TCP across machines) and every rank runs the
same forward pass; the layers' all-reduces and the logits gather go through
the tensor-parallel process group (gloo or NCCL).

Why ZeroMQ and not shared memory for the step metadata: a step's metadata is a
few kilobytes, a ZeroMQ IPC message costs tens of microseconds, and a worker
waiting on its socket sleeps in the kernel instead of spinning on a core that
the model's threads need.

Failure handling: a rank that dies or hangs must not hang the server.
Collectives time out (``--distributed-timeout``) and raise; rank 0 also
watches its local workers' process sentinels and, inside the engine-core
process, exits at once when one dies (the API server then answers 503, fails
the requests in flight and exits non-zero). Workers exit when rank 0's
heartbeat (every second, from its own thread) stops, or their parent dies.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import zmq

from tokenmill.config import ParallelConfig
from tokenmill.distributed import CollectiveError, TPGroup
from tokenmill.engine.args import EngineArgs
from tokenmill.engine.executor import Executor
from tokenmill.engine.messages import (
    ChannelSync,
    ExecuteStep,
    Heartbeat,
    StopWorker,
    decode,
    encode,
)
from tokenmill.engine.placement import rank_device, rank_threads
from tokenmill.runner.model_runner import ModelRunner
from tokenmill.step_types import ModelOutput, SchedulerOutput, TokenFill

logger = logging.getLogger("tokenmill.engine.tensor_parallel")

HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_TIMEOUT_S = 15.0  # a worker gives up on a silent rank 0 after this long
_CHANNEL_KEY = "tokenmill/step_channel"
_HEARTBEAT_KEY = "tokenmill/heartbeat_channel"
_SYNCED_KEY = "tokenmill/step_channel_synced"


class WorkerFailure(RuntimeError):
    """A tensor-parallel rank died or hung; the engine cannot run another step."""


def resolve_init_addr(pc: ParallelConfig) -> tuple[str, int]:
    """Node 0's rendezvous address: the configured one, or a free loopback port."""
    if pc.dist_init_addr:
        host, _, port = pc.dist_init_addr.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--dist-init-addr must be HOST:PORT, got {pc.dist_init_addr!r}")
        return host, int(port)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return "127.0.0.1", sock.getsockname()[1]


def create_store(host: str, port: int, world_size: int, is_master: bool,
                 timeout_s: float) -> Any:
    return torch.distributed.TCPStore(
        host, port, world_size, is_master, timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False)


# ------------------------------------------------------------------------ rank 0 side


class StepPublisher:
    """Rank 0's end of the step channel, plus the heartbeat thread."""

    def __init__(self, store: Any, pc: ParallelConfig, host: str) -> None:
        self._ctx = zmq.Context(io_threads=1)
        self._tmpdir: str | None = None
        self._sock, address = self._bind(host, pc, "steps")
        self._hb_sock, hb_address = self._bind(host, pc, "heartbeat")
        store.set(_CHANNEL_KEY, address)
        store.set(_HEARTBEAT_KEY, hb_address)
        self._store = store
        self._stop = threading.Event()
        self._hb_thread = threading.Thread(target=self._heartbeat, name="tokenmill-tp-heartbeat",
                                           daemon=True)
        self._hb_thread.start()

    def _bind(self, host: str, pc: ParallelConfig, name: str) -> tuple[Any, str]:
        sock = self._ctx.socket(zmq.PUB)
        sock.setsockopt(zmq.SNDHWM, 0)  # never drop a step
        sock.setsockopt(zmq.LINGER, 1000)
        if pc.nnodes == 1:
            if self._tmpdir is None:
                self._tmpdir = tempfile.mkdtemp(prefix="tokenmill-tp-")
            address = f"ipc://{self._tmpdir}/{name}"
            sock.bind(address)
            return sock, address
        port = sock.bind_to_random_port("tcp://*")
        return sock, f"tcp://{host}:{port}"

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_INTERVAL_S):
            self._hb_sock.send(encode(Heartbeat()))

    def sync(self, num_workers: int, timeout_s: float) -> None:
        """Publish until every worker has received a message (PUB drops before that)."""
        deadline = time.monotonic() + timeout_s
        n = 0
        while int(self._store.add(_SYNCED_KEY, 0)) < num_workers:
            if time.monotonic() > deadline:
                raise WorkerFailure("tensor-parallel workers did not connect to the step "
                                    f"channel within {timeout_s:g}s")
            self.publish(ChannelSync(n))
            n += 1
            time.sleep(0.05)

    def publish(self, message: Any) -> None:
        self._sock.send(encode(message), copy=False)

    def close(self) -> None:
        self._stop.set()
        try:
            self.publish(StopWorker())
        except zmq.ZMQError:
            pass
        self._hb_thread.join(timeout=5)
        self._sock.close(linger=1000)
        self._hb_sock.close(linger=0)
        self._ctx.term()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)


class LocalWorkers:
    """The worker processes this node started, and their supervision.

    Workers are plain subprocesses (``python -m tokenmill.engine.tensor_parallel``)
    rather than multiprocessing children, so starting them never re-imports the
    caller's main module (an offline script without a ``__main__`` guard works).
    """

    def __init__(self, processes: dict[int, subprocess.Popen]) -> None:
        self.processes = processes  # global rank -> process
        self._watching = False

    @classmethod
    def start(cls, args: EngineArgs, ranks: range | list[int], log_level: str) -> LocalWorkers:
        processes = {}
        spec = json.dumps(dataclasses.asdict(args))
        for rank in ranks:
            cmd = [sys.executable, "-m", "tokenmill.engine.tensor_parallel", "--rank", str(rank),
                   "--parent-pid", str(os.getpid()), "--log-level", log_level, "--args", spec]
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
            processes[rank] = proc
            logger.info("tensor-parallel rank %d started (pid %d)", rank, proc.pid)
        return cls(processes)

    def failed(self) -> tuple[int, Any] | None:
        """(rank, exit code) of a worker that is no longer running, if any."""
        for rank, proc in self.processes.items():
            code = proc.poll()
            if code is not None:
                return rank, code
        return None

    def check(self) -> None:
        dead = self.failed()
        if dead is not None:
            raise WorkerFailure(f"tensor-parallel rank {dead[0]} exited (code {dead[1]})")

    def watch(self, on_failure: Callable[[int, Any], None], interval_s: float = 0.2) -> None:
        """Call ``on_failure(rank, code)`` from a thread as soon as a worker exits."""
        self._watching = True

        def run() -> None:
            while self._watching:
                dead = self.failed()
                if dead is not None:
                    if self._watching:
                        on_failure(*dead)
                    return
                time.sleep(interval_s)

        threading.Thread(target=run, name="tokenmill-tp-watch", daemon=True).start()

    def stop(self, timeout: float = 10.0) -> None:
        self._watching = False
        deadline = time.monotonic() + timeout
        for proc in self.processes.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


@dataclass
class TPLaunch:
    """What rank 0 started: its group, the step channel and this node's workers."""

    group: TPGroup
    publisher: StepPublisher | None
    workers: LocalWorkers
    config: ParallelConfig

    def stop(self) -> None:
        if self.publisher is not None:
            self.publisher.close()
        self.workers.stop()


def launch_rank0(args: EngineArgs, log_level: str = "info") -> tuple[TPLaunch, EngineArgs]:
    """Start this node's workers and join the group as rank 0.

    Returns the launch and ``args`` with the rendezvous address filled in.
    """
    pc = args.parallel_config()
    host, port = resolve_init_addr(pc)
    args = replace(args, dist_init_addr=f"{host}:{port}")
    store = create_store(host, port, pc.tensor_parallel_size, True, pc.timeout_s)
    workers = LocalWorkers.start(args, list(pc.node_ranks(0))[1:], log_level)
    try:
        group = TPGroup.create(0, pc.tensor_parallel_size, store, rank_device(args, 0, pc),
                               pc.timeout_s)
    except BaseException:
        workers.stop(0)
        raise
    return TPLaunch(group, None, workers, pc), args


def open_step_channel(launch: TPLaunch, host: str) -> None:
    """Rank 0: publish the step channel and wait until every worker listens to it."""
    launch.publisher = StepPublisher(launch.group.store, launch.config, host)
    launch.publisher.sync(launch.config.tensor_parallel_size - 1, launch.config.timeout_s)


class TPExecutor(Executor):
    """Rank 0's executor: publish each step to the workers, then run its own shard."""

    def __init__(self, runner: ModelRunner, launch: TPLaunch,
                 draft_runner: ModelRunner | None = None) -> None:
        super().__init__(runner, draft_runner)
        self.launch = launch

    # The other ranks build their inputs from the published step: they never see the
    # tokens rank 0 sampled, so every step's tokens must be known when it is published.
    supports_async_scheduling = False

    def execute(self, out: SchedulerOutput, fill: TokenFill | None = None) -> ModelOutput:
        if fill is not None:
            raise ValueError("tensor-parallel steps cannot carry placeholder tokens")
        self.launch.workers.check()
        if out.seqs or out.block_copies:
            assert self.launch.publisher is not None
            self.launch.publisher.publish(ExecuteStep(out))
        try:
            return super().execute(out)
        except CollectiveError as exc:
            raise WorkerFailure(str(exc)) from exc

    def shutdown(self) -> None:
        self.launch.stop()


# -------------------------------------------------------------------------- worker side


class StepSubscriber:
    """A worker's end of the step channel."""

    def __init__(self, store: Any) -> None:
        self._ctx = zmq.Context(io_threads=1)
        self._steps = self._connect(store.get(_CHANNEL_KEY).decode())
        self._beats = self._connect(store.get(_HEARTBEAT_KEY).decode())
        self._poller = zmq.Poller()
        self._poller.register(self._steps, zmq.POLLIN)
        self._poller.register(self._beats, zmq.POLLIN)
        self._store = store

    def _connect(self, address: str) -> Any:
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(address)
        return sock

    def wait_sync(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._steps.poll(100) and isinstance(decode(self._steps.recv()), ChannelSync):
                self._store.add(_SYNCED_KEY, 1)
                return
        raise WorkerFailure("no message from rank 0 on the step channel")

    def recv(self, timeout_s: float) -> Any | None:
        """The next step message; None when rank 0 has been silent for ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            events = dict(self._poller.poll(min(remaining, 1.0) * 1000))
            if self._beats in events:
                while self._beats.poll(0):
                    self._beats.recv()
                deadline = time.monotonic() + timeout_s
            if self._steps in events:
                message = decode(self._steps.recv())
                if not isinstance(message, ChannelSync):
                    return message

    def close(self) -> None:
        self._steps.close(linger=0)
        self._beats.close(linger=0)
        self._ctx.term()


def run_tp_worker(args: EngineArgs, rank: int, parent_pid: int, log_level: str = "info") -> None:
    """A worker rank's process: join the group, load its shard, run steps until told to stop.

    Exits when rank 0 says so, when rank 0's heartbeat stops, when its parent
    (rank 0's process, or a worker node's launcher) is gone, or when a
    collective fails.
    """
    from tokenmill.engine.builder import build_rank_model

    _configure_logging(log_level, rank)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    pc = args.parallel_config()
    host, port = resolve_init_addr(pc)
    device = rank_device(args, rank, pc)
    torch.set_num_threads(rank_threads(args, pc))
    store = create_store(host, port, pc.tensor_parallel_size, False, pc.timeout_s)
    group = TPGroup.create(rank, pc.tensor_parallel_size, store, device, pc.timeout_s)
    try:
        runner = build_rank_model(args, group, device).runner
    except ValueError as exc:  # a model that cannot be split so; rank 0 reports it too
        logger.error("rank %d: %s", rank, exc)
        sys.exit(1)
    channel = StepSubscriber(store)
    channel.wait_sync(pc.timeout_s)
    logger.info("rank %d ready", rank)
    status = 0
    try:
        with torch.inference_mode():
            while True:
                message = channel.recv(HEARTBEAT_TIMEOUT_S)
                if os.getppid() != parent_pid:
                    logger.error("rank %d: the parent process is gone; exiting", rank)
                    status = 1
                    return
                if message is None:
                    logger.error("rank 0 is silent (no heartbeat for %gs); exiting",
                                 HEARTBEAT_TIMEOUT_S)
                    status = 1
                    return
                if isinstance(message, StopWorker):
                    return
                if isinstance(message, ExecuteStep):
                    runner.copy_blocks(message.sched.block_copies)
                    runner.execute(message.sched)
    except CollectiveError:
        logger.exception("rank %d: a collective failed; exiting", rank)
        status = 1
    finally:
        channel.close()
        if status:
            sys.exit(status)


def run_worker_node(args: EngineArgs, log_level: str = "info") -> int:
    """A node other than node 0: run its ranks until they exit; non-zero if one fails."""
    pc = args.parallel_config()
    workers = LocalWorkers.start(args, pc.node_ranks(), log_level)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.is_set():
        codes = {rank: proc.poll() for rank, proc in workers.processes.items()}
        for rank, code in codes.items():
            if code not in (None, 0):
                logger.error("tensor-parallel rank %d exited with code %s", rank, code)
                workers.stop(5)
                return 1
        if all(code is not None for code in codes.values()):
            return 0  # rank 0 told them to stop
        stop.wait(0.5)
    workers.stop(10)
    return 0


def _configure_logging(level: str, rank: int) -> None:
    root = logging.getLogger()
    root.setLevel(level.upper())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s %(levelname)s %(name)s[tp{rank}]: %(message)s"))
    root.handlers[:] = [handler]


def main(argv: list[str] | None = None) -> None:
    """Entry point of a worker process (started by :class:`LocalWorkers`)."""
    parser = argparse.ArgumentParser(prog="python -m tokenmill.engine.tensor_parallel")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--args", required=True, help="EngineArgs as JSON")
    ns = parser.parse_args(argv)
    args = EngineArgs(**json.loads(ns.args))
    run_tp_worker(args, ns.rank, ns.parent_pid, ns.log_level)


if __name__ == "__main__":
    main()
