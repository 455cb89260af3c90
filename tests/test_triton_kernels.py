"""Fused Triton kernels (KV write, RMSNorm, SiLU-and-mul, rotary) against PyTorch references.

Without CUDA the kernels run in Triton's interpreter, which must be switched on
before Triton is first imported in the process: this module sets
TRITON_INTERPRET=1 for the session when no GPU is present. If an earlier test
module already imported Triton in compiled mode (``transformers`` model
classes do, through torch), this module skips itself and
test_triton_interpreter.py runs it in a child process instead.
"""

import os
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU and "triton" not in sys.modules:
    # Must precede triton's first import; pointless (so not leaked) once it happened.
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from tokenmill import kernels  # noqa: E402
from tokenmill.kernels import reference  # noqa: E402
from tokenmill.kernels.kv_write import write_kv_cache  # noqa: E402
from tokenmill.kernels.triton_utils import (  # noqa: E402
    interpreter_active,
    interpreter_problem,
)

if not ON_GPU and not interpreter_active():
    pytest.skip("an earlier test module imported triton in compiled mode; "
                "test_triton_interpreter.py runs this module in a child process instead",
                allow_module_level=True)
if not ON_GPU and interpreter_problem():
    pytest.skip(interpreter_problem(), allow_module_level=True)

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def tolerance(dtype: torch.dtype) -> dict:
    # The interpreter truncates float32 -> bfloat16 where the GPU rounds to
    # nearest, so bf16 results may differ from eager PyTorch by one unit.
    return {
        torch.float32: dict(atol=1e-5, rtol=1e-5),
        torch.float16: dict(atol=2e-3, rtol=2e-3),
        torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    }[dtype]


def randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size,num_kv_heads,head_dim",
                         [(8, 2, 64), (16, 3, 128), (32, 1, 80)])
def test_kv_write_matches_reference_and_skips_padding(dtype, block_size, num_kv_heads, head_dim):
    from tokenmill.attention.torch_backend import write_kv_cache as write_ref

    num_blocks, tokens = 6, 9
    # k/v as strided views of a fused projection output, like a real model's.
    kv = randn(tokens, 2 * num_kv_heads * head_dim + 8, dtype=dtype, seed=1)
    k = kv[:, : num_kv_heads * head_dim].view(tokens, num_kv_heads, head_dim)
    v = kv[:, num_kv_heads * head_dim: 2 * num_kv_heads * head_dim].view(
        tokens, num_kv_heads, head_dim)
    slots = torch.tensor([5, 0, -1, 17, block_size * 6 - 1, 3, -1, 40, 41], device=DEVICE)
    k_cache = randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, seed=2)
    v_cache = randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, seed=3)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_ref(k, v, k_ref, v_ref, slots)
    write_kv_cache(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref)
    assert torch.equal(v_cache, v_ref)


def test_kv_write_ignores_rows_past_slot_mapping():
    k = randn(5, 2, 64, seed=1)
    v = randn(5, 2, 64, seed=2)
    k_cache = torch.zeros(2, 8, 2, 64, device=DEVICE)
    v_cache = torch.zeros(2, 8, 2, 64, device=DEVICE)
    write_kv_cache(k, v, k_cache, v_cache, torch.tensor([3, 9], device=DEVICE))
    flat = k_cache.view(-1, 2, 64)
    assert torch.equal(flat[3], k[0]) and torch.equal(flat[9], k[1])
    assert int((flat.abs().sum((1, 2)) > 0).sum()) == 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 576, 1000])
def test_rms_norm(dtype, hidden):
    x = randn(7, hidden, dtype=dtype, seed=1)
    w = (1 + 0.1 * randn(hidden, seed=2)).to(dtype)
    out = kernels.rms_norm(x, w, 1e-5, use_triton=True)
    torch.testing.assert_close(out, reference.rms_norm_ref(x, w, 1e-5), **tolerance(dtype))
    assert out.dtype == dtype and out.shape == x.shape


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm(dtype):
    x = randn(2, 5, 576, dtype=dtype, seed=1)
    residual = randn(2, 5, 576, dtype=dtype, seed=2)
    w = (1 + 0.1 * randn(576, seed=3)).to(dtype)
    x_before, r_before = x.clone(), residual.clone()
    out, new_res = kernels.fused_add_rms_norm(x, residual, w, 1e-6, use_triton=True)
    ref_out, ref_res = reference.fused_add_rms_norm_ref(x, residual, w, 1e-6)
    torch.testing.assert_close(new_res, ref_res, **tolerance(dtype))
    torch.testing.assert_close(out, ref_out, **tolerance(dtype))
    assert torch.equal(x, x_before) and torch.equal(residual, r_before)  # inputs untouched


