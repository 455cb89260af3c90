"""A real server with --kv-cache-dtype int8 and a disk tier, restarted: the second
process answers a known prefix from disk (cached_tokens in usage, offload metrics)."""

from __future__ import annotations

import httpx
from server_utils import start_server

PROMPT = ("The history of the printing press begins in the fifteenth century, when movable "
          "type changed how books were made, copied and sold across Europe. ") * 3


def _complete(server) -> dict:
    resp = httpx.post(server.url + "/v1/completions", timeout=600, json={
        "prompt": PROMPT, "max_tokens": 4, "temperature": 0})
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_restarted_server_serves_the_prefix_from_disk(tmp_path):
    args = ["--max-model-len", "512", "--kv-cache-memory", "64MiB", "--num-threads", "1",
            "--kv-cache-dtype", "int8", "--kv-offload-dir", str(tmp_path / "kv"),
            "--kv-offload-dir-size", "256MiB"]
    first = start_server(args)
    try:
        before = _complete(first)
        assert before["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        metrics = first.wait_idle()
        assert metrics["tokenmill_kv_cache_capacity_tokens"] > 0
    finally:
        first.cleanup()  # SIGTERM: the engine core writes what is queued, then exits
    assert list((tmp_path / "kv").rglob("*.kvb"))

    second = start_server(args)
    try:
        after = _complete(second)
        prompt_tokens = after["usage"]["prompt_tokens"]
        cached = after["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached == (prompt_tokens - 1) // 16 * 16 and cached > 0
        assert after["choices"][0]["text"] == before["choices"][0]["text"]
        metrics = second.wait_idle()
        assert metrics["tokenmill_kv_offload_hits_total"] == cached // 16
        assert metrics["tokenmill_kv_offload_restored_tokens_total"] == cached
        assert metrics["tokenmill_prefix_cache_hits_total"] == 0
    finally:
        second.cleanup()
