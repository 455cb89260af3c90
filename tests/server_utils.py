"""Helpers for tests that run a real tokenmill server (and Redis) as subprocesses."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
# Loading the model takes seconds alone, much longer on a busy shared machine.
STARTUP_TIMEOUT_S = 600.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``python -m tokenmill.server`` on a free loopback port, output kept in a file."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = list(args)
        self._log = tempfile.NamedTemporaryFile(
            prefix="tokenmill-server-", suffix=".log", delete=False
        )
        self.log_path = Path(self._log.name)
        cmd = [sys.executable, "-m", "tokenmill.server", "--host", "127.0.0.1",
               "--port", str(self.port), *self.args]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def health_status(self) -> int | None:
        """The /health status code, or None while nothing listens."""
        try:
            return httpx.get(self.url + "/health", timeout=5).status_code
        except httpx.HTTPError:
            return None

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> list[int | None]:
        """Poll /health until 200; return the statuses seen on the way."""
        seen: list[int | None] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}"
                )
            status = self.health_status()
            if not seen or seen[-1] != status:
                seen.append(status)
            if status == 200:
                return seen
            time.sleep(0.05)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log_text()[-4000:]}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 120.0) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        """SIGTERM and wait; SIGKILL if it does not exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log.close()

    def cleanup(self) -> None:
        self.stop()
        self.log_path.unlink(missing_ok=True)

    # ----- clients ------------------------------------------------------------------

    def openai(self, api_key: str = "unused", **kwargs: Any) -> Any:
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0,
                             timeout=kwargs.pop("timeout", 300.0), **kwargs)

    def async_openai(self, api_key: str = "unused", **kwargs: Any) -> Any:
        import openai

        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0,
                                  timeout=kwargs.pop("timeout", 300.0), **kwargs)

    def metrics(self, headers: dict[str, str] | None = None) -> dict[str, float]:
        """Scrape /metrics into {'name{labels}': value}."""
        resp = httpx.get(self.url + "/metrics", headers=headers, timeout=30)
        resp.raise_for_status()
        return parse_metrics(resp.text)

    def wait_idle(self, timeout: float = 120.0) -> dict[str, float]:
        """Wait until the engine runs nothing and holds no KV blocks; return the metrics."""
        deadline = time.monotonic() + timeout
        while True:
            values = self.metrics()
            idle = (
                values.get("tokenmill_num_requests_running") == 0
                and values.get("tokenmill_num_requests_waiting") == 0
                and values.get("tokenmill_kv_cache_usage_ratio") == 0
            )
            if idle or time.monotonic() > deadline:
                return values
            time.sleep(0.2)


async def stream_then_disconnect(client: Any, model: str, prompt: str, chunks: int,
                                 max_tokens: int) -> None:
    """Stream a long completion (``ignore_eos``) and hang up after ``chunks`` chunks."""
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        extra_body={"ignore_eos": True})
    received = 0
    async for _ in stream:
        received += 1
        if received == chunks:
            break
    await stream.close()


def start_server(args: list[str], env: dict[str, str] | None = None) -> ServerProcess:
    server = ServerProcess(args, env)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


def parse_metrics(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        values[name] = float(value)
    return values


class RedisProcess:
    """A throwaway ``redis-server`` on a free loopback port (no persistence)."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
