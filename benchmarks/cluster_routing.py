"""Cache-aware vs round-robin routing over local replicas, side by side.

Starts ``tokenmill cluster`` (``--replicas`` servers behind vllm-router) once per policy
and drives it with the multi-tenant workload of ``tokenmill bench serve``: ``--tenants``
tenants, each with a ``--prefix-len``-token shared prefix, the tenant of each request
drawn at random (seeded). Each replica's KV cache is sized (``--kv-cache-memory``) so
that all tenants' prefixes overflow one replica but fit the cluster: routing decides the
hit rate. Prints, per policy, the token-level prefix hit rate, TTFT mean and p90,
throughput, each replica's share of the requests, and the ratios cache-aware /
round-robin next to the goals (hit rate >= 0.8; TTFT <= 0.5x; throughput >= 1.3x).

Router overhead (``--overhead``): one replica behind the router; the same one-token
completion sent alternately straight to the replica and through the router, p50 latency
of each and the difference (goal <= 5 ms).

    python benchmarks/cluster_routing.py                    # 4 replicas, ~5 min on 2 cores
    python benchmarks/cluster_routing.py --replicas 2 --tenants 6 --num-prompts 60
    python benchmarks/cluster_routing.py --overhead         # ~1 min
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """``tokenmill cluster`` in a subprocess, for the length of a ``with`` block."""

    def __init__(self, policy: str, replicas: int, args: argparse.Namespace,
                 flags: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_dir = Path(tempfile.mkdtemp(prefix=f"tokenmill-cluster-{policy}-"))
        self.cmd = [
            sys.executable, "-m", "tokenmill", "cluster", "--replicas", str(replicas),
            "--port", str(self.port), "--router-policy", policy, "--log-dir", str(self.log_dir),
            "--router-balance-abs-threshold", str(args.balance_abs_threshold),
            "--router-balance-rel-threshold", str(args.balance_rel_threshold),
            "--max-model-len", "2048", "--kv-cache-memory", args.kv_cache_memory, *flags]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Cluster:
        self.proc = subprocess.Popen(
            self.cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
            stderr=open(self.log_dir / "cluster.log", "w"))  # noqa: SIM115
        deadline = time.monotonic() + 900
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"cluster did not start; see {self.log_dir}")
            time.sleep(1)

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(300)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def replica_urls(self) -> list[str]:
        """The replicas' URLs, from the launcher's log ("replica i: pid N on URL ...")."""
        log = (self.log_dir / "cluster.log").read_text()
        return re.findall(r"replica \d+: pid \d+ on (http://\S+)", log)


def run_policy(policy: str, args: argparse.Namespace, flags: list[str]) -> dict:
    with Cluster(policy, args.replicas, args, flags) as cluster:
        url = cluster.url
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            subprocess.run(
                [sys.executable, "-m", "tokenmill.bench.serve", "--base-url", url,
                 "--endpoint", "/v1/completions", "--workload", "tenants",
                 "--num-tenants", str(args.tenants), "--prefix-len", str(args.prefix_len),
                 "--suffix-len", str(args.suffix_len), "--random-output-len",
                 str(args.output_len), "--num-prompts", str(args.num_prompts),
                 "--max-concurrency", str(args.concurrency), "--seed", "7",
                 "--num-warmups", "0", "--disable-tqdm", "--result-json", str(out)],
                cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            return json.loads(out.read_text())["runs"][0]["summary"]


def measure_overhead(args: argparse.Namespace, flags: list[str]) -> int:
    """p50 latency of a one-token completion, straight to a replica vs through the router."""
    with Cluster("round_robin", 1, args, flags) as cluster:
        (replica,) = cluster.replica_urls()
        model = httpx.get(replica + "/v1/models", timeout=10).json()["data"][0]["id"]
        body = {"model": model, "prompt": "The router adds how much latency?",
                "max_tokens": 1, "temperature": 0}
        times: dict[str, list[float]] = {"direct": [], "routed": []}
        with httpx.Client(timeout=60) as client:
            for i in range(args.overhead_requests + 10):
                # Alternate the order so drift on a shared machine hits both alike.
                pair = [("direct", replica), ("routed", cluster.url)]
                for name, base in pair if i % 2 else pair[::-1]:
                    start = time.perf_counter()
                    client.post(base + "/v1/completions", json=body).raise_for_status()
                    if i >= 10:  # warm-up: connections, the prefix cache
                        times[name].append((time.perf_counter() - start) * 1000)
    direct, routed = (statistics.median(times[k]) for k in ("direct", "routed"))
    print(f"{args.overhead_requests} one-token completions each, alternating")
    print(f"{'p50 direct (ms)':24} {direct:8.2f}")
    print(f"{'p50 via router (ms)':24} {routed:8.2f}")
    print(f"{'router overhead (ms)':24} {routed - direct:8.2f}   goal <= 5 ms")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--tenants", type=int, default=12)
    parser.add_argument("--prefix-len", type=int, default=300)
    parser.add_argument("--suffix-len", type=int, default=20)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=160)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--balance-abs-threshold", type=int, default=8)
    parser.add_argument("--balance-rel-threshold", type=float, default=2.0)
    parser.add_argument("--kv-cache-memory", default="80MiB",
                        help="per replica; SmolLM2 float32 KV is 45 KiB per token")
    parser.add_argument("--overhead", action="store_true",
                        help="measure the router's added latency instead")
    parser.add_argument("--overhead-requests", type=int, default=100)
    args, flags = parser.parse_known_args()
    if args.overhead:
        return measure_overhead(args, flags)
    print(f"{args.replicas} replicas on {os.cpu_count()} cores; {args.tenants} tenants x "
          f"{args.prefix_len}-token prefixes; {args.num_prompts} requests at concurrency "
          f"{args.concurrency}; KV per replica {args.kv_cache_memory}", flush=True)
    results = {p: run_policy(p, args, flags) for p in ("round_robin", "cache_aware")}
    rr, ca = results["round_robin"], results["cache_aware"]
    print(f"\n{'metric':30} {'round_robin':>12} {'cache_aware':>12} {'ratio':>8}  goal")
    rows = [
        ("prefix hit rate (tokens)", rr["prefix_hit_rate"], ca["prefix_hit_rate"], None,
         ">= 0.80"),
        ("TTFT mean (ms)", rr["ttft"]["mean"], ca["ttft"]["mean"], True, "<= 0.50x"),
        ("TTFT p90 (ms)", rr["ttft"]["p90"], ca["ttft"]["p90"], True, "<= 0.50x"),
        ("output tok/s", rr["output_throughput"], ca["output_throughput"], True, ">= 1.30x"),
        ("failed requests", rr["failed"], ca["failed"], None, "0"),
    ]
    for name, a, b, ratio, goal in rows:
        r = f"{b / a:7.2f}x" if ratio and a else "       -"
        a_s = "-" if a is None else f"{a:12,.3f}" if isinstance(a, float) else f"{a:12}"
        b_s = "-" if b is None else f"{b:12,.3f}" if isinstance(b, float) else f"{b:12}"
        print(f"{name:30} {a_s:>12} {b_s:>12} {r}  {goal}")
    for policy, summary in results.items():
        print(f"requests by replica ({policy}): {summary['requests_by_server']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
