"""Prefill through dequantized float tiles against the dense reference and the integer kernels."""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F

from tokenmill.kernels import cpu
from tokenmill.model import dequant_matmul
from tokenmill.model.quantization import (
    Int4Linear,
    Int8Linear,
    dequantize_int4,
    dequantize_int8,
    dequantize_q4_1,
    q4_1_scales,
    quantize_int4,
    quantize_int8,
    round_to_q8,
)

pytestmark = pytest.mark.skipif(cpu.cpu_kernels() is None, reason="no C compiler")


@pytest.fixture(autouse=True)
def float32_gemm(monkeypatch):
    """Exact comparisons: the float32 GEMM (bfloat16 is picked on CPUs that have it)."""
    monkeypatch.setattr(dequant_matmul, "DENSE_DTYPE", torch.float32)


def _int4(n: int, k: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    codes, scales, zeros = quantize_int4(torch.randn(n, k, generator=g))
    return codes, *q4_1_scales(scales, zeros), scales, zeros


# The kernel library built for this CPU, for AVX2 (the vector loops) and, on x86, for the
# baseline (the scalar loops): all must give PyTorch's bits.
MARCHES = [None, "haswell", "x86-64"] if platform.machine() in ("x86_64", "AMD64") else [None]


@pytest.fixture(params=MARCHES, ids=lambda m: m or "native")
def any_build(request, monkeypatch):
    if request.param is not None:
        monkeypatch.setenv("TOKENMILL_CPU_MARCH", request.param)
    cpu.cpu_kernels.cache_clear()
    yield
    monkeypatch.delenv("TOKENMILL_CPU_MARCH", raising=False)
    cpu.cpu_kernels.cache_clear()


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))  # -0.0 is not 0.0 here


def test_q4_dequantize_is_exact(any_build):
    codes, d, mins, scales, zeros = _int4(13, 96, 0)
    packed = cpu.pack_q4(codes)
    got = cpu.q4_dequantize(packed, d, mins)
    expected = dequantize_q4_1(codes, d, mins)
    assert _same_bits(got, expected)
    # Half-precision d and m move the weight by far less than a 4-bit step.
    torch.testing.assert_close(got, dequantize_int4(codes, scales, zeros), rtol=0, atol=1e-2)
    assert _same_bits(cpu.q4_dequantize(packed, d, mins, 5, 9), expected[5:9])
    codes[0], d[0], mins[0] = 0, -d[0], -0.0  # -0.0 + -0.0: signed zeros must match too
    assert _same_bits(cpu.q4_dequantize(cpu.pack_q4(codes), d, mins),
                      dequantize_q4_1(codes, d, mins))
    with pytest.raises(ValueError, match="float16"):
        cpu.q4_dequantize(packed, d.float(), mins)


def test_q8_dequantize_is_exact(any_build):
    codes, scales = quantize_int8(torch.randn(11, 64, generator=torch.Generator().manual_seed(1)))
    scales = scales.contiguous()
    codes[1, :8] = 0
    scales[1] = -scales[1]  # zero codes with negative scales: -0.0, as PyTorch gives
    expected = dequantize_int8(codes, scales)
    assert _same_bits(cpu.q8_dequantize(codes, scales), expected)
    assert _same_bits(cpu.q8_dequantize(codes, scales, 3, 10), expected[3:10])


@pytest.mark.parametrize("tile_bytes", [1, 4 * 96 * 5, 1 << 20])  # row by row, 5 rows, all
def test_tiled_dense_matmul_matches_linear(tile_bytes):
    g = torch.Generator().manual_seed(2)
    weight, x, bias = (torch.randn(23, 96, generator=g), torch.randn(7, 96, generator=g),
                       torch.randn(23, generator=g))
    got = dequant_matmul.tiled_dense_matmul(
        x, 23, lambda start, stop: weight[start:stop].clone(), bias, tile_bytes=tile_bytes)
    torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    assert dequant_matmul.tiled_dense_matmul(x, 23, lambda start, stop: None) is None


def test_use_dense_threshold():
    assert dequant_matmul.use_dense(64, 64) and not dequant_matmul.use_dense(63, 64)
    assert not dequant_matmul.use_dense(10_000, 0)  # 0: the dense path is off


