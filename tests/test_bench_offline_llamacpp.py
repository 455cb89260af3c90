"""llama.cpp in ``tokenmill bench offline``: llama-bench JSON, tables, llama-server client."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tokenmill.bench import llamacpp, offline
from tokenmill.bench.llamacpp import (
    LlamaBenchTest,
    MicroRow,
    TokenmillMicroTest,
    completion_body,
    format_micro_table,
    pair_micro_results,
    parse_llama_bench_json,
    run_llama_server,
)
from tokenmill.bench.offline import BenchResult, format_table

PEER_BIN = Path(os.environ.get(
    "TOKENMILL_LLAMA_CPP_BIN",
    Path.home() / ".cache/tokenmill-bench/llama-cpp-0.3.36/llama.cpp-build/bin"))

# The shape `llama-bench -o json` prints (json_printer in tools/llama-bench/llama-bench.cpp):
# an array with one object per test, every field of test::get_fields(), then samples.
# Field for field as printed by the llama-bench built from llama-cpp-python 0.3.36's
# llama.cpp (build 0c1e570) on the bundled GGUF; the timings are made up.
LLAMA_BENCH_JSON = """[
  {
    "build_commit": "0c1e570",
    "build_number": 1,
    "cpu_info": "AMD EPYC",
    "gpu_info": "",
    "backends": "CPU",
    "model_filename": "/models/SmolLM2-135M-Instruct.Q4_1.gguf",
    "model_type": "llama 256M Q4_1",
    "model_size": 96576768,
    "model_n_params": 134515008,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "cpu_mask": "0x0",
    "cpu_strict": false,
    "poll": 50,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": -1,
    "n_cpu_moe": 0,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": false,
    "flash_attn": -1,
    "devices": "auto",
    "tensor_split": "0.00",
    "tensor_buft_overrides": "none",
    "load_mode": "auto",
    "lazy_mode": "auto",
    "embeddings": false,
    "no_op_offload": 0,
    "no_host": false,
    "repack": true,
    "fit_target": 0,
    "fit_min_ctx": 0,
    "n_prompt": 512,
    "n_gen": 0,
    "n_depth": 0,
    "test_time": "2026-12-01T20:57:21Z",
    "avg_ns": 400000000,
    "stddev_ns": 10000000,
    "avg_ts": 1280.533667,
    "stddev_ts": 32.023335,
    "samples_ns": [ 390000000, 400000000, 410000000 ],
    "samples_ts": [ 1312.8205, 1280.0, 1248.7805 ]
  },
  {
    "build_commit": "0c1e570",
    "build_number": 1,
    "cpu_info": "AMD EPYC",
    "gpu_info": "",
    "backends": "CPU",
    "model_filename": "/models/SmolLM2-135M-Instruct.Q4_1.gguf",
    "model_type": "llama 256M Q4_1",
    "model_size": 96576768,
    "model_n_params": 134515008,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "cpu_mask": "0x0",
    "cpu_strict": false,
    "poll": 50,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": -1,
    "n_cpu_moe": 0,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": false,
    "flash_attn": -1,
    "devices": "auto",
    "tensor_split": "0.00",
    "tensor_buft_overrides": "none",
    "load_mode": "auto",
    "lazy_mode": "auto",
    "embeddings": false,
    "no_op_offload": 0,
    "no_host": false,
    "repack": true,
    "fit_target": 0,
    "fit_min_ctx": 0,
    "n_prompt": 0,
    "n_gen": 128,
    "n_depth": 0,
    "test_time": "2026-12-01T20:57:21Z",
    "avg_ns": 1280000000,
    "stddev_ns": 20000000,
    "avg_ts": 100.016267,
    "stddev_ts": 1.562963,
    "samples_ns": [ 1300000000, 1280000000, 1260000000 ],
    "samples_ts": [ 98.4615, 100.0, 101.5873 ]
  }
]
"""


# ---------------------------------------------------------------- llama-bench JSON

def test_parse_llama_bench_json():
    pp, tg = parse_llama_bench_json(LLAMA_BENCH_JSON)
    assert (pp.name, pp.n_prompt, pp.n_gen, pp.n_threads) == ("pp512", 512, 0, 2)
    assert pp.avg_ts == pytest.approx(1280.533667) and pp.median_ts == 1280.0
    assert pp.model_type == "llama 256M Q4_1" and pp.build_commit == "0c1e570"
    assert pp.cpu_info == "AMD EPYC"
    assert tg.name == "tg128" and tg.median_ts == 100.0 and tg.samples_ts[0] == 98.4615


def test_parse_llama_bench_json_tolerates_a_log_line_and_names_tests():
    got = parse_llama_bench_json("load_backend: loaded CPU backend\n" + LLAMA_BENCH_JSON)
    assert [t.name for t in got] == ["pp512", "tg128"]
    assert LlamaBenchTest(512, 128, 0, 1, 1.0, 0.0, []).name == "pp512+tg128"
    assert LlamaBenchTest(0, 32, 1024, 1, 1.0, 0.0, []).name == "tg32 @ d1024"
    assert LlamaBenchTest(0, 32, 0, 1, 7.0, 0.0, []).median_ts == 7.0  # no samples: mean
    for bad in ("", "{}", '[{"n_prompt": 1}]', "[1, 2]"):
        with pytest.raises(ValueError):
            parse_llama_bench_json(bad)


def test_llama_bench_command():
    assert llamacpp.llama_bench_command("/b/llama-bench", "m.gguf", 512, 128, 2, 5) == [
        "/b/llama-bench", "-m", "m.gguf", "-p", "512", "-n", "128", "-t", "2", "-r", "5",
        "-o", "json"]


def test_run_llama_bench_reports_missing_binary(tmp_path):
    with pytest.raises(FileNotFoundError):
        llamacpp.run_llama_bench(str(tmp_path / "nope"), "m.gguf", 8, 8, 1, 1)


def test_run_llama_bench_with_a_stand_in_binary(tmp_path):
    fake = tmp_path / "llama-bench"
    fixture = tmp_path / "out.json"
    fixture.write_text(LLAMA_BENCH_JSON)
    fake.write_text(f"#!/bin/sh\necho 'some log' >&2\ncat {fixture}\n")
    fake.chmod(0o755)
    tests = llamacpp.run_llama_bench(str(fake), "m.gguf", 512, 128, 2, 3)
    assert [t.name for t in tests] == ["pp512", "tg128"]
    fake.write_text("#!/bin/sh\necho 'error: failed to load model' >&2\nexit 1\n")
    with pytest.raises(RuntimeError, match="failed to load model"):
        llamacpp.run_llama_bench(str(fake), "m.gguf", 512, 128, 2, 3)


# ------------------------------------------------------------------------ tables

def test_pair_and_format_micro_table():
    theirs = parse_llama_bench_json(LLAMA_BENCH_JSON)
    ours = [TokenmillMicroTest(512, 0, [600.0, 640.0, 620.0]),
            TokenmillMicroTest(0, 128, [25.0, 24.0, 26.0])]
    rows = pair_micro_results(theirs, ours)
    assert rows == [MicroRow("pp512", 1280.0, 620.0), MicroRow("tg128", 100.0, 25.0)]
    assert rows[0].ratio == pytest.approx(620 / 1280)
    lines = format_micro_table(rows).splitlines()
    assert lines[0].split() == ["test", "llama.cpp", "tok/s", "tokenmill", "tok/s",
                                "tokenmill/llama.cpp"]
    assert lines[1].split() == ["pp512", "1,280.0", "620.0", "0.48x"]
    assert lines[2].split() == ["tg128", "100.0", "25.0", "0.25x"]
    # A test only one side ran still gets a row.
    rows = pair_micro_results(theirs[:1], ours)
    assert rows[1] == MicroRow("tg128", None, 25.0) and rows[1].ratio is None
    assert format_micro_table(rows).splitlines()[2].split() == ["tg128", "-", "25.0", "-"]


def test_throughput_table_with_a_llama_server_row():
    rows = [BenchResult("tokenmill", 10.0, 4, 400, 200),
            BenchResult("llama-server (conc 4, 4 slots)", 5.0, 4, 400, 200)]
    lines = format_table(rows).splitlines()
    assert len(lines) == 3
    assert lines[2].startswith("llama-server (conc 4, 4 slots)")
    assert lines[2].split()[-4:] == ["5.00", "40.0", "120.0", "0.50x"]


def test_cli_flags():
    root = argparse.ArgumentParser()
    offline.add_cli(root.add_subparsers())
    args = root.parse_args(["offline", "--llama-bench", "/x/llama-bench", "-p", "64", "-n",
                            "16", "-r", "2", "--llama-server", "http://h:1",
                            "--llama-server-concurrency", "3"])
    assert (args.llama_bench, args.n_prompt, args.n_gen, args.reps) == (
        "/x/llama-bench", 64, 16, 2)
    assert args.llama_server == "http://h:1" and args.llama_server_concurrency == 3
    args = root.parse_args(["offline"])
    assert (args.n_prompt, args.n_gen, args.reps, args.llama_bench, args.llama_server,
            args.llama_server_concurrency, args.throughput) == (512, 128, 5, None, None, None,
                                                                False)
    for bad in (["-r", "0"], ["-p", "-1"], ["--llama-server-concurrency", "0"]):
        with pytest.raises(SystemExit):
            root.parse_args(["offline", *bad])


# ----------------------------------------------------------- llama-server client

class _FakeLlamaServer:
    """A real HTTP server with llama-server's /props and /completion (non-streamed)."""

    def __init__(self, status: int = 200, delay: float = 0.05):
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _send(self, code: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/props":
                    self._send(200, {"total_slots": 2, "model_path": "/m/model.gguf"})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/completion":
                    self._send(404, {"error": "not found"})
                    return
                with fake.lock:
                    fake.bodies.append(body)
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                time.sleep(delay)
                with fake.lock:
                    fake.in_flight -= 1
                if status != 200:
                    self._send(status, {"error": {"message": "context size exceeded"}})
                    return
                n = body["n_predict"]
                self._send(200, {"content": "x" * n, "tokens": [], "stop": True,
                                 "tokens_predicted": n, "tokens_evaluated": len(body["prompt"]),
                                 "timings": {"prompt_n": len(body["prompt"]), "predicted_n": n}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> _FakeLlamaServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_completion_body_fields():
    assert completion_body([5, 6, 7], 9) == {
        "prompt": [5, 6, 7], "n_predict": 9, "ignore_eos": True, "cache_prompt": False,
        "temperature": 0.0, "stream": False}


def test_llama_server_client_sends_the_workload():
    work = offline.make_workload(6, (10, 20), (3, 8), vocab_size=1000, seed=1)
    with _FakeLlamaServer() as fake:
        run = run_llama_server(fake.url + "/v1", work.prompts, work.output_lens)
    assert fake.bodies[0]["n_predict"] == 4  # the warm-up request
    timed = fake.bodies[1:]
    assert sorted(map(json.dumps, (b["prompt"] for b in timed))) == sorted(
        map(json.dumps, work.prompts))
    by_prompt = {tuple(b["prompt"]): b for b in timed}
    for p, n in zip(work.prompts, work.output_lens):
        b = by_prompt[tuple(p)]
        assert b["n_predict"] == n and b["ignore_eos"] is True and b["cache_prompt"] is False
    assert (run.requests, run.prompt_tokens, run.output_tokens) == (
        6, work.input_tokens, work.output_tokens)
    assert run.concurrency == 6 and fake.max_in_flight >= 2  # all at once by default
    assert run.total_slots == 2 and run.model_path == "/m/model.gguf" and run.seconds > 0


def test_llama_server_client_caps_concurrency():
    work = offline.make_workload(6, (4, 4), (2, 2), vocab_size=500, seed=2)
    with _FakeLlamaServer(delay=0.1) as fake:
        run = run_llama_server(fake.url, work.prompts, work.output_lens, concurrency=2,
                               warmup=False)
    assert run.concurrency == 2 and fake.max_in_flight == 2 and len(fake.bodies) == 6


def test_llama_server_errors_are_raised():
    with _FakeLlamaServer(status=400) as fake:
        with pytest.raises(RuntimeError, match="400.*context size exceeded"):
            run_llama_server(fake.url, [[1, 2, 3]], [2], warmup=False)
    with pytest.raises(ValueError):
        run_llama_server("http://127.0.0.1:1", [[1]], [1, 2])


def _dummy_model(directory: Path) -> str:
    """A one-layer Llama config for --load-format dummy (random weights)."""
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=300,
               hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
               rms_norm_eps=1e-5, tie_word_embeddings=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    return str(directory)


def test_llama_server_row_in_cmd_offline(monkeypatch, capsys, tmp_path):
    """The whole command on a tiny dummy model, HF skipped, llama-server faked."""
    _dummy_model(tmp_path)
    out = tmp_path / "res.json"
    root = argparse.ArgumentParser()
    offline.add_cli(root.add_subparsers())
    with _FakeLlamaServer(delay=0.01) as fake:
        args = root.parse_args([
            "offline", "--model", str(tmp_path), "--load-format", "dummy", "--num-threads", "1",
            "--num-prompts", "3", "--input-len", "8:12", "--output-len", "2:4", "--no-hf",
            "--llama-server", fake.url, "--llama-server-concurrency", "2",
            "--result-json", str(out)])
        assert offline.cmd_offline(args) == 0
    table = capsys.readouterr().out.strip().splitlines()[-3:]
    assert table[0].split()[0] == "engine"
    assert table[1].startswith("tokenmill") and table[2].startswith("llama-server (conc 2, 2")
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["throughput"]][1].startswith("llama-server")
    assert data["llama_bench"] == []


def test_llama_bench_needs_a_gguf_model(tmp_path):
    _dummy_model(tmp_path)
    root = argparse.ArgumentParser()
    offline.add_cli(root.add_subparsers())
    args = root.parse_args(["offline", "--model", str(tmp_path), "--load-format", "dummy",
                            "--num-threads", "1", "--llama-bench", "/x/llama-bench"])
    with pytest.raises(ValueError, match="GGUF"):
        offline.cmd_offline(args)
    args = root.parse_args(["offline", "--llama-bench", "/x/llama-bench", "-p", "0", "-n", "0"])
    with pytest.raises(ValueError, match="-p or -n"):
        offline.cmd_offline(args)


def test_tokenmill_micro_tests_on_a_dummy_model(tmp_path):
    from tokenmill.llm import LLM

    _dummy_model(tmp_path)
    llm = LLM(str(tmp_path), load_format="dummy", num_threads=1)
    pp, tg = llamacpp.run_tokenmill_micro(llm.engine, 32, 8, reps=2)
    assert (pp.name, tg.name) == ("pp32", "tg8")
    assert len(pp.samples_ts) == len(tg.samples_ts) == 2
    assert all(x > 0 for x in pp.samples_ts + tg.samples_ts)
    assert [t.name for t in llamacpp.run_tokenmill_micro(llm.engine, 0, 4, 1)] == ["tg4"]
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks


# ------------------------------------------------------- the real llama.cpp binaries

def _gguf() -> str:
    from tokenmill.model.loader import default_model_path

    try:
        return default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.mark.slow
def test_real_llama_bench_json():
    binary = PEER_BIN / "llama-bench"
    if not os.access(binary, os.X_OK):
        pytest.skip(f"llama-bench not built at {binary}")
    tests = llamacpp.run_llama_bench(str(binary), _gguf(), 16, 4, 1, 1)
    assert [t.name for t in tests] == ["pp16", "tg4"]
    assert all(t.avg_ts > 0 and len(t.samples_ts) == 1 and t.n_threads == 1 for t in tests)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_real_llama_server_client():
    binary = PEER_BIN / "llama-server"
    if not os.access(binary, os.X_OK):
        pytest.skip(f"llama-server not built at {binary}")
    import httpx

    port = _free_port()
    proc = subprocess.Popen(
        [str(binary), "-m", _gguf(), "--host", "127.0.0.1", "--port", str(port),
         "--parallel", "2", "-c", "512", "-t", "1", "--no-webui"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("llama-server did not come up")
            time.sleep(1)
        work = offline.make_workload(3, (8, 16), (3, 5), vocab_size=49152, seed=0)
        run = run_llama_server(url, work.prompts, work.output_lens)
        assert run.requests == 3 and run.output_tokens == work.output_tokens
        assert run.prompt_tokens == work.input_tokens and run.total_slots == 2
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()

