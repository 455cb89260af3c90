"""Cache-aware vs round-robin routing over local replicas, side by side.

Starts ``tokenmill cluster`` (``--replicas`` servers behind vllm-router) once per policy
and drives it with the multi-tenant workload of ``tokenmill bench serve``: ``--tenants``
tenants, each with a ``--prefix-len``-token shared prefix, the tenant of each request
drawn at random (seeded). Each replica's KV cache is sized (``--kv-cache-memory``) so
that all tenants' prefixes overflow one replica but fit the cluster: routing decides the
hit rate. Prints, per policy, the token-level prefix hit rate, TTFT mean and p90,
throughput, each replica's share of the requests, and the ratios cache-aware /
round-robin next to the goals (hit rate >= 0.8; TTFT <= 0.5x; throughput >= 1.3x).

Router overhead: the same requests straight to one replica vs through the router
(p50 TTFT difference, goal <= 5 ms) with ``--overhead``.

    python benchmarks/cluster_routing.py                    # 4 replicas, ~15 min on 2 cores
    python benchmarks/cluster_routing.py --replicas 2 --tenants 6 --num-prompts 60
"""

from __future__ import annotations

import argparse
import json
import os
import signal
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


def run_policy(policy: str, args: argparse.Namespace, flags: list[str]) -> dict:
    port = free_port()
    log_dir = tempfile.mkdtemp(prefix=f"tokenmill-cluster-{policy}-")
    cmd = [sys.executable, "-m", "tokenmill", "cluster", "--replicas", str(args.replicas),
           "--port", str(port), "--router-policy", policy, "--log-dir", log_dir,
           "--router-balance-abs-threshold", str(args.balance_abs_threshold),
           "--router-balance-rel-threshold", str(args.balance_rel_threshold),
           "--max-model-len", "2048", "--kv-cache-memory", args.kv_cache_memory, *flags]
    cluster = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=open(Path(log_dir) / "cluster.log", "w"))  # noqa: SIM115
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if cluster.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"cluster did not start; see {log_dir}")
            time.sleep(1)
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
    finally:
        cluster.send_signal(signal.SIGTERM)
        try:
            cluster.wait(300)
        except subprocess.TimeoutExpired:
            cluster.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--tenants", type=int, default=12)
    parser.add_argument("--prefix-len", type=int, default=300)
    parser.add_argument("--suffix-len", type=int, default=20)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=120)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--balance-abs-threshold", type=int, default=8)
    parser.add_argument("--balance-rel-threshold", type=float, default=2.0)
    parser.add_argument("--kv-cache-memory", default="80MiB",
                        help="per replica; SmolLM2 float32 KV is 45 KiB per token")
    args, flags = parser.parse_known_args()
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
