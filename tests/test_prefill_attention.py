"""The native tiled attention for long prefill chunks against a dense float64 reference.

No timing. Each case runs on the kernel this CPU builds (AVX-512 where present) and
on the AVX2 build (``-march=haswell``); the portable build has no such kernel and
must decline, leaving the chunk to the PyTorch path.
"""

from __future__ import annotations

import platform

import pytest
import torch
from paged_cases import dense_reference_attention, kernels_built_for, paged_layout

from tokenmill.kernels import cpu, kv_quant

pytestmark = pytest.mark.skipif(cpu.cpu_kernels() is None, reason="no C compiler")

X86 = platform.machine() in ("x86_64", "AMD64")
# The march the kernel library is built for: this CPU's, and AVX2 only.
MARCHES = [None, "haswell"] if X86 else [None]
NO_WINDOW = 1 << 30


@pytest.fixture(params=MARCHES, ids=lambda m: m or "native")
def kernels(request, monkeypatch):
    with kernels_built_for(request.param, monkeypatch) as lib:
        yield lib


def _case(q_lens, seq_lens, heads, kv_heads, dim, block=16, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block) for n in seq_lens) + 3
    k_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=g)
    v_cache = torch.randn(num_blocks, block, kv_heads, dim, generator=g)
    q, qsl, lens, tables = paged_layout(q_lens, seq_lens, num_blocks, block, heads, dim, g)
    return q * spread, k_cache, v_cache, qsl, lens, tables


def _expected(q, kc, vc, qsl, lens, tables, scale, window):
    return dense_reference_attention(q.double(), kc, vc, qsl, lens, tables, scale,
                                     window or NO_WINDOW).float()


@pytest.mark.parametrize("q_lens,seq_lens,heads,kv_heads,dim,block", [
    ([17], [17], 9, 3, 64, 16),            # one row past the paged kernel's limit
    ([300], [300], 9, 3, 64, 16),          # SmolLM2's shape: 21-token tiles, many key blocks
    ([100, 40], [300, 40], 9, 3, 64, 16),  # a chunk after 200 cached tokens (bottom-right)
    ([65], [65], 8, 8, 32, 16),            # no GQA: 64-row tiles of one head each
    ([70], [90], 16, 1, 128, 32),          # 16 heads on one KV head, two V passes
    ([50, 129], [50, 200], 4, 2, 80, 16),  # head_dim 80: an odd vector of d (AVX-512)
    ([40], [40], 96, 1, 8, 16),            # more heads per KV head than a tile has rows
    ([33], [33], 6, 2, 24, 1),             # one-token blocks
])
def test_matches_dense_reference(kernels, q_lens, seq_lens, heads, kv_heads, dim, block):
    q, kc, vc, qsl, lens, tables = _case(q_lens, seq_lens, heads, kv_heads, dim, block)
    out = torch.zeros_like(q)
    assert kernels.prefill_attention(q, out, kc, vc, qsl, lens, tables, dim**-0.5, 16)
    want = _expected(q, kc, vc, qsl, lens, tables, dim**-0.5, 0)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("window", [1, 7, 16, 50, 64, 65, 200])
