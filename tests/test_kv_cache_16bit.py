"""A float32 model's 16-bit KV cache (``--kv-cache-dtype float16|bfloat16``) on the CPU.

The kernels widen 16-bit K/V to float32 on load (exact), so attending a 16-bit cache
must give what the same kernel gives on a float32 cache holding the widened values,
bit for bit; storing rounds to nearest even exactly as PyTorch's ``.to(dtype)``. Kernel
cases run on the library this CPU builds, the AVX2 build and the portable one. Engine
cases: a 16-bit cache changes greedy tokens a little against float32 (the perplexity
benchmark measures how much), but never with how a request is run
(tests/test_engine_kv_quant.py runs the invariance matrix on these formats too).
"""

from __future__ import annotations

import os
import platform

import pytest
import torch
from paged_cases import kernels_built_for, paged_layout, reference_attention

from tokenmill.engine.args import EngineArgs
from tokenmill.kernels import cpu
from tokenmill.model.layers import RotaryEmbedding, fold_rotary_sign, rotate_eager

pytestmark = pytest.mark.skipif(cpu.cpu_kernels() is None, reason="no C compiler")

X86 = platform.machine() in ("x86_64", "AMD64")
MARCHES = [None, "haswell", "x86-64"] if X86 else [None]
KV_DTYPES = [torch.float16, torch.bfloat16]
CPU = torch.device("cpu")


@pytest.fixture(params=MARCHES, ids=lambda m: m or "native")
def kernels(request, monkeypatch):
    with kernels_built_for(request.param, monkeypatch) as lib:
        yield lib