@pytest.mark.parametrize("rows", [1, 70])
def test_int4_linear_dense_path_matches_integer_kernel(rows):
    g = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(40, 128, generator=g), torch.randn(40, generator=g)
    x = torch.randn(rows, 128, generator=g) * 3
    layer = Int4Linear(weight, bias, kernel="native")
    layer.dense_min_rows = 1
    dense = layer(x)
    layer.dense_min_rows = 0
    integer = layer(x)
    codes, scales, zeros = quantize_int4(weight)
    q4_weight = dequantize_q4_1(codes, *q4_1_scales(scales, zeros))
    reference = F.linear(x, q4_weight, bias)
    torch.testing.assert_close(dense, reference, rtol=1e-4, atol=1e-4)
    # the integer kernel rounds its input to 8 bits per group: close, not equal
    torch.testing.assert_close(integer, F.linear(round_to_q8(x), q4_weight, bias),
                               rtol=1e-4, atol=1e-4)
    assert float((dense - integer).norm() / reference.norm()) < 0.02


def test_int4_linear_default_threshold_routes_prefill_rows():
    layer = Int4Linear(torch.randn(8, 64), kernel="native")
    calls = []
    real = layer._dequantize_rows
    layer._dequantize_rows = lambda start, stop: calls.append((start, stop)) or real(start, stop)
    layer(torch.randn(max(1, layer.dense_min_rows - 1), 64))
    assert calls == []
    if layer.dense_min_rows > 0:
        layer(torch.randn(layer.dense_min_rows, 64))
        assert calls == [(0, 8)]


@pytest.mark.parametrize("rows", [2, 65])
def test_int8_linear_dense_path_matches_integer_kernel(rows):
    g = torch.Generator().manual_seed(10 + rows)
    weight, bias = torch.randn(24, 96, generator=g), torch.randn(24, generator=g)
    x = torch.randn(rows, 96, generator=g)
    layer = Int8Linear(weight, bias)
    layer.dense_min_rows = 1
    dense = layer(x)
    layer.dense_min_rows = 0
    integer = layer(x)
    codes, scales = quantize_int8(weight)
    reference = F.linear(x, dequantize_int8(codes, scales), bias)
    torch.testing.assert_close(dense, reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(integer, F.linear(round_to_q8(x), dequantize_int8(
        codes, scales), bias), rtol=1e-4, atol=1e-4)
    assert float((dense - integer).norm() / reference.norm()) < 0.02


def test_bfloat16_gemm_is_close():
    g = torch.Generator().manual_seed(4)
    weight, x, bias = (torch.randn(40, 128, generator=g), torch.randn(9, 128, generator=g),
                       torch.randn(40, generator=g))
    for tile_bytes in (4 * 128 * 7, 1 << 20):
        got = dequant_matmul.tiled_dense_matmul(
            x, 40, lambda start, stop: weight[start:stop].clone(), bias,
            tile_bytes=tile_bytes, dtype=torch.bfloat16)
        assert got.dtype == torch.float32
        # bfloat16 inputs, float32 accumulation; PyTorch's CPU GEMM hands back bfloat16,
        # so the product is rounded once more (half a bfloat16 step: 2 ** -9 relative)
        product = F.linear(x.bfloat16().float(), weight.bfloat16().float())
        torch.testing.assert_close(got - bias, product, rtol=2 ** -8, atol=1e-3)


def test_dense_dtype_selection(monkeypatch):
    monkeypatch.delenv("TOKENMILL_DENSE_DTYPE", raising=False)
    assert dequant_matmul.default_dense_dtype(native_bf16=True) == torch.bfloat16
    assert dequant_matmul.default_dense_dtype(native_bf16=False) == torch.float32
    monkeypatch.setenv("TOKENMILL_DENSE_DTYPE", "float32")
    assert dequant_matmul.default_dense_dtype(native_bf16=True) == torch.float32
    monkeypatch.setenv("TOKENMILL_DENSE_DTYPE", "half")
    with pytest.raises(ValueError):
        dequant_matmul.default_dense_dtype()
