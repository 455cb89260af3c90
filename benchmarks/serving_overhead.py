"""What serving costs over the offline engine, side by side, with the ratios.

Measures, on the same machine in one sitting and with the same engine flags:

1. output tokens/s of ``LLM.generate`` with ``--concurrency`` prompts in flight
   (fresh ~``--input-len``-token prompts, ``--output-len`` tokens each, EOS
   ignored) against ``tokenmill serve`` driven by ``tokenmill bench serve`` at
   the same concurrency (streamed);
2. time per output token of one request alone: offline (first to last token of
   ``LLMEngine.step``) against served (TPOT of one stream);
3. ``/health`` latency (p50/p99/max) while 10 MB request bodies are being
   refused, against the same probes on an idle server.

Goals (issue: engine core in its own process): served throughput >= 0.9x offline,
served single-stream TPOT <= 1.1x offline, /health p99 < 50 ms.

    python benchmarks/serving_overhead.py                       # ~5 min on 2 CPU cores
    python benchmarks/serving_overhead.py --quantization int4   # any engine flag
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from server_utils import ServerProcess  # noqa: E402

from tokenmill.bench.llamacpp import _timed_request  # noqa: E402
from tokenmill.bench.offline import make_workload, run_tokenmill  # noqa: E402
from tokenmill.llm import LLM  # noqa: E402


def offline(args: argparse.Namespace, engine_flags: list[str]) -> dict[str, float]:
    kwargs = _engine_kwargs(engine_flags)
    llm = LLM(max_num_seqs=args.concurrency, **kwargs)
    vocab = llm.engine.model_config.vocab_size
    work = make_workload(args.concurrency * args.rounds, (args.input_len, args.input_len),
                         (args.output_len, args.output_len), vocab, seed=1)
    result = run_tokenmill(llm, work)
    tpots = []
    for i in range(3):
        prompt = make_workload(1, (args.input_len, args.input_len), (1, 1), vocab,
                               seed=100 + i).prompts[0]
        _, first, last, n = _timed_request(llm.engine, f"tpot-{i}", prompt, args.output_len)
        tpots.append((last - first) / (n - 1))
    del llm
    gc.collect()
    return {"throughput": result.output_tps, "tpot_ms": 1000 * statistics.median(tpots)}


def served(args: argparse.Namespace, engine_flags: list[str]) -> dict[str, float]:
    server = ServerProcess(["--max-num-seqs", str(args.concurrency), *engine_flags])
    try:
        server.wait_ready()
        out: dict[str, float] = {}
        conc = _bench_serve(server.url, args, args.concurrency, args.concurrency * args.rounds)
        out["throughput"] = conc["output_throughput"]
        single = _bench_serve(server.url, args, 1, 3)
        out["tpot_ms"] = single["tpot"]["median"]  # already in ms
        out.update(_health_under_big_bodies(server.url, args.big_bodies))
        return out
    finally:
        server.cleanup()


def _bench_serve(url: str, args: argparse.Namespace, concurrency: int, num: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "tokenmill.bench.serve", "--base-url", url,
               "--workload", "random", "--random-input-len", str(args.input_len),
               "--random-output-len", str(args.output_len), "--num-prompts", str(num),
               "--max-concurrency", str(concurrency), "--disable-tqdm",
               "--result-json", str(result)]
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        data = json.loads(result.read_text())
    return data["runs"][0]["summary"]


def _health_under_big_bodies(url: str, count: int) -> dict[str, float]:
    def probe(seconds: float) -> list[float]:
        latencies = []
        end = time.monotonic() + seconds
        with httpx.Client(timeout=30) as client:
            while time.monotonic() < end:
                t0 = time.perf_counter()
                client.get(url + "/health")
                latencies.append(time.perf_counter() - t0)
        return latencies

    idle = probe(2.0)
    body = json.dumps({"prompt": "word " * 2_000_000}).encode()  # 10 MB
    statuses: list[int] = []

    def send() -> None:
        with httpx.Client(timeout=120) as client:
            for _ in range(count):
                statuses.append(client.post(
                    url + "/v1/completions", content=body,
                    headers={"content-type": "application/json"}).status_code)

    sender = threading.Thread(target=send)
    sender.start()
    busy: list[float] = []
    while sender.is_alive():
        busy += probe(0.2)
    sender.join()
    return {"health_idle_p99_ms": 1000 * _p99(idle), "health_p50_ms": 1000 * _p50(busy),
            "health_p99_ms": 1000 * _p99(busy), "health_max_ms": 1000 * max(busy),
            "big_bodies_refused": statuses.count(413), "big_bodies": len(statuses)}


def _p50(values: list[float]) -> float:
    return statistics.median(values)


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def _engine_kwargs(flags: list[str]) -> dict:
    from tokenmill.engine.args import EngineArgs

    parser = argparse.ArgumentParser()
    EngineArgs.add_cli_args(parser)
    parsed = parser.parse_args(flags)
    defaults = parser.parse_args([])
    return {k: v for k, v in vars(parsed).items() if v != getattr(defaults, k)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2,
                        help="requests per concurrency slot (default 2)")
    parser.add_argument("--input-len", type=int, default=100)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--big-bodies", type=int, default=5,
                        help="10 MB bodies sent while /health is probed (default 5)")
    args, engine_flags = parser.parse_known_args()
    cpu = os.popen("lscpu | grep 'Model name'").read().split(":")[-1].strip()
    print(f"machine: {cpu}, {os.cpu_count()} cores; engine flags: {engine_flags or 'default'}",
          flush=True)
    off = offline(args, engine_flags)
    srv = served(args, engine_flags)
    rows = [
        (f"output tok/s at {args.concurrency} streams", off["throughput"], srv["throughput"],
         srv["throughput"] / off["throughput"], ">= 0.90x"),
        ("single-stream ms per output token", off["tpot_ms"], srv["tpot_ms"],
         srv["tpot_ms"] / off["tpot_ms"], "<= 1.10x"),
    ]
    print(f"\n{'metric':40} {'offline':>10} {'served':>10} {'ratio':>8}  goal")
    for name, a, b, ratio, goal in rows:
        print(f"{name:40} {a:10.1f} {b:10.1f} {ratio:7.2f}x  {goal}")
    print(f"\n/health while {srv['big_bodies']} x 10 MB bodies were refused "
          f"({srv['big_bodies_refused']} got 413): p50 {srv['health_p50_ms']:.1f} ms, "
          f"p99 {srv['health_p99_ms']:.1f} ms (goal < 50), max {srv['health_max_ms']:.1f} ms; "
          f"idle p99 {srv['health_idle_p99_ms']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
