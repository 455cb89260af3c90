"""Native CPU kernels against their PyTorch references (no timing)."""

from __future__ import annotations

import platform

import pytest
import torch
from paged_cases import dense_reference_attention, paged_layout, reference_attention

from tokenmill.attention.torch_backend import TorchAttentionBackend
from tokenmill.kernels import cpu
from tokenmill.kernels.cpu_features import cpu_flags

pytestmark = pytest.mark.skipif(cpu.cpu_kernels() is None, reason="no C compiler")

HEADS, KV_HEADS, DIM, BLOCK = 6, 2, 32, 16


def _paged_case(q_lens, seq_lens, seed=0, num_blocks=64, dim=DIM):
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, dim, generator=g)
    v_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, dim, generator=g)
    q, qsl, lens, tables = paged_layout(q_lens, seq_lens, num_blocks, BLOCK, HEADS, dim, g)
    return q, k_cache, v_cache, qsl, lens, tables


def _poisoned(q_lens, seq_lens, window, dim, seed):
    """A paged case whose table entries wholly before every query's window point at an
    extra NaN-filled block (what a released block may hold, at worst); with the
    dense reference computed from the clean tables."""
    q, kc, vc, qsl, lens, tables = _paged_case(q_lens, seq_lens, seed=seed, dim=dim)
    want = dense_reference_attention(q, kc, vc, qsl, lens, tables, 0.3, window)
    nan_block = torch.full((1, *kc.shape[1:]), float("nan"))
    kc, vc = torch.cat([kc, nan_block]), torch.cat([vc, nan_block])
    poisoned = tables.clone()
    for i, (n, ql) in enumerate(zip(seq_lens, q_lens, strict=True)):
        poisoned[i, : max(0, n - ql - window + 1) // BLOCK] = kc.shape[0] - 1
    return q, kc, vc, qsl, lens, poisoned, want


@pytest.mark.parametrize("window", [1, 5, 16, 17, 100])
@pytest.mark.parametrize("head_dim", [32, 12])  # AVX2 path and the generic loop
def test_paged_attention_sliding_window_never_reads_outside(window, head_dim):
    q, kc, vc, qsl, lens, tables, want = _poisoned([1, 3, 1, 16], [70, 50, 9, 64], window,
                                                   head_dim, seed=window)
    out = torch.zeros_like(q)
    assert cpu.paged_attention(q, out, kc, vc, qsl, lens, tables, 0.3, 16, window)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # The torch backend's SDPA path gathers only the blocks in the window too.
    torch.testing.assert_close(reference_attention(q, kc, vc, qsl, lens, tables, 0.3, window), want,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [3, 16, 40])
def test_torch_batched_decode_sliding_window(window):
    """The PyTorch decode path (no native kernel) gathers whole tables and masks."""
    from tokenmill.attention.base import AttentionMetadata

    q_lens, seq_lens = [1, 1, 1], [70, 9, 33]
    q, kc, vc, qsl, lens, tables, want = _poisoned(q_lens, seq_lens, window, DIM, seed=3)
    meta = AttentionMetadata(
        num_tokens=3, slot_mapping=torch.full((3,), -1), query_start_loc=qsl, seq_lens=lens,
        block_tables=tables, max_query_len=1, max_seq_len=max(seq_lens),
        query_start_loc_cpu=qsl.tolist(), seq_lens_cpu=seq_lens)
    out = TorchAttentionBackend._decode(q, kc, vc, meta, 0.3, window)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q_lens,seq_lens", [
    ([1], [1]),
    ([1, 1, 1], [5, 16, 17]),  # inside a block, exactly one block, one past
    ([4, 1, 3, 1], [40, 70, 3, 128]),  # speculative-verify-like short queries
    ([1, 0, 2], [9, 4, 33]),  # an empty query row is skipped
])
def test_paged_attention_matches_sdpa(q_lens, seq_lens):
    q, kc, vc, qsl, lens, tables = _paged_case(q_lens, seq_lens)
    out = torch.zeros_like(q)
    assert cpu.paged_attention(q, out, kc, vc, qsl, lens, tables, DIM**-0.5, 16)
    torch.testing.assert_close(out, reference_attention(q, kc, vc, qsl, lens, tables, DIM**-0.5),
                               rtol=1e-5, atol=1e-5)


