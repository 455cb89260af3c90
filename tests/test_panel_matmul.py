"""The int4 and int8 matmuls on weights packed in 16-column panels
(kernels/cpu/q4_matmul_panels.c: AVX512-VNNI or AVX2; int8_matmul_panels.c: AVX512-VNNI;
both on AMX int8 tiles, panel_matmul_amx_exact.c; on AMX bfloat16 tiles,
panel_matmul_amx.c) against the dense reference and the row-layout kernels they replace
(no timing)."""

from __future__ import annotations

import functools

import pytest
import torch

from tokenmill.kernels import cpu
from tokenmill.model import dequant_matmul
from tokenmill.model.quantization import (
    AMX_MIN_ROWS,
    Int4Linear,
    Int8Linear,
    default_quantized_kernel,
    dequantize_int8,
    dequantize_q4_1,
    q4_1_scales,
    quantize_int4,
    quantize_int8,
    round_to_q8,
)

needs_q4 = pytest.mark.skipif(not cpu.q4_panels_available(),
                              reason="the int4 panel kernel needs AVX2 or AVX512-VNNI")
needs_int8 = pytest.mark.skipif(not cpu.int8_panels_available(),
                                reason="the int8 panel kernel needs AVX2 or AVX512-VNNI")


def _weight(n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    codes, scales, zeros = quantize_int4(torch.randn(n, k, generator=g))
    d, mins = q4_1_scales(scales, zeros)
    return codes, d, mins, g


def test_pack_layout():
    """Block bytes 64 h + 4 c + b: column c's codes 8 h + b (low) and 8 h + 4 + b (high);
    then the 16 columns' scales and minimums as float16."""
    if cpu.cpu_kernels() is None:
        pytest.skip("no C compiler")
    codes, d, mins, _ = _weight(32, 64, 0)
    packed = cpu.pack_q4_panels(codes, d, mins)
    assert packed.shape == (2, 2, cpu.Q4_PANEL_BLOCK) and packed.dtype == torch.uint8
    for p, g, h, c, b in [(0, 0, 0, 0, 0), (1, 1, 3, 15, 3), (0, 1, 2, 7, 1), (1, 0, 1, 4, 2)]:
        byte = int(packed[p, g, 64 * h + 4 * c + b])
        row, k = 16 * p + c, 32 * g + 8 * h + b
        assert byte & 0x0F == int(codes[row, k]) and byte >> 4 == int(codes[row, k + 4])
    block = packed[1, 1]
    assert torch.equal(block[256:288].view(torch.float16), d[16:32, 1])
    assert torch.equal(block[288:320].view(torch.float16), mins[16:32, 1])
    with pytest.raises(ValueError, match="N % 16"):
        cpu.pack_q4_panels(codes[:24], d[:24], mins[:24])


@needs_q4
@pytest.mark.parametrize("m", [1, 7, 8, 9, 50, 130])  # row blocks of 8, chunks of 48 rows
@pytest.mark.parametrize("n", [16, 48])
@pytest.mark.parametrize("k", [32, 96, 544])
def test_matches_dense(m: int, n: int, k: int):
    codes, d, mins, g = _weight(n, k, m * 10 + n + k)
    x = torch.randn(m, k, generator=g) * 4
    bias = torch.randn(n, generator=g)
    packed = cpu.pack_q4_panels(codes, d, mins)
    expected = round_to_q8(x) @ dequantize_q4_1(codes, d, mins).T
    torch.testing.assert_close(cpu.q4_matmul_panels(x, packed, bias), expected + bias,
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cpu.q4_matmul_panels(x, packed), expected, rtol=1e-4, atol=1e-4)
    # the row-layout kernel: the same rounded input and integer sums, another float order
    rows = cpu.q4_matmul(x, cpu.pack_q4(codes), d, mins, bias)
    torch.testing.assert_close(cpu.q4_matmul_panels(x, packed, bias), rows, rtol=1e-4, atol=1e-4)


needs_amx_panels = pytest.mark.skipif(not cpu.panels_amx_available(),
                                      reason="the AMX panel kernels need AMX-BF16")


needs_panel_tiles = pytest.mark.skipif(not cpu.panel_tiles_available(),
                                       reason="the panels' int8 tiles need AMX-INT8")


@needs_q4
@pytest.mark.parametrize("kernel", ["q4_matmul_panels",
                                    pytest.param("q4_matmul_panels_amx", marks=needs_amx_panels),
                                    pytest.param("int8 tiles", marks=needs_panel_tiles)])
def test_rows_do_not_depend_on_the_batch(kernel: str):
    """A row's result is the same bits alone, in a full block of 8 rows (AMX: a row tile of
    16, the second tile of a pass of 32), in a partial one, and in a later chunk of 48 rows
    (AMX: a later pass); strided input rows read as contiguous ones."""
    matmul = (functools.partial(cpu.q4_matmul_panels, tiles=True) if kernel == "int8 tiles"
              else getattr(cpu, kernel))
    codes, d, mins, g = _weight(64, 576, 3)
    packed = cpu.pack_q4_panels(codes, d, mins)
    bias = torch.randn(64, generator=g)
    x = torch.randn(75, 576, generator=g) * 3
    batched = matmul(x, packed, bias)
    for i in range(x.shape[0]):
        assert torch.equal(matmul(x[i:i + 1], packed, bias)[0], batched[i]), i
    assert torch.equal(matmul(x[5:40], packed, bias), batched[5:40])
    wide = torch.randn(5, 700, generator=g)
    assert torch.equal(matmul(wide[:, 10:586], packed), matmul(wide[:, 10:586].contiguous(),
                                                               packed))


@needs_panel_tiles
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 5, 16, 17, 32, 47, 75])  # row tiles of 16, passes of 32
@pytest.mark.parametrize("n, k", [(32, 96), (96, 576), (64, 1536)])
def test_int8_tiles_give_the_vector_bits(bits: int, m: int, n: int, k: int):
    """On AMX int8 tiles the panel kernels give the VNNI path's bits, with and without a
    bias, whatever the row count; the default (tiles from the kernel's row count on) too."""
    g = torch.Generator().manual_seed(m * 7 + n + k + bits)
    if bits == 4:
        codes, d, mins, _ = _weight(n, k, m + n + k)
        packed, matmul = cpu.pack_q4_panels(codes, d, mins), cpu.q4_matmul_panels
    else:
        codes8, scales8 = quantize_int8(torch.randn(n, k, generator=g))
        packed, matmul = cpu.pack_int8_panels(codes8, scales8), cpu.int8_matmul_panels
    x = torch.randn(m, k, generator=g) * 3
    bias = torch.randn(n, generator=g)
    for b in (None, bias):
        vector = matmul(x, packed, b, tiles=False)
        assert torch.equal(matmul(x, packed, b, tiles=True), vector)
        assert torch.equal(matmul(x, packed, b), vector)


