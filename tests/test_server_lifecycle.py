"""Lifecycle of a real server process: 503 while the model loads, and a graceful drain
on SIGTERM (running streams finish, new requests get 503, exit status 0)."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
from server_utils import ServerProcess

ARGS = ["--max-model-len", "512", "--kv-cache-memory", "64MiB"]


class StreamReader(threading.Thread):
    """Reads one streamed completion in the background."""

    def __init__(self, url: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.body = {"prompt": "Tell me a long story.", "max_tokens": max_tokens,
                     "temperature": 0, "ignore_eos": True, "stream": True,
                     "stream_options": {"include_usage": True}}
        self.started = threading.Event()
        self.lines: list[str] = []
        self.status: int | None = None

    def run(self) -> None:
        with httpx.stream("POST", self.url + "/v1/completions", json=self.body,
                          timeout=600) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                if line:
                    self.lines.append(line)
                    self.started.set()

    def events(self) -> list[dict]:
        return [json.loads(line[6:]) for line in self.lines if line.startswith("data: {")]


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_loading_then_drain_on_sigterm():
    server = ServerProcess([*ARGS, "--shutdown-timeout", "600", "--log-prompts"])
    try:
        seen = server.wait_ready()
        # The HTTP server answers before the model is loaded.
        assert 503 in seen and seen[-1] == 200, seen

        streams = [StreamReader(server.url, 16) for _ in range(3)]
        for stream in streams:
            stream.start()
        for stream in streams:
            assert stream.started.wait(600)
        server.signal(signal.SIGTERM)

        wait_for(lambda: server.health_status() == 503)
        health = httpx.get(server.url + "/health")
        assert health.json()["status"] == "server_draining"
        refused = httpx.post(server.url + "/v1/completions",
                             json={"prompt": "Hi", "max_tokens": 1}, timeout=60)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "server_draining"
        assert int(refused.headers["retry-after"]) >= 1

        for stream in streams:
            stream.join(600)
            assert stream.status == 200
            assert stream.lines[-1] == "data: [DONE]"
            events = stream.events()
            assert events[-1]["usage"]["completion_tokens"] == 16
            assert not any("error" in e for e in events)
        assert server.wait_exit(120) == 0
        log = server.log_text()
        assert "draining" in log
        logged = [json.loads(line) for line in log.splitlines() if line.startswith('{"event"')]
        assert {line.get("prompt") for line in logged if line["status"] == 200} == {
            "Tell me a long story."}  # --log-prompts
    finally:
        server.cleanup()


def test_shutdown_timeout_aborts_what_is_left():
    server = ServerProcess([*ARGS, "--shutdown-timeout", "0.5"])
    try:
        server.wait_ready()
        stream = StreamReader(server.url, 480)
        stream.start()
        assert stream.started.wait(600)
        server.signal(signal.SIGTERM)
        stream.join(600)
        assert stream.lines[-1] == "data: [DONE]"
        error = json.loads(stream.lines[-2][6:])["error"]
        assert error["code"] == "server_draining"
        assert server.wait_exit(120) == 0
    finally:
        server.cleanup()


def test_model_that_cannot_load_exits_1(tmp_path):
    server = ServerProcess(["--model", str(tmp_path / "missing.gguf")])
    try:
        assert server.wait_exit(300) == 1
        log = server.log_text()
        assert "failed to load the engine" in log and "missing.gguf" in log
    finally:
        server.cleanup()


def _engine_core_pid(server: ServerProcess) -> int:
    """The engine core process: the server's child named in its log."""
    for line in server.log_text().splitlines():
        if "engine core process started (pid" in line:
            return int(line.rsplit("pid ", 1)[1].rstrip(")"))
    raise AssertionError("no engine core pid in the log")


def test_engine_process_death_fails_requests_and_exits_nonzero():
    """Kill -9 the engine core: /health turns 503 within a second, the stream in flight
    ends with an error event, and the server exits non-zero for its supervisor."""
    import os

    server = ServerProcess(ARGS)
    try:
        server.wait_ready()
        stream = StreamReader(server.url, 400)
        stream.start()
        assert stream.started.wait(600)
        os.kill(_engine_core_pid(server), signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: server.health_status() in (503, None), timeout=30)
        assert time.monotonic() - killed < 5  # generous: the goal is well under a second
        stream.join(60)
        events = stream.events()
        assert events[-1]["error"]["code"] == "engine_dead"
        assert stream.lines[-1] == "data: [DONE]"
        assert server.wait_exit(60) == 1
        assert "engine core process died" in server.log_text()
    finally:
        server.cleanup()


def test_a_10mb_body_is_refused_while_health_keeps_answering():
    server = ServerProcess(ARGS)
    try:
        server.wait_ready()
        body = json.dumps({"prompt": "word " * 2_000_000}).encode()
        result: dict[str, int] = {}

        def send() -> None:
            result["status"] = httpx.post(server.url + "/v1/completions", content=body,
                                          headers={"content-type": "application/json"},
                                          timeout=120).status_code

        sender = threading.Thread(target=send)
        sender.start()
        statuses = []
        while sender.is_alive():
            statuses.append(server.health_status())
        sender.join()
        assert result["status"] == 413
        assert statuses and set(statuses) == {200}
    finally:
        server.cleanup()