def test_paged_attention_skips_long_queries_and_reads_strided_q():
    q_lens, seq_lens = [1, 20, 2], [30, 20, 50]
    q, kc, vc, qsl, lens, tables = _paged_case(q_lens, seq_lens, seed=1)
    # q as a strided view of a wider [T, HEADS + 2, DIM] tensor, like the fused QKV split
    wide = torch.randn(q.shape[0], HEADS + 2, DIM)
    wide[:, :HEADS] = q
    view = wide[:, :HEADS]
    out = torch.full_like(q, 7.0)
    assert cpu.paged_attention(view, out, kc, vc, qsl, lens, tables, 0.2, 16)
    ref = reference_attention(q, kc, vc, qsl, lens, tables, 0.2)
    torch.testing.assert_close(out[:1], ref[:1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[21:], ref[21:], rtol=1e-5, atol=1e-5)
    assert bool((out[1:21] == 7.0).all())  # the 20-token query was left to the caller


def test_paged_attention_bfloat16():
    q, kc, vc, qsl, lens, tables = _paged_case([1, 2], [20, 45], seed=2)
    out = torch.zeros_like(q, dtype=torch.bfloat16)
    assert cpu.paged_attention(q.bfloat16(), out, kc.bfloat16(), vc.bfloat16(), qsl, lens,
                               tables, DIM**-0.5, 16)
    ref = reference_attention(q.bfloat16().float(), kc.bfloat16().float(), vc.bfloat16().float(),
                     qsl, lens, tables, DIM**-0.5)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_paged_attention_declines_what_it_cannot_run():
    q, kc, vc, qsl, lens, tables = _paged_case([1], [8])
    out = torch.zeros_like(q)
    assert not cpu.paged_attention(q.double(), out.double(), kc.double(), vc.double(),
                                   qsl, lens, tables, 1.0, 16)
    assert not cpu.paged_attention(q, out, kc, vc, qsl.long(), lens, tables, 1.0, 16)


@pytest.mark.parametrize("m,n", [(1, 7), (2, 64), (5, 33), (16, 128)])
def test_int8_matmul_matches_dense(m, n):
    from tokenmill.model.quantization import dequantize_int8, quantize_int8, round_to_q8

    g = torch.Generator().manual_seed(m * 100 + n)
    codes, scales = quantize_int8(torch.randn(n, 64, generator=g))
    x = torch.randn(m, 64, generator=g)
    bias = torch.randn(n, generator=g)
    got = cpu.int8_matmul(x, codes, scales, bias)
    expected = round_to_q8(x) @ dequantize_int8(codes, scales).T + bias
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cpu.int8_matmul(x, codes, scales, None), expected - bias,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("m", [1, 4, 6, 9, 130])  # 130: three panels of 64 rows
@pytest.mark.parametrize("n", [1, 8, 13])
@pytest.mark.parametrize("k", [96, 544])  # 3 and 17 groups: pairs, blocks of 8, a lone group
def test_q4_matmul_matches_dense(m, n, k):
    from tokenmill.model.quantization import (
        dequantize_q4_1,
        q4_1_scales,
        quantize_int4,
        round_to_q8,
    )

    g = torch.Generator().manual_seed(m * 10 + n + k)
    codes, scales, zeros = quantize_int4(torch.randn(n, k, generator=g))
    d, mins = q4_1_scales(scales, zeros)
    x = torch.randn(m, k, generator=g) * 4
    bias = torch.randn(n, generator=g)
    got = cpu.q4_matmul(x, cpu.pack_q4(codes), d, mins, bias)
    expected = round_to_q8(x) @ dequantize_q4_1(codes, d, mins).T + bias
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("march", [None, "haswell"])
@pytest.mark.parametrize("k", [192, 224, 576])  # 6, 7 (a lone group) and 18 groups (blocks of 8)
def test_quantized_matmul_rows_do_not_depend_on_the_batch(monkeypatch, march, k):
    """A row's int4/int8 product is the same bits alone, in a full 4-row tile, or left
    over after the tiles (the decode tile for one row), so batching changes nothing."""
    from tokenmill.model.quantization import q4_1_scales, quantize_int4, quantize_int8

    if march is not None:
        monkeypatch.setenv("TOKENMILL_CPU_MARCH", march)
    cpu.cpu_kernels.cache_clear()
    try:
        g = torch.Generator().manual_seed(21)
        codes4, scales4, zeros4 = quantize_int4(torch.randn(38, k, generator=g))
        packed4 = cpu.pack_q4(codes4)
        scales4, mins4 = q4_1_scales(scales4, zeros4)
        codes8, scales8 = quantize_int8(torch.randn(38, k, generator=g))  # 38: a partial quad
        bias = torch.randn(38, generator=g)
        x = torch.randn(9, k, generator=g) * 3

        def both(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return (cpu.q4_matmul(rows, packed4, scales4, mins4, bias),
                    cpu.int8_matmul(rows, codes8, scales8, bias))

        batched = both(x)
        for i in range(x.shape[0]):
            alone = both(x[i:i + 1])
            assert torch.equal(alone[0][0], batched[0][i]), i
            assert torch.equal(alone[1][0], batched[1][i]), i
    finally:
        if march is not None:
            monkeypatch.delenv("TOKENMILL_CPU_MARCH")
        cpu.cpu_kernels.cache_clear()


def test_pack_q4_uses_q4_1_nibble_order():
    codes = torch.arange(64, dtype=torch.int32).remainder(16).view(1, 64)
    packed = cpu.pack_q4(codes)
    assert packed.shape == (1, 32)
    assert int(packed[0, 0]) == codes[0, 0] | (codes[0, 16] << 4)
    assert int(packed[0, 17]) == codes[0, 33] | (codes[0, 49] << 4)


def test_kernels_can_be_disabled(monkeypatch):
    monkeypatch.setenv("TOKENMILL_CPU_KERNELS", "0")
    cpu.cpu_kernels.cache_clear()
    try:
        assert cpu.cpu_kernels() is None
        q, kc, vc, qsl, lens, tables = _paged_case([1], [8])
        assert not cpu.paged_attention(q, torch.zeros_like(q), kc, vc, qsl, lens, tables,
                                       1.0, 16)
    finally:
        monkeypatch.delenv("TOKENMILL_CPU_KERNELS")
        cpu.cpu_kernels.cache_clear()


@pytest.mark.parametrize("head_dim", [12, 128])  # the generic loop; two 64-wide V passes
def test_paged_attention_other_head_dims(head_dim):
    g = torch.Generator().manual_seed(head_dim)
    kc = torch.randn(8, BLOCK, KV_HEADS, head_dim, generator=g)
    vc = torch.randn(8, BLOCK, KV_HEADS, head_dim, generator=g)
    tables = torch.tensor([[3, 1, 4], [0, 2, 5]], dtype=torch.int32)
    lens = torch.tensor([40, 21], dtype=torch.int32)
    qsl = torch.tensor([0, 1, 3], dtype=torch.int32)
    q = torch.randn(3, HEADS, head_dim, generator=g)
    out = torch.zeros_like(q)
    assert cpu.paged_attention(q, out, kc, vc, qsl, lens, tables, head_dim**-0.5, 16)
    expected = reference_attention(q, kc, vc, qsl, lens, tables, head_dim**-0.5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 baseline build")
def test_portable_build_matches(monkeypatch):
    """The loops compiled without AVX2 (-march=x86-64) give the same results."""
    from tokenmill.model.quantization import (
        dequantize_q4_1,
        q4_1_scales,
        quantize_int4,
        round_to_q8,
    )

    monkeypatch.setenv("TOKENMILL_CPU_MARCH", "x86-64")
    cpu.cpu_kernels.cache_clear()
    try:
        assert cpu.cpu_kernels() is not None
        q, kc, vc, qsl, lens, tables = _paged_case([1, 3, 1], [20, 33, 64], seed=5)
        out = torch.zeros_like(q)
        assert cpu.paged_attention(q, out, kc, vc, qsl, lens, tables, DIM**-0.5, 16)
        expected = reference_attention(q, kc, vc, qsl, lens, tables, DIM**-0.5)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        g = torch.Generator().manual_seed(9)
        codes, scales, zeros = quantize_int4(torch.randn(9, 64, generator=g))
        x = torch.randn(6, 64, generator=g)
        d, mins = q4_1_scales(scales, zeros)
        got = cpu.q4_matmul(x, cpu.pack_q4(codes), d, mins, None)
        torch.testing.assert_close(got, round_to_q8(x) @ dequantize_q4_1(codes, d, mins).T,
                                   rtol=1e-4, atol=1e-4)
        test_int8_matmul_matches_dense(5, 33)
    finally:
        monkeypatch.delenv("TOKENMILL_CPU_MARCH")
        cpu.cpu_kernels.cache_clear()


@pytest.mark.skipif(not {"avx512_vnni", "avx_vnni"} & cpu_flags(),
                    reason="needs a CPU with VNNI")
def test_vnni_dot_products_equal_plain_avx2(monkeypatch):
    """With VNNI the 8-bit dot products are one vpdpbusd; built for AVX2 without it
    (-march=haswell: maddubs + madd) the int4 and int8 matmuls give the same bits."""
    from tokenmill.model.quantization import q4_1_scales, quantize_int4, quantize_int8

    g = torch.Generator().manual_seed(11)
    codes4, scales4, zeros4 = quantize_int4(torch.randn(37, 256, generator=g))
    packed4 = cpu.pack_q4(codes4)
    scales4, mins4 = q4_1_scales(scales4, zeros4)
    codes8, scales8 = quantize_int8(torch.randn(37, 256, generator=g))
    bias = torch.randn(37, generator=g)

    def products() -> list[torch.Tensor]:
        out = []
        for rows in (1, 3, 4, 8, 13):
            x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)) * 3
            out.append(cpu.q4_matmul(x, packed4, scales4, mins4, bias))
            out.append(cpu.int8_matmul(x, codes8, scales8, None))
        return out

    cpu.cpu_kernels.cache_clear()
    native = products()
    monkeypatch.setenv("TOKENMILL_CPU_MARCH", "haswell")
    cpu.cpu_kernels.cache_clear()
    try:
        plain = products()
    finally:
        monkeypatch.delenv("TOKENMILL_CPU_MARCH")
        cpu.cpu_kernels.cache_clear()
    assert all(a is not None for a in native + plain)
    for a, b in zip(native, plain, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("spread", [1.0, 30.0, 300.0])
def test_paged_attention_softmax_over_wide_score_ranges(spread):
    """The vectorised exp: scores from near-equal to hundreds apart (weights that
    underflow), float32 and bfloat16, still match the reference softmax."""
    q, kc, vc, qsl, lens, tables = _paged_case([1, 1, 3], [9, 40, 77], seed=12)
    q = q * spread
    out = torch.zeros_like(q)
    assert cpu.paged_attention(q, out, kc, vc, qsl, lens, tables, DIM**-0.5, 16)
    # float64 reference: PyTorch's float32 SDPA itself is off by 3e-5 at spread 300 with
    # its AVX2 code (this kernel by 3.3e-6)
    ref = dense_reference_attention(q.double(), kc, vc, qsl, lens, tables, DIM**-0.5,
                                    1 << 30).float()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    qb, kb, vb = q.bfloat16(), kc.bfloat16(), vc.bfloat16()
    outb = torch.zeros_like(qb)
    assert cpu.paged_attention(qb, outb, kb, vb, qsl, lens, tables, DIM**-0.5, 16)
    refb = reference_attention(qb.float(), kb.float(), vb.float(), qsl, lens, tables, DIM**-0.5)
    torch.testing.assert_close(outb.float(), refb, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("rows", [1, 7, 100])
def test_rms_norm_bfloat16_rounds_like_pytorch(rows):
    """The bfloat16 C norm against RMSNorm's PyTorch formula: the residual sum exactly,
    the norm within one bfloat16 step (only the sum of squares' order differs)."""
    from tokenmill.model.layers import RMSNorm

    g = torch.Generator().manual_seed(rows)
    norm = RMSNorm(576, 1e-5, dtype=torch.bfloat16)
    norm.weight.data.copy_((torch.rand(576, generator=g) + 0.5).bfloat16())
    x = (torch.randn(rows, 576, generator=g) * 3).bfloat16()
    residual = (torch.randn(rows, 576, generator=g) * 3).bfloat16()
    got = cpu.rms_norm(x, norm.weight, 1e-5)
    want = norm._norm(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=8e-3, atol=0)
    assert (got != want).float().mean() < 0.01
    got_norm, got_sum = cpu.rms_norm(x, norm.weight, 1e-5, residual)
    assert torch.equal(got_sum, x + residual)
    torch.testing.assert_close(got_norm, norm._norm(x + residual), rtol=8e-3, atol=0)
    assert cpu.rms_norm(x, norm.weight.float(), 1e-5) is None  # mixed dtypes: PyTorch


@pytest.mark.parametrize("shape", [(1, 7), (3, 8), (32, 49152), (5, 1001)])
def test_argmax_rows_matches_torch(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(shape[1])
    x = torch.randn(*shape, generator=g)
    if shape[1] > 8:
        x[0, 3] = x[0, shape[1] - 2] = x[0].max() + 1  # a tie: the first index wins
        x[-1, :] = -float("inf")                        # all -inf: index 0
    if shape[0] > 2:
        x[1, shape[1] // 2] = float("nan")              # NaN counts as the largest
        x[1, shape[1] - 1] = float("nan")
    got = cpu.argmax_rows(x)
    assert got is not None and got.dtype == torch.int64
    assert torch.equal(got, x.argmax(dim=-1))
    strided = torch.randn(4, 2 * shape[1], generator=g)[:, ::2]  # rows must be unit-stride
    assert cpu.argmax_rows(strided) is None
    wide = torch.randn(4, 2 * shape[1], generator=g)[:, :shape[1]]  # rows ld apart
    assert torch.equal(cpu.argmax_rows(wide), wide.argmax(dim=-1))


def _shapes_case(heads, kv_heads, dim, block, window, q_dtype, cache_dtype):
    """Five sequences (one- and multi-token queries, 1 to 129 keys) in blocks of `block`,
    the dense reference (float64 for float32 queries) as float32; with a window, the table
    entries wholly before every query's window point at a NaN block (never read)."""
    g = torch.Generator().manual_seed(heads * dim + block)
    q_lens, seq_lens = [1, 4, 1, 16, 1], [1, 70, 33, 50, 129]
    num_blocks = sum(-(-n // block) for n in seq_lens) + 1
    kc = torch.randn(num_blocks, block, kv_heads, dim, generator=g).to(cache_dtype)
    vc = torch.randn(num_blocks, block, kv_heads, dim, generator=g).to(cache_dtype)
    q, qsl, lens, tables = paged_layout(q_lens, seq_lens, num_blocks - 1, block, heads, dim, g)
    q = q.to(q_dtype)
    ref = torch.float64 if q_dtype == torch.float32 else torch.float32
    want = dense_reference_attention(q.to(ref), kc.to(ref), vc.to(ref), qsl, lens, tables,
                                     dim**-0.5, window or 10**9).float()
    if window:
        kc[-1], vc[-1] = float("nan"), float("nan")
        for i, (n, ql) in enumerate(zip(seq_lens, q_lens, strict=True)):
            tables[i, : max(0, n - ql - window + 1) // block] = num_blocks - 1
    return q, kc, vc, qsl, lens, tables, want


@pytest.mark.parametrize("heads,kv_heads,dim,block,window", [
    (9, 3, 64, 16, 0),    # SmolLM2's shape
    (8, 1, 128, 8, 0),    # a group of 8 (two passes of 6 heads), two 64-wide V passes
    (4, 2, 256, 32, 37),  # the widest head; blocks of 32; a window inside a block
    (6, 2, 32, 16, 17),   # one 32-wide chunk; a window one past a block
    (2, 2, 64, 5, 0),     # no GQA; blocks of 5: 16-key tiles straddle blocks
])
def test_paged_attention_bfloat16_shapes(heads, kv_heads, dim, block, window):
    """bfloat16 caches over the shapes the kernels branch on (the AVX-512 kernel on CPUs
    with AVX512-BF16, the AVX2 one elsewhere): head widths, GQA groups, block sizes,
    multi-token queries and windows whose earlier blocks hold NaN (never read)."""
    q, kc, vc, qsl, lens, tables, want = _shapes_case(heads, kv_heads, dim, block, window,
                                                      torch.bfloat16, torch.bfloat16)
    out = torch.zeros_like(q)
    assert cpu.paged_attention(q, out, kc, vc, qsl, lens, tables, dim**-0.5, 16, window)
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim,block,window", [
    (9, 3, 64, 16, 0),    # SmolLM2's shape (a case the AVX-512 kernel spells out)
    (14, 2, 64, 16, 0),   # Qwen2.5-0.5B's groups of 7
    (8, 1, 128, 8, 0),    # a group of 8 (two passes of 6 heads), two 64-wide V passes
    (4, 2, 256, 32, 37),  # the widest head; blocks of 32; a window inside a block
    (6, 2, 48, 16, 17),   # counts known only at run time; a window one past a block
    (2, 2, 64, 5, 0),     # no GQA; blocks of 5: 16-key tiles straddle blocks
])
def test_paged_attention_float32_queries_shapes(cache_dtype, heads, kv_heads, dim, block,
                                                window):
    """float32 queries over float32 and 16-bit caches, over the shapes the kernels branch
    on (the AVX-512 kernel on AVX-512 CPUs, the AVX2 one elsewhere), against a float64
    reference; each sequence's rows the same bits alone as in the batch."""
    q, kc, vc, qsl, lens, tables, want = _shapes_case(heads, kv_heads, dim, block, window,
                                                      torch.float32, cache_dtype)
    out = torch.zeros_like(q)
    assert cpu.paged_attention(q, out, kc, vc, qsl, lens, tables, dim**-0.5, 16, window)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for i in range(len(lens)):  # alone
        rows = slice(int(qsl[i]), int(qsl[i + 1]))
        alone = torch.zeros_like(q[rows])
        assert cpu.paged_attention(q[rows], alone, kc, vc,
                                   torch.tensor([0, rows.stop - rows.start], dtype=torch.int32),
                                   lens[i:i + 1], tables[i:i + 1], dim**-0.5, 16, window)
        assert torch.equal(alone, out[rows]), i
