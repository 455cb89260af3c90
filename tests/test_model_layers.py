"""Layer building blocks against transformers' own functions, bit for bit where possible."""

from __future__ import annotations

import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama import modeling_llama

from tokenmill.model.layers import (
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    rope_inv_freq,
    silu_and_mul,
)

SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _llama_config(**extra) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072, **extra
    )


def test_inv_freq_identical_to_transformers() -> None:
    config = _llama_config(rope_theta=500000.0, rope_scaling=dict(SCALING))
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    assert torch.equal(rope_inv_freq(128, 500000.0, SCALING), want)
    default = _llama_config(rope_theta=10000.0)
    want_default, _ = modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(default)
    assert torch.equal(rope_inv_freq(128, 10000.0), want_default)


def test_rotary_matches_transformers_rotation() -> None:
    config = _llama_config(rope_theta=500000.0, rope_scaling=dict(SCALING))
    hf_rope = modeling_llama.LlamaRotaryEmbedding(config)
    positions = torch.tensor([0, 5, 1000, 9000, 70000])
    q = torch.randn(5, 32, 128)
    k = torch.randn(5, 8, 128)
    cos, sin = hf_rope(q, positions[None])
    want_q, want_k = modeling_llama.apply_rotary_pos_emb(
        q[None].transpose(1, 2), k[None].transpose(1, 2), cos, sin
    )
    rope = RotaryEmbedding(128, 1024, 500000.0, SCALING)
    rope.ensure_length(70001)  # grows from 1024, as a long request would make it
    got_q, got_k = rope(positions, q, k)
    assert torch.equal(got_q, want_q[0].transpose(0, 1))
    assert torch.equal(got_k, want_k[0].transpose(0, 1))


def test_rotary_bfloat16_tables_follow_transformers() -> None:
    """bf16: angles in float32, then cast, as transformers does per call."""
    rope = RotaryEmbedding(64, 32, 10000.0, dtype=torch.bfloat16)
    q = torch.randn(3, 2, 64, dtype=torch.bfloat16)
    positions = torch.tensor([1, 7, 31])
    cos32, sin32 = RotaryEmbedding(64, 32, 10000.0).cos_sin(positions, torch.float32)
    got, _ = rope(positions, q, q)
    want, _ = apply_rotary(q, q, cos32.to(torch.bfloat16), sin32.to(torch.bfloat16))
    assert torch.equal(got, want)


def test_rmsnorm_matches_transformers_and_fuses_residual() -> None:
    x = torch.randn(7, 48)
    residual = torch.randn(7, 48)
    ours = RMSNorm(48, eps=1e-5)
    hf = modeling_llama.LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        weight = torch.randn(48)
        ours.weight.copy_(weight)
        hf.weight.copy_(weight)
        assert torch.equal(ours(x), hf(x))
        normed, new_residual = ours(x, residual)
        assert torch.equal(new_residual, x + residual)
        assert torch.equal(normed, hf(x + residual))


def test_silu_and_mul() -> None:
    gate, up = torch.randn(5, 16), torch.randn(5, 16)
    got = silu_and_mul(torch.cat([gate, up], dim=-1))
    # Strided (chunk view) and contiguous inputs may take different SIMD paths in silu.
    torch.testing.assert_close(got, torch.nn.functional.silu(gate) * up, atol=1e-6, rtol=1e-6)