def test_sliding_window_never_reads_outside(kernels, window):
    """Table entries wholly before every query's window point at a NaN block (what a
    released block may hold); the output must not see them."""
    q_lens, seq_lens = [130, 17, 40], [260, 17, 400]
    q, kc, vc, qsl, lens, tables = _case(q_lens, seq_lens, 9, 3, 64, seed=window)
    want = _expected(q, kc, vc, qsl, lens, tables, 0.125, window)
    nan_block = torch.full((1, *kc.shape[1:]), float("nan"))
    kc, vc = torch.cat([kc, nan_block]), torch.cat([vc, nan_block])
    for i, (n, ql) in enumerate(zip(seq_lens, q_lens, strict=True)):
        tables[i, : max(0, n - ql - window + 1) // kc.shape[1]] = kc.shape[0] - 1
    out = torch.zeros_like(q)
    assert kernels.prefill_attention(q, out, kc, vc, qsl, lens, tables, 0.125, 16, window)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("spread", [30.0, 300.0])
def test_softmax_over_wide_score_ranges(kernels, spread):
    """Scores in the thousands: the running maximum must keep every exp in range."""
    q, kc, vc, qsl, lens, tables = _case([150], [150], 9, 3, 64, seed=4, spread=spread)
    out = torch.zeros_like(q)
    assert kernels.prefill_attention(q, out, kc, vc, qsl, lens, tables, 0.125, 16)
    assert torch.isfinite(out).all()
    want = _expected(q, kc, vc, qsl, lens, tables, 0.125, 0)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


def test_leaves_short_queries_and_reads_strided_q(kernels):
    q_lens, seq_lens = [1, 20, 16, 40], [30, 20, 50, 60]
    q, kc, vc, qsl, lens, tables = _case(q_lens, seq_lens, 6, 2, 32, seed=1)
    # q as a strided view of a wider [T, heads + 2, dim] tensor, like the fused QKV split
    wide = torch.randn(q.shape[0], 8, 32)
    wide[:, :6] = q
    out = torch.full_like(q, 7.0)
    assert kernels.prefill_attention(wide[:, :6], out, kc, vc, qsl, lens, tables, 0.2, 16)
    want = _expected(q, kc, vc, qsl, lens, tables, 0.2, 0)
    long_rows = torch.cat([torch.arange(1, 21), torch.arange(37, 77)])
    torch.testing.assert_close(out[long_rows], want[long_rows], rtol=1e-5, atol=2e-6)
    short_rows = torch.cat([torch.arange(0, 1), torch.arange(21, 37)])
    assert bool((out[short_rows] == 7.0).all())  # at most 16 query tokens: the caller's


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("per_tile", [False, True])  # whole sequences first; per tile
def test_8bit_cache_equals_its_dequantized_float32_cache(kernels, fmt, per_tile):
    """--kv-cache-dtype int8|fp8: each key block dequantized once per tile (code times the
    row's scale, as kv_quant.dequantize), then the float32 kernel: the same bits as the
    kernel on the dequantized cache."""
    q_lens, seq_lens = [100, 40, 1], [300, 40, 7]
    q, kc, vc, qsl, lens, tables = _case(q_lens, seq_lens, 9, 3, 64, seed=11)
    kc8, vc8 = kv_quant.quantize(kc, fmt), kv_quant.quantize(vc, fmt)
    got, want = torch.zeros_like(q), torch.zeros_like(q)
    assert kernels.prefill_attention(q, got, kc8, vc8, qsl, lens, tables, 0.125, 16,
                                     widen_per_tile=per_tile)
    deq_k, deq_v = (kv_quant.dequantize(c, torch.float32) for c in (kc8, vc8))
    assert kernels.prefill_attention(q, want, deq_k, deq_v, qsl, lens, tables, 0.125, 16)
    assert torch.equal(got, want)
    assert not got[140:].any()  # the one-token query is the paged kernel's


def test_declines_what_it_cannot_run():
    q, kc, vc, qsl, lens, tables = _case([20], [20], 6, 2, 32)
    out = torch.zeros_like(q)
    bf16 = [t.bfloat16() for t in (q, out, kc, vc)]
    assert not cpu.prefill_attention(*bf16, qsl, lens, tables, 0.2, 16)
    # int8 codes without the 4 scale bytes per row: not a quantized cache
    assert not cpu.prefill_attention(q, out, kc.to(torch.int8), vc.to(torch.int8), qsl, lens,
                                     tables, 0.2, 16)
    q12, kc12, vc12, *_ = _case([20], [20], 6, 2, 12)  # head_dim not a multiple of 8
    assert not cpu.prefill_attention(q12, torch.zeros_like(q12), kc12, vc12, qsl, lens,
                                     tables, 0.2, 16)
    assert bool((out == 0).all())


@pytest.mark.skipif(not X86, reason="x86 baseline build")
def test_portable_build_declines_and_the_backend_falls_back(monkeypatch):
    """Without AVX2 the kernel is absent; the torch backend's SDPA path takes the chunk."""
    from tokenmill.attention.base import AttentionMetadata
    from tokenmill.attention.torch_backend import TorchAttentionBackend

    q_lens, seq_lens = [3, 40], [10, 70]
    q, kc, vc, qsl, lens, tables = _case(q_lens, seq_lens, 6, 2, 32, seed=2)
    want = _expected(q, kc, vc, qsl, lens, tables, 0.2, 0)
    meta = AttentionMetadata(
        num_tokens=q.shape[0], slot_mapping=torch.full((q.shape[0],), -1),
        query_start_loc=qsl, seq_lens=lens, block_tables=tables, max_query_len=40,
        max_seq_len=70, query_start_loc_cpu=qsl.tolist(), seq_lens_cpu=seq_lens)
    monkeypatch.setenv("TOKENMILL_CPU_MARCH", "x86-64")
    cpu.cpu_kernels.cache_clear()
    try:
        assert not cpu.prefill_attention(q, torch.zeros_like(q), kc, vc, qsl, lens, tables,
                                         0.2, 16)
        out = TorchAttentionBackend().forward_cached(q, kc, vc, meta, 0.2)
    finally:
        monkeypatch.delenv("TOKENMILL_CPU_MARCH")
        cpu.cpu_kernels.cache_clear()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=2e-6)
