"""`tokenmill cluster`: two real replicas behind a real vllm-router.

Streaming and usage pass through the router unchanged; the cache-aware policy gets
token ids from the replicas' render endpoints; a replica that dies is restarted; a
rolling restart (SIGHUP) under load fails no request; SIGTERM drains and exits 0.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from server_utils import free_port

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if shutil.which("vllm-router") is None and not (
            Path(sys.executable).parent / "vllm-router").exists():
        pytest.skip("vllm-router is not installed (pip install 'tokenmill[cluster]')")
    logs = tmp_path_factory.mktemp("cluster")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenmill", "cluster", "--replicas", "2", "--port", str(port),
         "--log-dir", str(logs), "--max-model-len", "1024", "--kv-cache-memory", "64MiB"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(logs / "cluster.err", "w"),  # noqa: SIM115
        start_new_session=True)  # its own process group: cleanup reaches the replicas too
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, (logs / "cluster.err").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(1)
    yield proc, url, logs
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # drains the replicas, stops the router
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def complete(url: str, prompt: str, stream: bool = False, **extra) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": stream, **extra}
    return httpx.post(url + "/v1/completions", json=body, timeout=300)


def test_streaming_and_usage_pass_through_the_router(cluster):
    _, url, logs = cluster
    plain = complete(url, "The capital of France is").json()
    assert plain["usage"]["completion_tokens"] == 8
    streamed = complete(url, "The capital of France is", stream=True,
                        stream_options={"include_usage": True})
    events = [json.loads(line[6:]) for line in streamed.text.splitlines()
              if line.startswith("data: {")]
    assert streamed.text.rstrip().endswith("data: [DONE]")
    text = "".join(c["text"] for e in events for c in e["choices"])
    assert text == plain["choices"][0]["text"]
    assert events[-1]["usage"] == plain["usage"] | {"prompt_tokens_details": events[-1][
        "usage"]["prompt_tokens_details"]}
    renders = sum(log.read_text().count('"/v1/completions/render"')
                  for log in logs.glob("replica-*.log"))
    assert renders >= 2  # the cache-aware policy asked a replica for token ids


def test_a_dead_replica_is_restarted_and_a_rolling_restart_fails_nothing(cluster):
    proc, url, logs = cluster
    pids = [int(line.rsplit("pid ", 1)[1].split()[0]) for line in
            (logs / "cluster.err").read_text().splitlines() if ": pid " in line]
    os.kill(pids[0], signal.SIGKILL)
    failures: list[str] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                resp = complete(url, "Count: one, two,")
                if resp.status_code != 200:
                    failures.append(f"{resp.status_code} {resp.text[:200]}")
            except httpx.HTTPError as exc:
                failures.append(repr(exc))

    workers = [threading.Thread(target=load) for _ in range(3)]
    deadline = time.monotonic() + 600
    # The killed replica comes back (its log shows a second start).
    while "replica 0 exited" not in (logs / "cluster.err").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.5)
    time.sleep(5)
    for worker in workers:
        worker.start()
    proc.send_signal(signal.SIGHUP)  # rolling restart under load
    while (logs / "cluster.err").read_text().count("ready again") < 2:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(1)
    stop.set()
    for worker in workers:
        worker.join(300)
    assert failures == []
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(300) == 0