def fp16_ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance, in float16 units in the last place, between two fp16 tensors.

    Finite fp16 values map to integers in the same order as the values (sign
    and magnitude folded onto one line), so adjacent floats differ by 1.
    """
    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return int((ordered(a) - ordered(b)).abs().max())


def test_fp16_ulp_distance():
    one = torch.tensor([1.0, -2.0, 0.0], dtype=torch.float16)
    up = torch.nextafter(one, torch.full_like(one, 10))
    assert fp16_ulp_distance(one, one) == 0
    assert fp16_ulp_distance(one, up) == 1
    assert fp16_ulp_distance(one, torch.nextafter(up, torch.full_like(one, 10))) == 2


def test_rms_norm_fp16_within_one_ulp_and_rows_are_independent():
    # The kernel follows HF's rounding order (normalise in float32, round, then
    # scale in float16). In the interpreter the float32 sum of squares is taken
    # in the same order as PyTorch's and the result is bit-identical; on a GPU
    # the kernel's parallel reduction orders the sum differently, which may move
    # a result by one float16 unit (seen on H100/H200). Rows never interact.
    x = randn(4, 256, dtype=torch.float16, seed=5)
    w = randn(256, dtype=torch.float16, seed=6)
    out = kernels.rms_norm(x, w, 1e-6, use_triton=True)
    want = reference.rms_norm_ref(x, w, 1e-6)
    if ON_GPU:
        assert fp16_ulp_distance(out, want) <= 1
    else:
        assert torch.equal(out, want)
    assert torch.equal(out[2:3], kernels.rms_norm(x[2:3], w, 1e-6, use_triton=True))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, 2 * 1000), (2, 3, 2 * 64), (0, 2 * 16)])
def test_silu_and_mul(dtype, shape):
    x = randn(*shape, dtype=dtype, seed=1) * 3
    out = kernels.silu_and_mul(x, use_triton=True)
    assert out.shape == (*shape[:-1], shape[-1] // 2)
    torch.testing.assert_close(out, reference.silu_and_mul_ref(x), **tolerance(dtype))


def rope_tables(head_dim: int, max_pos: int = 256, theta: float = 10000.0):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # Hugging Face layout: both halves equal
    return emb.cos().to(DEVICE), emb.sin().to(DEVICE)


def hf_rotary(x, cos, sin, positions):
    """Hugging Face's eager formula, written independently of the reference module."""
    c = cos[positions].unsqueeze(1).to(x.dtype)
    s = sin[positions].unsqueeze(1).to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * c + rotated * s


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 4, 64), (9, 3, 64), (8, 2, 128)])
@pytest.mark.parametrize("half_table", [False, True])
def test_rotary_in_place_on_fused_qkv_views(dtype, num_heads, num_kv_heads, head_dim, half_table):
    tokens = 6
    cos, sin = rope_tables(head_dim)
    if half_table:
        cos, sin = cos[:, : head_dim // 2].contiguous(), sin[:, : head_dim // 2].contiguous()
    full_cos, full_sin = rope_tables(head_dim)
    qkv = randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, seed=1)
    q = qkv[:, : num_heads * head_dim].view(tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim: (num_heads + num_kv_heads) * head_dim].view(
        tokens, num_kv_heads, head_dim)
    v_before = qkv[:, (num_heads + num_kv_heads) * head_dim:].clone()
    positions = torch.tensor([0, 1, 7, 100, 255, 3], device=DEVICE)
    q_expected = hf_rotary(q, full_cos, full_sin, positions)
    k_expected = hf_rotary(k, full_cos, full_sin, positions)

    q_out, k_out = kernels.apply_rotary(q, k, cos, sin, positions, use_triton=True)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()
    torch.testing.assert_close(q, q_expected, **tolerance(dtype))
    torch.testing.assert_close(k, k_expected, **tolerance(dtype))
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim:], v_before)