@needs_panel_tiles
def test_int8_tiles_decline_what_they_cannot_take():
    """Outputs not a multiple of 32: no tiles when asked for them, the vector path by
    default."""
    codes, d, mins, g = _weight(48, 64, 4)
    packed = cpu.pack_q4_panels(codes, d, mins)
    x = torch.randn(40, 64, generator=g)
    assert cpu.q4_matmul_panels(x, packed, tiles=True) is None
    assert torch.equal(cpu.q4_matmul_panels(x, packed), cpu.q4_matmul_panels(x, packed,
                                                                             tiles=False))


def _amx_reference(x: torch.Tensor, codes: torch.Tensor, d: torch.Tensor,
                   mins: torch.Tensor) -> torch.Tensor:
    """x and w = d * code + m (one float32 rounding) rounded to bfloat16, float64 sums."""
    groups = codes.shape[1] // 32
    scale = d.double().repeat_interleave(32, dim=1)[:, : groups * 32]
    low = mins.double().repeat_interleave(32, dim=1)[:, : groups * 32]
    w = (scale * codes.double() + low).float().bfloat16()
    return x.bfloat16().double() @ w.double().T


@needs_amx_panels
@pytest.mark.parametrize("m", [1, 15, 16, 17, 32, 33, 100])  # row tiles of 16, passes of 32
@pytest.mark.parametrize(("n", "k"), [(32, 32), (64, 96), (96, 544)])
def test_amx_matches_bfloat16_reference(m: int, n: int, k: int):
    codes, d, mins, g = _weight(n, k, m * 10 + n + k)
    x = torch.randn(m, k, generator=g) * 4
    bias = torch.randn(n, generator=g)
    packed = cpu.pack_q4_panels(codes, d, mins)
    want = _amx_reference(x, codes, d, mins)
    got = cpu.q4_matmul_panels_amx(x, packed, bias)
    torch.testing.assert_close(got.double(), want + bias.double(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cpu.q4_matmul_panels_amx(x, packed).double(), want,
                               rtol=1e-5, atol=1e-4)
    # the dense bfloat16 path's numbers: the same rounded operands, another sum order
    dense = x.bfloat16() @ cpu.q4_panels_dequantize(packed).bfloat16().T
    torch.testing.assert_close(cpu.q4_matmul_panels_amx(x, packed), dense.float(),
                               rtol=2e-2, atol=2e-2)


@needs_amx_panels
@pytest.mark.parametrize("m", [1, 17, 32, 70])
@pytest.mark.parametrize(("n", "k"), [(32, 32), (96, 544)])
def test_int8_amx_matches_bfloat16_reference(m: int, n: int, k: int):
    g = torch.Generator().manual_seed(m + n + k)
    codes, scales = quantize_int8(torch.randn(n, k, generator=g))
    packed = cpu.pack_int8_panels(codes, scales)
    x = torch.randn(m, k, generator=g) * 4
    bias = torch.randn(n, generator=g)
    w = (codes.double() * scales.double().repeat_interleave(32, dim=1)).float().bfloat16()
    want = x.bfloat16().double() @ w.double().T + bias.double()
    got = cpu.int8_matmul_panels_amx(x, packed, bias)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    alone = torch.cat([cpu.int8_matmul_panels_amx(x[i:i + 1], packed, bias) for i in range(m)])
    assert torch.equal(alone, got)  # rows independent of the batch


@needs_amx_panels
def test_amx_declines_what_it_cannot_take():
    codes, d, mins, g = _weight(48, 64, 5)  # 48 outputs: three panels, not pairs
    packed = cpu.pack_q4_panels(codes, d, mins)
    assert cpu.q4_matmul_panels_amx(torch.randn(4, 64, generator=g), packed) is None
    assert cpu.q4_matmul_panels_amx(torch.randn(4, 64, generator=g).bfloat16(), packed) is None


@needs_amx_panels
def test_linear_switches_to_amx_at_its_row_count():
    """Int4Linear and Int8Linear run the VNNI panels below amx_min_rows and the AMX kernels
    from it on; the native decoder stack makes the same choice (tests/test_decoder_stack.py)."""
    layer = Int4Linear(torch.randn(64, 96))
    assert layer.amx_min_rows == AMX_MIN_ROWS[4] > 1 and layer.dense_min_rows == 0
    for rows in (layer.amx_min_rows - 1, layer.amx_min_rows, 300):
        x = torch.randn(rows, 96)
        kernel = cpu.q4_matmul_panels_amx if rows >= layer.amx_min_rows else cpu.q4_matmul_panels
        assert torch.equal(layer(x), kernel(x, layer.packed))
    head = Int8Linear(torch.randn(64, 96))
    assert head.kernel == "panels" and head.amx_min_rows == AMX_MIN_ROWS[8] > 1
    assert head.dense_min_rows == 0
    for rows in (head.amx_min_rows - 1, head.amx_min_rows, 300):
        x = torch.randn(rows, 96)
        kernel = (cpu.int8_matmul_panels_amx if rows >= head.amx_min_rows
                  else cpu.int8_matmul_panels)
        assert torch.equal(head(x), kernel(x, head.packed))


def test_dequantize_equals_the_row_layout():
    if cpu.cpu_kernels() is None:
        pytest.skip("no C compiler")
    codes, d, mins, _ = _weight(48, 96, 5)
    want = cpu.q4_dequantize(cpu.pack_q4(codes), d, mins)
    packed = cpu.pack_q4_panels(codes, d, mins)
    assert torch.equal(cpu.q4_panels_dequantize(packed), want)
    assert torch.equal(cpu.q4_panels_dequantize(packed, 16, 48), want[16:48])
    with pytest.raises(ValueError, match="16-row panels"):
        cpu.q4_panels_dequantize(packed, 8, 48)


@needs_q4
def test_quantized_linear_picks_the_kernel(monkeypatch: pytest.MonkeyPatch):
    assert default_quantized_kernel(64) == "panels"
    assert default_quantized_kernel(40) == "native"  # not a multiple of 16
    assert Int4Linear(torch.randn(64, 64)).kernel == "panels"
    int8 = "panels" if cpu.int8_panels_available() else "native"
    assert default_quantized_kernel(64, 8) == int8
    assert Int8Linear(torch.randn(64, 64)).kernel == int8
    assert Int8Linear(torch.randn(40, 64)).kernel == "native"
    # Prompts skip the dense path on panels, except int8 panels without VNNI (AVX2); panels
    # on AMX CPUs take AMX tiles instead, never the dense path.
    int4 = Int4Linear(torch.randn(64, 64))
    assert int4.amx_min_rows == (AMX_MIN_ROWS[4] if cpu.panels_amx_available() else 0)
    assert int4.dense_min_rows == (0 if int4.amx_min_rows
                                   else dequant_matmul.PANEL_DENSE_MIN_ROWS)
    assert Int4Linear(torch.randn(48, 64)).amx_min_rows == 0  # not a multiple of 32
    int8_layer = Int8Linear(torch.randn(64, 64))
    assert int8_layer.amx_min_rows == (AMX_MIN_ROWS[8] if cpu.panels_amx_available() else 0)
    assert int8_layer.dense_min_rows == (
        0 if int8_layer.amx_min_rows
        else dequant_matmul.PANEL_DENSE_MIN_ROWS if cpu.int8_panels_vnni()
        else dequant_matmul.DENSE_MIN_ROWS)
    monkeypatch.setenv("TOKENMILL_CPU_PANELS", "0")
    assert Int4Linear(torch.randn(64, 64)).kernel == "native"
    assert Int8Linear(torch.randn(64, 64)).kernel == "native"


@pytest.mark.parametrize("cls", [pytest.param(Int4Linear, marks=needs_q4),
                                 pytest.param(Int8Linear, marks=needs_int8)])
@pytest.mark.parametrize("rows", [1, 9, 70])
def test_linear_on_both_layouts(cls: type, rows: int):
    """The same weight as a panels and as a native layer: close on the integer path, and
    the same bits on the dense path (the same dequantized weight)."""
    g = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(80, 96, generator=g), torch.randn(80, generator=g)
    panel = cls(weight, bias, kernel="panels")
    native = cls(weight, bias, kernel="native")
    x = torch.randn(rows, 96, generator=g)
    panel.dense_min_rows = native.dense_min_rows = 0
    torch.testing.assert_close(panel(x), native(x), rtol=1e-5, atol=1e-5)
    panel.dense_min_rows = native.dense_min_rows = 1
    assert torch.equal(panel(x), native(x))


@needs_q4
def test_dense_tiles_start_on_panels():
    """A tile size that is not a multiple of 16 rows is rounded to panels."""
    g = torch.Generator().manual_seed(8)
    layer = Int4Linear(torch.randn(80, 64, generator=g), kernel="panels")
    x = torch.randn(3, 64, generator=g)
    whole = dequant_matmul.tiled_dense_matmul(x, 80, layer._dequantize_rows, None,
                                              dtype=torch.float32)
    tiled = dequant_matmul.tiled_dense_matmul(x, 80, layer._dequantize_rows, None,
                                              tile_bytes=4 * 64 * 20, dtype=torch.float32,
                                              row_multiple=16)
    torch.testing.assert_close(tiled, whole)


@pytest.mark.parametrize("march", ["haswell", "x86-64"])
def test_builds_without_the_kernels_fall_back(monkeypatch: pytest.MonkeyPatch, march: str):
    """Built for AVX2 without AVX-512 (haswell) both panel kernels run on maddubs, with the
    same bits as the AVX512-VNNI paths (int8 on two nibble planes); built without AVX2
    (x86-64) both are missing and layers take the row layout."""
    if cpu.cpu_kernels() is None:
        pytest.skip("no C compiler")
    import platform
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 builds")
    g = torch.Generator().manual_seed(9)
    codes, d, mins, _ = _weight(32, 64, 9)
    codes8, scales8 = quantize_int8(torch.randn(32, 64, generator=g))
    x = torch.randn(11, 64, generator=g) * 3
    packed8 = cpu.pack_int8_panels(codes8, scales8)
    native = cpu.q4_matmul_panels(x, cpu.pack_q4_panels(codes, d, mins))
    native8 = cpu.int8_matmul_panels(x, packed8)
    monkeypatch.setenv("TOKENMILL_CPU_MARCH", march)
    cpu.cpu_kernels.cache_clear()
    try:
        assert not cpu.int8_panels_vnni()
        got = cpu.q4_matmul_panels(x, cpu.pack_q4_panels(codes, d, mins))
        got8 = cpu.int8_matmul_panels(x, packed8)
        assert not cpu.panels_amx_available() and Int4Linear(torch.randn(64, 64)).amx_min_rows == 0
        assert not cpu.panel_tiles_available()
        assert Int8Linear(torch.randn(64, 64)).amx_min_rows == 0
        if march == "haswell":
            assert cpu.q4_panels_available() and default_quantized_kernel(64) == "panels"
            assert cpu.int8_panels_available() and default_quantized_kernel(64, 8) == "panels"
            want = round_to_q8(x) @ dequantize_q4_1(codes, d, mins).T
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            want8 = round_to_q8(x) @ cpu.q8_dequantize(codes8, scales8).T
            torch.testing.assert_close(got8, want8, rtol=1e-4, atol=1e-4)
            assert cpu.q4_matmul_panels(x, cpu.pack_q4_panels(codes, d, mins), tiles=True) is None
            if native is not None:  # the AVX-512 path adds the same terms in the same order
                assert torch.equal(got, native)
            if native8 is not None:
                assert torch.equal(got8, native8)
            for kernel, weight, out in ((cpu.q4_matmul_panels,
                                         cpu.pack_q4_panels(codes, d, mins), got),
                                        (cpu.int8_matmul_panels, packed8, got8)):
                alone = [kernel(x[i:i + 1], weight) for i in range(x.shape[0])]
                assert torch.equal(torch.cat(alone), out)  # rows independent of the batch
        else:
            assert not cpu.q4_panels_available() and got is None
            assert not cpu.int8_panels_available() and got8 is None
            assert default_quantized_kernel(64) == default_quantized_kernel(64, 8) == "native"
    finally:
        monkeypatch.delenv("TOKENMILL_CPU_MARCH")
        cpu.cpu_kernels.cache_clear()


def _weight8(n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    codes, scales = quantize_int8(torch.randn(n, k, generator=g))
    return codes, scales, g


def test_int8_pack_layout():
    """Block bytes 64 s + 4 c + b: column c's code for input 4 s + b plus 128; then the
    16 columns' float32 scales."""
    if cpu.cpu_kernels() is None:
        pytest.skip("no C compiler")
    codes, scales, _ = _weight8(32, 64, 0)
    codes[0, 0], codes[17, 63] = -127, 127
    packed = cpu.pack_int8_panels(codes, scales)
    assert packed.shape == (2, 2, cpu.INT8_PANEL_BLOCK) and packed.dtype == torch.uint8
    for p, g, s, c, b in [(0, 0, 0, 0, 0), (1, 1, 7, 1, 3), (0, 1, 5, 9, 2), (1, 0, 2, 15, 1)]:
        want = int(codes[16 * p + c, 32 * g + 4 * s + b]) + 128
        assert int(packed[p, g, 64 * s + 4 * c + b]) == want
    assert torch.equal(packed[1, 1, 512:].view(torch.float32), scales[16:32, 1])
    assert torch.equal(cpu.int8_panels_dequantize(packed), cpu.q8_dequantize(codes, scales))
    assert torch.equal(cpu.int8_panels_dequantize(packed, 16, 32),
                       cpu.q8_dequantize(codes, scales)[16:32])


@needs_int8
@pytest.mark.parametrize("m", [1, 7, 9, 50, 130])
@pytest.mark.parametrize("n", [16, 48])
@pytest.mark.parametrize("k", [32, 544])
def test_int8_matches_dense(m: int, n: int, k: int):
    codes, scales, g = _weight8(n, k, m * 10 + n + k)
    codes[0, :32] = 127  # the extremes: sums stay exact in int32
    codes[1 % n, :32] = -127
    x = torch.randn(m, k, generator=g) * 4
    bias = torch.randn(n, generator=g)
    packed = cpu.pack_int8_panels(codes, scales)
    expected = round_to_q8(x) @ dequantize_int8(codes, scales).T
    torch.testing.assert_close(cpu.int8_matmul_panels(x, packed, bias), expected + bias,
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cpu.int8_matmul_panels(x, packed), expected, rtol=1e-4, atol=1e-4)
    rows = cpu.int8_matmul(x, codes, scales, bias)
    torch.testing.assert_close(cpu.int8_matmul_panels(x, packed, bias), rows, rtol=1e-4,
                               atol=1e-4)


@needs_int8
def test_int8_rows_do_not_depend_on_the_batch():
    codes, scales, g = _weight8(64, 576, 3)
    packed = cpu.pack_int8_panels(codes, scales)
    bias = torch.randn(64, generator=g)
    x = torch.randn(61, 576, generator=g) * 3
    batched = cpu.int8_matmul_panels(x, packed, bias)
    for i in range(x.shape[0]):
        assert torch.equal(cpu.int8_matmul_panels(x[i:i + 1], packed, bias)[0], batched[i]), i
