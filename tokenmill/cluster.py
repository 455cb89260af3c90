"""``tokenmill cluster``: N replicas of ``tokenmill serve`` behind vllm-router, on one host.

A single-host launcher, not an orchestrator (use Kubernetes for fleets, see
docs/deploy.md). It starts ``--replicas`` servers on local ports (on a multi-GPU host,
each on its own GPUs; on a CPU, each with its share of the cores), waits until they
are ready, and starts the router (`vllm-router`, a Rust binary from PyPI:
``pip install 'tokenmill[cluster]'``) on ``--port`` in front of them, with health
checks every 2 s and retries, so a replica that drains or dies is routed around.

- a replica that exits while the cluster runs is restarted on its port;
- SIGHUP restarts the replicas one at a time (each drains, restarts, becomes ready
  before the next goes): a rolling restart;
- SIGTERM / SIGINT drains every replica (their running requests finish), then stops
  the router, and exits 0.

Every other flag goes to each replica's ``tokenmill serve`` unchanged.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

logger = logging.getLogger("tokenmill.cluster")
logging.getLogger("httpx").setLevel(logging.WARNING)

ROUTER_POLICIES = ("cache_aware", "round_robin", "power_of_two", "random", "consistent_hash")
READY_TIMEOUT_S = 900.0


@dataclass
class Replica:
    index: int
    port: int
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None
    restarts: int = 0
    expected_exit: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class ClusterConfig:
    replicas: int
    port: int
    host: str = "127.0.0.1"
    policy: str = "cache_aware"
    serve_args: list[str] = field(default_factory=list)
    router_args: list[str] = field(default_factory=list)
    balance_abs_threshold: int = 8
    balance_rel_threshold: float = 2.0
    log_dir: Path = Path(".")
    router_binary: str | None = None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_router(explicit: str | None = None) -> str:
    """The vllm-router executable: given, on PATH, or beside this Python."""
    candidates = [explicit] if explicit else [
        shutil.which("vllm-router"), str(Path(sys.executable).parent / "vllm-router")]
    for path in candidates:
        if path and Path(path).is_file() and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError("vllm-router is not installed; pip install 'tokenmill[cluster]'")


def _flag_value(args: list[str], *names: str) -> str | None:
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def _gpu_count() -> int:
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def replica_envs(config: ClusterConfig) -> list[dict[str, str]]:
    """Per replica: its GPUs (CUDA_VISIBLE_DEVICES) when the host has enough of them."""
    tp = int(_flag_value(config.serve_args, "--tensor-parallel-size", "-tp") or 1)
    gpus = 0 if "CUDA_VISIBLE_DEVICES" in os.environ else _gpu_count()
    envs = []
    for i in range(config.replicas):
        env = dict(os.environ)
        if gpus >= config.replicas * tp:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i * tp + g) for g in range(tp))
        envs.append(env)
    return envs


class Cluster:
    """Starts and watches the replicas and the router."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.router_binary = find_router(config.router_binary)
        config.log_dir.mkdir(parents=True, exist_ok=True)
        serve_args = list(config.serve_args)
        if _flag_value(serve_args, "--num-threads") is None and _gpu_count() == 0:
            # CPU replicas share the cores instead of each spinning on all of them.
            threads = max(1, (os.cpu_count() or 1) // config.replicas)
            serve_args += ["--num-threads", str(threads)]
        self.serve_args = serve_args
        self.replicas = [
            Replica(i, free_port(), env, config.log_dir / f"replica-{i}.log")
            for i, env in enumerate(replica_envs(config))
        ]
        self.router: subprocess.Popen | None = None
        self.router_metrics_port = free_port()
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    # ----- processes ------------------------------------------------------------------
    def _start_replica(self, replica: Replica) -> None:
        cmd = [sys.executable, "-m", "tokenmill.server", "--host", "127.0.0.1",
               "--port", str(replica.port), *self.serve_args]
        log = open(replica.log_path, "ab")  # noqa: SIM115 - handed to the child
        replica.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                        env=replica.env)
        replica.expected_exit = False
        logger.info("replica %d: pid %d on %s (log %s)", replica.index, replica.proc.pid,
                    replica.url, replica.log_path)

    def _wait_ready(self, replica: Replica, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._stopping.is_set():
            if replica.proc is not None and replica.proc.poll() is not None:
                raise RuntimeError(f"replica {replica.index} exited with code "
                                   f"{replica.proc.returncode}; see {replica.log_path}")
            try:
                if httpx.get(replica.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        if not self._stopping.is_set():
            raise TimeoutError(f"replica {replica.index} not ready after {timeout:g}s")

    def router_command(self) -> list[str]:
        c = self.config
        return [
            self.router_binary, "--host", c.host, "--port", str(c.port),
            "--worker-urls", *(r.url for r in self.replicas),
            "--policy", c.policy,
            "--health-check-endpoint", "/health", "--health-check-interval-secs", "2",
            "--health-failure-threshold", "1", "--health-success-threshold", "1",
            "--balance-abs-threshold", str(c.balance_abs_threshold),
            "--balance-rel-threshold", str(c.balance_rel_threshold),
            "--retry-max-retries", "5",
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(self.router_metrics_port),
            *c.router_args,
        ]

    def start(self) -> None:
        for replica in self.replicas:
            self._start_replica(replica)
        for replica in self.replicas:
            self._wait_ready(replica)
        log = open(self.config.log_dir / "router.log", "ab")  # noqa: SIM115
        self.router = subprocess.Popen(self.router_command(), stdout=log,
                                       stderr=subprocess.STDOUT)
        url = f"http://{self.config.host}:{self.config.port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.router.poll() is not None:
                raise RuntimeError(f"vllm-router exited with code {self.router.returncode}; "
                                   f"see {self.config.log_dir / 'router.log'}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        logger.info("router (%s, policy %s) on %s in front of %d replicas", self.router_binary,
                    self.config.policy, url, len(self.replicas))

    # ----- supervision ------------------------------------------------------------------
    def supervise(self) -> int:
        """Restart replicas that exit; return when the cluster stops."""
        while not self._stopping.wait(0.5):
            with self._lock:
                for replica in self.replicas:
                    proc = replica.proc
                    if proc is not None and proc.poll() is not None:
                        if not replica.expected_exit:
                            logger.warning("replica %d exited with code %s; restarting",
                                           replica.index, proc.returncode)
                        replica.restarts += 1
                        self._start_replica(replica)
            if self.router is not None and self.router.poll() is not None:
                logger.error("the router exited with code %s", self.router.returncode)
                self.shutdown()
                return 1
        return 0

    def _router_call(self, path: str, replica: Replica) -> None:
        """Add or remove a worker in the running router (its worker-management API)."""
        url = f"http://{self.config.host}:{self.config.port}{path}"
        try:
            resp = httpx.post(url, params={"url": replica.url}, timeout=10)
            if resp.status_code >= 400:
                logger.warning("router %s %s: %s %s", path, replica.url, resp.status_code,
                               resp.text[:200])
        except httpx.HTTPError as exc:
            logger.warning("router %s %s failed: %s", path, replica.url, exc)

    def rolling_restart(self) -> None:
        """Drain, restart and re-ready each replica in turn (SIGHUP).

        The replica leaves the router first, so no new request is sent to it while it
        drains or restarts (the health checks alone would notice only seconds later),
        and rejoins once it is ready.
        """
        for replica in self.replicas:
            if self._stopping.is_set():
                return
            self._router_call("/remove_worker", replica)
            with self._lock:
                old = replica.proc
                replica.expected_exit = True
                if old is not None:
                    old.send_signal(signal.SIGTERM)
            logger.info("rolling restart: replica %d draining", replica.index)
            while not self._stopping.is_set() and replica.proc is old:
                time.sleep(0.2)  # the supervisor restarts it once it has exited
            self._wait_ready(replica)
            self._router_call("/add_worker", replica)
            logger.info("rolling restart: replica %d ready again", replica.index)

    def shutdown(self) -> None:
        """Drain every replica, then stop the router."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        with self._lock:
            for replica in self.replicas:
                replica.expected_exit = True
                if replica.proc is not None and replica.proc.poll() is None:
                    replica.proc.send_signal(signal.SIGTERM)
        for replica in self.replicas:
            if replica.proc is not None:
                try:
                    replica.proc.wait(timeout=600)
                except subprocess.TimeoutExpired:
                    replica.proc.kill()
        if self.router is not None and self.router.poll() is None:
            self.router.send_signal(signal.SIGTERM)
            try:
                self.router.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.router.kill()
        logger.info("cluster stopped")


def add_cli(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "cluster", help="N replicas of `tokenmill serve` behind vllm-router on this host",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--port", type=int, default=8000, help="the router's port")
    parser.add_argument("--host", default="127.0.0.1", help="the router's address")
    parser.add_argument("--router-policy", default="cache_aware", choices=ROUTER_POLICIES)
    parser.add_argument("--router-balance-abs-threshold", type=int, default=8,
                        help="the cache-aware policy routes by load instead of prefix once "
                             "the busiest replica has this many more requests in flight "
                             "than the idlest (and --router-balance-rel-threshold times as "
                             "many); vllm-router's default 64 never triggers at the "
                             "concurrency of a small deployment (default 8)")
    parser.add_argument("--router-balance-rel-threshold", type=float, default=2.0)
    parser.add_argument("--router-arg", action="append", default=[],
                        help="extra vllm-router flag (repeatable, e.g. --router-arg=--api-key=K)")
    parser.add_argument("--router-binary", default=None)
    parser.add_argument("--log-dir", default="tokenmill-cluster-logs")
    parser.set_defaults(func=cluster_command, accepts_extra=True)


def cluster_command(args: argparse.Namespace, extra: list[str] | None = None) -> int:
    if args.replicas < 1:
        print("tokenmill cluster: error: --replicas must be >= 1", file=sys.stderr)
        return 2
    config = ClusterConfig(
        replicas=args.replicas, port=args.port, host=args.host, policy=args.router_policy,
        serve_args=list(extra or []), router_args=list(args.router_arg),
        balance_abs_threshold=args.router_balance_abs_threshold,
        balance_rel_threshold=args.router_balance_rel_threshold,
        log_dir=Path(args.log_dir), router_binary=args.router_binary)
    try:
        cluster = Cluster(config)
    except FileNotFoundError as exc:
        print(f"tokenmill cluster: error: {exc}", file=sys.stderr)
        return 2
    restart = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=cluster.shutdown).start())
    signal.signal(signal.SIGINT, lambda *_: threading.Thread(target=cluster.shutdown).start())
    signal.signal(signal.SIGHUP, lambda *_: restart.set())

    def restarter() -> None:
        while not cluster._stopping.is_set():
            if restart.wait(0.5):
                restart.clear()
                cluster.rolling_restart()

    try:
        cluster.start()
    except (RuntimeError, TimeoutError) as exc:
        logger.error("%s", exc)
        cluster.shutdown()
        return 1
    threading.Thread(target=restarter, daemon=True).start()
    status = cluster.supervise()
    return status
