"""The native rotary + K/V write against the eager ops it replaces: bit for bit."""

from __future__ import annotations

import pytest
import torch

from tokenmill.kernels import cpu
from tokenmill.llm import LLM
from tokenmill.model.layers import RotaryEmbedding, fold_rotary_sign, rotate_eager
from tokenmill.sampling import SamplingParams

pytestmark = pytest.mark.skipif(cpu.cpu_kernels() is None, reason="no C compiler")

H, KVH, D, BLOCK = 6, 2, 64, 16


def _case(tokens: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(tokens, (H + 2 * KVH) * D, generator=g) * 3).to(dtype)
    rotary = RotaryEmbedding(D, 128, 10000.0, dtype=dtype)
    positions = torch.randint(0, 128, (tokens,), generator=g)
    cos, sin = rotary.cos_sin(positions, dtype)
    blocks = 24
    k_cache = torch.zeros(blocks, BLOCK, KVH, D, dtype=dtype)
    v_cache = torch.zeros(blocks, BLOCK, KVH, D, dtype=dtype)
    slots = torch.randperm(blocks * BLOCK, generator=g)[:tokens].to(torch.int64)
    return qkv, cos, fold_rotary_sign(sin), k_cache, v_cache, slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5, 300])  # 300: split over threads
def test_matches_eager_rotation_and_write(tokens, dtype):
    qkv, cos, sin_f, k_cache, v_cache, slots = _case(tokens, tokens, dtype)
    q = cpu.rope_kv_write(qkv, H, KVH, cos, sin_f, k_cache, v_cache, slots)
    qk = rotate_eager(qkv[:, : (H + KVH) * D].view(tokens, H + KVH, D), cos, sin_f)
    assert torch.equal(q, qk[:, :H])
    flat_k, flat_v = k_cache.view(-1, KVH, D), v_cache.view(-1, KVH, D)
    assert torch.equal(flat_k[slots], qk[:, H:])
    assert torch.equal(flat_v[slots], qkv[:, (H + KVH) * D:].view(tokens, KVH, D))
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool)
    untouched[slots] = False
    assert not flat_k[untouched].any() and not flat_v[untouched].any()


def test_declines_what_it_cannot_run():
    qkv, cos, sin_f, k_cache, v_cache, slots = _case(3)
    assert cpu.rope_kv_write(qkv.double(), H, KVH, cos, sin_f, k_cache, v_cache, slots) is None
    assert cpu.rope_kv_write(qkv, H, KVH, cos, sin_f, k_cache.to(torch.int8),
                             v_cache.to(torch.int8), slots) is None
    assert cpu.rope_kv_write(qkv, H, KVH, cos[..., :32].contiguous(),
                             sin_f[..., :32].contiguous(), k_cache, v_cache, slots) is None
    assert cpu.rope_kv_write(qkv, H, KVH, cos, sin_f, k_cache, v_cache, slots[:2]) is None
    assert cpu.rope_kv_write(qkv, H, KVH, cos, sin_f, k_cache, v_cache,
                             slots.to(torch.int32)) is None
    assert not k_cache.any()


@pytest.mark.parametrize(("quantization", "dtype"),
                         [(None, "float32"), ("int4", "float32"), (None, "bfloat16")])
def test_engine_output_identical_without_it(tmp_path, monkeypatch, quantization, dtype):
    """Greedy tokens and their logprobs are the same with the fused call and without."""
    from test_engine_tiny import _prompts, _save_tiny

    # The per-layer path's two variants; the native stack (int4, float32 panels) always
    # runs the fused kernel in C, for prompt chunks too.
    monkeypatch.setenv("TOKENMILL_CPU_NATIVE_STACK", "0")

    path, _ = _save_tiny(tmp_path, "llama")
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=0)
    prompts = _prompts(4, seed=3)

    def run() -> list[tuple[list[int], list[float]]]:
        llm = LLM(path, block_size=4, max_num_batched_tokens=32, quantization=quantization,
                  dtype=dtype)
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [(o.outputs[0].token_ids,
                 [next(iter(lp.values())).logprob if isinstance(lp, dict) else lp
                  for lp in o.outputs[0].logprobs or []]) for o in outs]

    calls = []
    real = cpu.rope_kv_write
    monkeypatch.setattr(cpu, "rope_kv_write",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    fused = run()
    assert calls, "the fused path did not run"
    monkeypatch.setattr(cpu, "rope_kv_write", lambda *a, **k: None)
    assert run() == fused