def test_rotary_reference_matches_hf_exactly():
    cos, sin = rope_tables(64)
    for dtype in DTYPES:
        q = randn(5, 3, 64, dtype=dtype, seed=2)
        k = randn(5, 1, 64, dtype=dtype, seed=3)
        positions = torch.tensor([4, 0, 9, 2, 30], device=DEVICE)
        q_expected = hf_rotary(q, cos, sin, positions)
        k_expected = hf_rotary(k, cos, sin, positions)
        reference.rotary_ref(q, k, cos, sin, positions)
        assert torch.equal(q, q_expected) and torch.equal(k, k_expected)


def test_dispatch_uses_reference_on_cpu_by_default(monkeypatch):
    import tokenmill.kernels.rmsnorm as triton_rmsnorm

    def fail(*args, **kwargs):
        raise AssertionError("triton path taken for a CPU tensor")

    monkeypatch.setattr(triton_rmsnorm, "rms_norm", fail)
    x = torch.randn(3, 32)
    w = torch.ones(32)
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), reference.rms_norm_ref(x, w, 1e-6))


# ----------------------------------------------------------------- fused MoE


def test_align_rows_by_expert_pads_each_expert_to_the_tile():
    from tokenmill.kernels.fused_moe import align_rows_by_expert

    ids = torch.tensor([[2, 0], [2, 1], [0, 2]], device=DEVICE)  # rows 0..5 = (token, choice)
    rows, experts = align_rows_by_expert(ids, num_experts=4, block_m=4)
    pad = 6
    # expert 0: rows 1, 4; expert 1: row 3; expert 2: rows 0, 2, 5; expert 3: none
    assert rows.tolist()[:12] == [1, 4, pad, pad, 3, pad, pad, pad, 0, 2, 5, pad]
    assert all(r == pad for r in rows.tolist()[12:])
    assert experts.tolist()[:3] == [0, 1, 2] and all(e == -1 for e in experts.tolist()[3:])
    assert rows.numel() % 4 == 0 and experts.numel() == rows.numel() // 4


@pytest.mark.parametrize("tokens", [1, 7, 33])
@pytest.mark.parametrize("activation", ["silu", "gelu_pytorch_tanh"])
def test_fused_moe_matches_grouped_experts(tokens, activation):
    from tokenmill.kernels.fused_moe import fused_moe
    from tokenmill.model.layers import gated_activation

    num_experts, top_k, hidden, inter = 8, 2, 64, 48  # inter: not a tile multiple
    x = randn(tokens, hidden, seed=1)
    w13 = randn(num_experts, 2 * inter, hidden, seed=2) * 0.2
    w2 = randn(num_experts, hidden, inter, seed=3) * 0.2
    logits = randn(tokens, num_experts, seed=4)
    weights, ids = torch.topk(torch.softmax(logits, -1), top_k, dim=-1)
    act = gated_activation(activation)
    want = torch.zeros_like(x)
    for t in range(tokens):
        for j in range(top_k):
            e = int(ids[t, j])
            want[t] += weights[t, j] * (act(x[t:t + 1] @ w13[e].T) @ w2[e].T)[0]
    got = fused_moe(x, w13, w2, weights, ids, activation, block_m=16)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_fused_moe_bfloat16_close_to_float32():
    from tokenmill.kernels.fused_moe import fused_moe

    x = randn(9, 64, seed=5)
    w13, w2 = randn(4, 64, 64, seed=6) * 0.2, randn(4, 64, 32, seed=7) * 0.2
    weights, ids = torch.topk(torch.softmax(randn(9, 4, seed=8), -1), 2, dim=-1)
    want = fused_moe(x, w13, w2, weights, ids)
    got = fused_moe(x.bfloat16(), w13.bfloat16(), w2.bfloat16(), weights, ids)
    torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)
