"""Quantized KV cache (--kv-cache-dtype int8|fp8): format, round trip, native kernel."""

from __future__ import annotations

import platform

import pytest
import torch
from paged_cases import paged_layout, reference_attention

from tokenmill.attention.base import AttentionMetadata
from tokenmill.attention.torch_backend import TorchAttentionBackend, write_kv_cache
from tokenmill.kernels import cpu
from tokenmill.kernels.kv_quant import (
    SCALE_BYTES,
    cache_format,
    dequantize,
    quantize,
    row_bytes,
    storage_dtype,
)

HEADS, KV_HEADS, BLOCK = 6, 2, 16
FORMATS = ["int8", "fp8"]


def _quantized_cache(fmt, num_blocks, dim, seed):
    """A float cache and its quantized copy (block for block)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(num_blocks, BLOCK, KV_HEADS, dim, generator=g) * 3
    v = torch.randn(num_blocks, BLOCK, KV_HEADS, dim, generator=g)
    return k, v, quantize(k, fmt), quantize(v, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_error_bounds(fmt):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, 64, generator=g) * torch.rand(200, 4, 1, generator=g) * 10
    x[3, 1] = 0.0  # an all-zero row stays exactly zero
    packed = quantize(x, fmt)
    assert packed.dtype == storage_dtype(fmt, torch.float32)
    assert packed.shape == (200, 4, 64 + SCALE_BYTES)
    back = dequantize(packed, torch.float32)
    amax = x.abs().amax(-1, keepdim=True)
    err = (back - x).abs()
    if fmt == "int8":
        # Rounding to the nearest code: at most half a step of amax / 127.
        assert bool((err <= amax / 127 * 0.5 + 1e-6).all())
    else:
        # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal codes, and
        # the smallest codes (subnormal, step 2^-9 of the scale) add at most half a step.
        assert bool((err <= x.abs() * 2**-4 + amax / 448 * 2**-10 + 1e-6).all())
    assert bool((back[3, 1] == 0).all())
    # The stored maximum is exact: the scale maps it onto the largest code.
    idx = x.abs().argmax(-1, keepdim=True)
    torch.testing.assert_close(back.gather(-1, idx), x.gather(-1, idx), rtol=1e-6, atol=1e-6)


def test_row_bytes_and_capacity_ratios():
    f32 = row_bytes(64, "auto", torch.float32)
    bf16 = row_bytes(64, "auto", torch.bfloat16)
    for fmt in FORMATS:
        assert row_bytes(64, fmt, torch.float32) == 68
        assert f32 / row_bytes(64, fmt, torch.float32) >= 3.5
        assert bf16 / row_bytes(64, fmt, torch.bfloat16) >= 1.8


@pytest.mark.parametrize("fmt", FORMATS)
def test_block_copy_carries_scales(fmt):
    """A fork's block copy (the runner copies whole blocks) keeps values and scales."""
    _, _, kq, _ = _quantized_cache(fmt, 4, 32, 1)
    before = dequantize(kq[1], torch.float32)
    kq[3] = kq[1]
    torch.testing.assert_close(dequantize(kq[3], torch.float32), before, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_write_kv_cache_quantizes_into_slots(fmt):
    dtype = storage_dtype(fmt, torch.float32)
    kc = torch.zeros(4, BLOCK, KV_HEADS, 8 + SCALE_BYTES, dtype=dtype)
    vc = torch.zeros_like(kc)
    k, v = torch.randn(3, KV_HEADS, 8), torch.randn(3, KV_HEADS, 8)
    slots = torch.tensor([5, -1, 40])
    write_kv_cache(k, v, kc, vc, slots)
    flat_k = kc.view(-1, KV_HEADS, 8 + SCALE_BYTES)
    torch.testing.assert_close(flat_k[[5, 40]], quantize(k[[0, 2]], fmt), rtol=0, atol=0)
    assert cache_format(kc) == fmt
    assert int(flat_k[6:40].view(torch.uint8).sum()) == 0  # nothing else was written


def _case(q_lens, seq_lens, fmt, dim=32, seed=0, num_blocks=48):
    _, _, kq, vq = _quantized_cache(fmt, num_blocks, dim, seed)
    g = torch.Generator().manual_seed(seed + 1)
    q, qsl, lens, tables = paged_layout(q_lens, seq_lens, num_blocks, BLOCK, HEADS, dim, g)
    return q, kq, vq, qsl, lens, tables



needs_kernels = pytest.mark.skipif(cpu.cpu_kernels() is None, reason="no C compiler")


@needs_kernels
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dim", [32, 12, 128])  # AVX2 (D % 8 == 0; 128: two V passes), scalar
@pytest.mark.parametrize("window", [0, 20])
def test_native_kernel_matchesreference_attention(fmt, dim, window):
    q, kq, vq, qsl, lens, tables = _case([1, 3, 1, 16, 20], [70, 50, 9, 64, 40], fmt, dim,
                                         seed=dim + window)
    out = torch.full_like(q, 7.0)
    assert cpu.paged_attention(q, out, kq, vq, qsl, lens, tables, dim**-0.5, 16, window)
    ref = reference_attention(q, kq, vq, qsl, lens, tables, dim**-0.5, window or None)
    torch.testing.assert_close(out[:-20], ref[:-20], rtol=1e-5, atol=1e-5)
    assert bool((out[-20:] == 7.0).all())  # the 20-token chunk is left to SDPA


@needs_kernels
@pytest.mark.parametrize("fmt", FORMATS)
def test_torch_decode_paths_agree(fmt):
    """Batched PyTorch decode (no native kernel) == native kernel on a quantized cache."""
    q, kq, vq, qsl, lens, tables = _case([1, 1, 1], [33, 5, 48], fmt, seed=4)
    meta = AttentionMetadata(
        num_tokens=3, slot_mapping=torch.full((3,), -1), query_start_loc=qsl, seq_lens=lens,
        block_tables=tables, max_query_len=1, max_seq_len=48,
        query_start_loc_cpu=qsl.tolist(), seq_lens_cpu=lens.tolist())
    torch_out = TorchAttentionBackend._decode(q, kq, vq, meta, 0.2)
    out = torch.zeros_like(q)
    assert cpu.paged_attention(q, out, kq, vq, qsl, lens, tables, 0.2, 16)
    torch.testing.assert_close(out, torch_out, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("fmt", FORMATS)
def test_native_kernel_bfloat16_queries(fmt):
    """A bf16 model: bf16 q/out, quantized cache, float32 arithmetic inside."""
    q, kq, vq, qsl, lens, tables = _case([1, 2], [20, 45], fmt, seed=6)
    qb = q.bfloat16()
    out = torch.zeros_like(qb)
    assert cpu.paged_attention(qb, out, kq, vq, qsl, lens, tables, 32**-0.5, 16)
    ref = reference_attention(qb.float(), kq, vq, qsl, lens, tables, 32**-0.5)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


@needs_kernels
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 baseline build")
def test_portable_build_matches(monkeypatch):
    """The quantized kernel compiled without AVX2 gives the same results."""
    monkeypatch.setenv("TOKENMILL_CPU_MARCH", "x86-64")
    cpu.cpu_kernels.cache_clear()
    try:
        assert cpu.cpu_kernels() is not None
        for fmt in FORMATS:
            q, kq, vq, qsl, lens, tables = _case([1, 4], [40, 21], fmt, seed=7)
            out = torch.zeros_like(q)
            assert cpu.paged_attention(q, out, kq, vq, qsl, lens, tables, 0.2, 16)
            torch.testing.assert_close(out, reference_attention(q, kq, vq, qsl, lens, tables, 0.2),
                                       rtol=1e-5, atol=1e-5)
    finally:
        monkeypatch.delenv("TOKENMILL_CPU_MARCH")
        cpu.cpu_kernels.cache_clear()