def _same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal bit patterns, except that any NaN equals any NaN (payloads may differ)."""
    nan = want.isnan()
    return bool(torch.equal(got.isnan(), nan)
                and torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16)))


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_store_rounds_like_pytorch(kernels, kv_dtype):
    """rope_kv_write into a 16-bit cache: Q as the float32 path, K and V rounded once;
    values from 1e-9 to 1e5 (subnormal halves, overflow to infinity) and the edge cases."""
    heads, kv_heads, dim, block, tokens = 6, 2, 64, 16, 300
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g)
    qkv *= torch.logspace(-9, 5, tokens)[:, None]
    edges = torch.tensor([65504.0, 65519.99, 65520.0, 1e6, -1e6, float("inf"), float("nan"),
                          6.1035e-05, 6.0e-08, 2.98e-08, 2.9802322e-08, 5.96e-08, 1e-10, -0.0,
                          1.00048828125, 1.000244140625, 1.0009765625, 3.0e-39])
    v0 = (heads + kv_heads) * dim
    qkv[0, v0:v0 + len(edges)] = edges
    rotary = RotaryEmbedding(dim, 128, 10000.0, dtype=torch.float32)
    cos, sin = rotary.cos_sin(torch.randint(0, 128, (tokens,), generator=g), torch.float32)
    sin_f = fold_rotary_sign(sin)
    k_cache = torch.zeros(24, block, kv_heads, dim, dtype=kv_dtype)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(24 * block, generator=g)[:tokens]
    q = kernels.rope_kv_write(qkv, heads, kv_heads, cos, sin_f, k_cache, v_cache, slots)
    assert q is not None and q.dtype == torch.float32
    qk = rotate_eager(qkv[:, :v0].view(tokens, heads + kv_heads, dim), cos, sin_f)
    assert torch.equal(q, qk[:, :heads])
    flat_k, flat_v = k_cache.view(-1, kv_heads, dim), v_cache.view(-1, kv_heads, dim)
    assert _same_bits(flat_k[slots], qk[:, heads:].to(kv_dtype))
    assert _same_bits(flat_v[slots], qkv[:, v0:].view(tokens, kv_heads, dim).to(kv_dtype))


def _paged_case(q_lens, seq_lens, kv_dtype, dim, seed=0, heads=6, kv_heads=2, block=16):
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block) for n in seq_lens) + 3
    k_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=g).to(kv_dtype)
    v_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=g).to(kv_dtype)
    q, qsl, lens, tables = paged_layout(q_lens, seq_lens, num_blocks, block, heads, dim, g)
    return q, k_cache, v_cache, qsl, lens, tables


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("dim", [64, 12])  # the AVX2 kernel; the generic loop
@pytest.mark.parametrize("window", [0, 5])
def test_paged_attention_equals_the_widened_float32_cache(kernels, kv_dtype, dim, window):
    q_lens, seq_lens = [1, 3, 1, 16, 0], [70, 50, 9, 64, 5]
    q, kc, vc, qsl, lens, tables = _paged_case(q_lens, seq_lens, kv_dtype, dim, seed=dim)
    got, want = torch.zeros_like(q), torch.zeros_like(q)
    assert kernels.paged_attention(q, got, kc, vc, qsl, lens, tables, 0.3, 16, window)
    assert kernels.paged_attention(q, want, kc.float(), vc.float(), qsl, lens, tables, 0.3, 16,
                                   window)
    if dim % 8 == 0 and X86 and os.environ.get("TOKENMILL_CPU_MARCH") != "x86-64":
        assert torch.equal(got, want)  # the AVX2 kernel
    else:  # the generic loop: the compiler may vectorize the two instances differently
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ref = reference_attention(q, kc.float(), vc.float(), qsl, lens, tables, 0.3, window or None)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (9, 3), (8, 2), (7, 1)])
@pytest.mark.parametrize("dim", [64, 96, 40])  # V summed for 3 heads at once; per head (40)
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
def test_paged_attention_group_sizes(heads, kv_heads, dim, kv_dtype):
    """The decode kernel sums V for up to three query heads of a GQA group at once (1, 2,
    3 or a remainder of them), where head_dim is a multiple of 32; against SDPA."""
    q_lens, seq_lens = [1, 1, 2, 1], [37, 80, 17, 5]
    q, kc, vc, qsl, lens, tables = _paged_case(q_lens, seq_lens, kv_dtype, dim, seed=heads,
                                               heads=heads, kv_heads=kv_heads)
    out = torch.zeros_like(q)
    assert cpu.paged_attention(q, out, kc, vc, qsl, lens, tables, 0.3, 16)
    ref = reference_attention(q, kc.float(), vc.float(), qsl, lens, tables, 0.3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("per_tile", [False, True])  # whole sequences first; per tile
@pytest.mark.parametrize("window", [0, 50])
def test_prefill_attention_equals_the_widened_float32_cache(kernels, kv_dtype, per_tile,
                                                            window):
    """The tiled kernel for long chunks (the portable build has none and declines)."""
    q_lens, seq_lens = [100, 40, 1], [300, 40, 7]
    q, kc, vc, qsl, lens, tables = _paged_case(q_lens, seq_lens, kv_dtype, 64, heads=9,
                                               kv_heads=3)
    got, want = torch.zeros_like(q), torch.zeros_like(q)
    ran = kernels.prefill_attention(q, got, kc, vc, qsl, lens, tables, 0.125, 16, window,
                                    widen_per_tile=per_tile)
    assert ran == kernels.prefill_attention_supported(64)
    if not ran:
        return
    assert kernels.prefill_attention(q, want, kc.float(), vc.float(), qsl, lens, tables, 0.125,
                                     16, window)
    assert torch.equal(got, want)
    assert not got[140:].any()  # the one-token query is the paged kernel's


def test_other_combinations_are_declined():
    """16-bit caches are read by float32 queries only; a bfloat16 model reads its own."""
    q, kc, vc, qsl, lens, tables = _paged_case([1], [9], torch.float16, 64)
    out = torch.zeros_like(q, dtype=torch.bfloat16)
    assert not cpu.paged_attention(q.bfloat16(), out, kc, vc, qsl, lens, tables, 0.3, 16)
    out = torch.zeros_like(q)
    assert not cpu.paged_attention(q, out, kc, vc.bfloat16(), qsl, lens, tables, 0.3, 16)
    assert not out.any()


def test_auto_is_float16_for_quantized_float32_models_on_the_cpu(monkeypatch):
    """--kv-cache-dtype auto: float16 where a float32 model runs int4/int8 weights on
    the CPU (the GGUF default there); the model's dtype everywhere else."""
    monkeypatch.setenv("TOKENMILL_CPU_DTYPE", "float32")
    for quantization, want in [("int4", "float16"), ("int8", "float16"), ("none", "auto")]:
        args = EngineArgs(quantization=quantization)
        assert args.resolved_kv_cache_dtype(CPU) == want
        assert args.resolved_for(CPU).kv_cache_dtype == want
        assert args.resolved_for(CPU).resolved_for(CPU) == args.resolved_for(CPU)
    assert EngineArgs(quantization="int4", dtype="bfloat16").resolved_kv_cache_dtype(CPU) == "auto"
    for given in ("float32", "bfloat16", "int8"):  # an explicit choice stays
        assert EngineArgs(quantization="int4", kv_cache_dtype=given).resolved_kv_cache_dtype(
            CPU) == given
    cuda = torch.device("cuda")
    assert EngineArgs(quantization="int4").resolved_kv_cache_dtype(cuda) == "auto"
