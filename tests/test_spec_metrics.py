"""Speculative-decoding counters in EngineStats and the Prometheus exposition."""

from __future__ import annotations

from tokenmill.outputs import EngineStats
from tokenmill.server.metrics import ServerMetrics


def _stats(**spec: int) -> EngineStats:
    return EngineStats(
        num_running=0, num_waiting=0, kv_cache_usage=0.0, num_total_blocks=10,
        num_free_blocks=10, prefix_cache_queries=0, prefix_cache_hits=0, num_preemptions=0,
        prompt_tokens_total=0, generation_tokens_total=0, steps_total=0, **spec,
    )


def test_acceptance_rate():
    assert _stats().spec_acceptance_rate == 0.0
    stats = _stats(spec_draft_tokens_total=40, spec_accepted_tokens_total=30,
                   spec_verifications_total=10)
    assert stats.spec_acceptance_rate == 0.75


def test_spec_counters_are_exported():
    stats = _stats(spec_draft_tokens_total=40, spec_accepted_tokens_total=30,
                   spec_verifications_total=10)
    text = ServerMetrics(lambda: stats).render()[0].decode()
    assert "tokenmill_spec_decode_draft_tokens_total 40.0" in text
    assert "tokenmill_spec_decode_accepted_tokens_total 30.0" in text
    assert "tokenmill_spec_decode_verifications_total 10.0" in text
    assert "# TYPE tokenmill_spec_decode_draft_tokens_total counter" in text
    off = ServerMetrics(lambda: None).render()[0].decode()
    assert "tokenmill_spec_decode_accepted_tokens_total 0.0" in off
