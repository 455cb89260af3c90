"""A real Prometheus scrapes a real replica under load: the KEDA ScaledObject's
queue-depth query (read from deploy/kubernetes/base/scaledobject.yaml) rises above its
threshold while the replica is saturated and falls back below it afterwards."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from server_utils import free_port, start_server

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def scaled_object_trigger(name: str) -> tuple[str, float]:
    doc = yaml.safe_load((ROOT / "deploy/kubernetes/base/scaledobject.yaml").read_text())
    trigger = next(t for t in doc["spec"]["triggers"] if t["name"] == name)
    return trigger["metadata"]["query"], float(trigger["metadata"]["threshold"])


class Prometheus:
    def __init__(self, target: str) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.skip("prometheus is not installed (apt-get install prometheus)")
        self.dir = Path(tempfile.mkdtemp(prefix="tokenmill-prom-"))
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "scrape_configs": [{
                      "job_name": "tokenmill", "metrics_path": "/metrics",
                      # What the ServiceMonitor's Service adds in a cluster.
                      "static_configs": [{"targets": [target],
                                          "labels": {"service": "tokenmill-replica"}}]}]}
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [binary, f"--config.file={self.dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "log", "w"))  # noqa: SIM115

    def query(self, promql: str) -> float | None:
        try:
            resp = httpx.get(self.url + "/api/v1/query", params={"query": promql}, timeout=5)
            result = resp.json()["data"]["result"]
        except (httpx.HTTPError, KeyError, ValueError):
            return None
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, promql: str, predicate, timeout: float = 180.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.query(promql)
            if value is not None and predicate(value):
                return value
            time.sleep(0.5)
        raise AssertionError(f"{promql} never satisfied the condition; last {value}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)


def test_queue_depth_query_crosses_the_threshold_under_load_and_falls_back():
    query, threshold = scaled_object_trigger("queue-depth")
    if shutil.which("prometheus") is None:  # before the server starts: a skip would leak it
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    server = start_server(["--max-model-len", "512", "--kv-cache-memory", "64MiB",
                           "--max-num-seqs", "2"])
    prom = Prometheus(f"127.0.0.1:{server.port}")
    stop = threading.Event()

    def client() -> None:
        body = {"prompt": "Tell me a story.", "max_tokens": 48, "ignore_eos": True}
        while not stop.is_set():
            try:
                httpx.post(server.url + "/v1/completions", json=body, timeout=600)
            except httpx.HTTPError:
                pass

    clients = [threading.Thread(target=client) for _ in range(int(threshold) + 8)]
    try:
        assert prom.wait_for(query, lambda v: v <= threshold) <= threshold  # idle
        for c in clients:
            c.start()
        assert prom.wait_for(query, lambda v: v > threshold) > threshold  # saturated
        stop.set()
        assert prom.wait_for(query, lambda v: v <= threshold, timeout=600) <= threshold
    finally:
        stop.set()
        for c in clients:
            c.join(600)
        prom.stop()
        server.cleanup()
