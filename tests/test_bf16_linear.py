"""tokenmill's bfloat16 matmuls - on AMX tiles (kernels/cpu/bf16_matmul.c) and on
AVX512-BF16 dot products (bf16_matmul_dot.c), one packed layout - against float32
products of the same bfloat16 values, and the AmxLinear / Bf16DotLinear layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.kernels import cpu as cpu_kernels
from tokenmill.model.prepacked import (
    AmxLinear,
    Bf16DotLinear,
    amx_usable,
    bf16_dot_usable,
    prepack_linears,
)

needs_amx = pytest.mark.skipif(not cpu_kernels.amx_bf16_available(),
                               reason="no AMX-BF16 here (or no C compiler)")
needs_dot = pytest.mark.skipif(not cpu_kernels.bf16_dot_available(),
                               reason="no AVX512-BF16 here (or no C compiler)")
# kernel name -> (matmul, layer class), each run where the CPU has it
KERNELS = {"amx": (cpu_kernels.bf16_matmul_amx, AmxLinear),
           "dot": (cpu_kernels.bf16_matmul_dot, Bf16DotLinear)}
BOTH = [pytest.param("amx", marks=needs_amx), pytest.param("dot", marks=needs_dot)]


def _bf16(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


def test_pack_layout_and_round_trip() -> None:
    weight = _bf16(64, 96, seed=0)
    packed = cpu_kernels.pack_bf16_amx(weight)
    assert packed.shape == (4, 3, 16, 16, 2)
    # packed[nb, kb, r, c, e] = W[16 nb + c, 32 kb + 2 r + e]
    assert packed[2, 1, 5, 7, 1] == weight[16 * 2 + 7, 32 * 1 + 2 * 5 + 1]
    assert torch.equal(cpu_kernels.unpack_bf16_amx(packed), weight)


def test_shapes_the_kernel_takes() -> None:
    assert cpu_kernels.amx_shape_supported(960, 576)
    assert not cpu_kernels.amx_shape_supported(48, 576)  # 48 columns: not two 16-wide tiles
    assert not cpu_kernels.amx_shape_supported(64, 40)
    assert not amx_usable(torch.zeros(64, 64))  # float32 stays on oneDNN
    assert not amx_usable(torch.zeros(48, 64, dtype=torch.bfloat16))


def _reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float())


def _assert_rounded_from(got: torch.Tensor, want: torch.Tensor) -> None:
    """``got`` is ``want`` (float32) rounded to bfloat16, up to float32 summation order:
    within one bfloat16 step, and equal to the rounding almost everywhere."""
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    step = want.abs() * 2.0**-7 + 1e-6
    assert ((got.float() - want).abs() <= step).all()
    assert (got == want.bfloat16()).float().mean() > 0.99


@pytest.mark.parametrize("kernel", BOTH)
@pytest.mark.parametrize("rows", [1, 5, 8, 16, 17, 32, 33, 63, 64, 65, 100])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_float32_products(kernel: str, rows: int, bias: bool) -> None:
    matmul = KERNELS[kernel][0]
    weight = _bf16(96, 128, seed=1)
    b = _bf16(96, seed=2) if bias else None
    # Rows further apart than K, starting one element in: the kernel reads x with its
    # row stride, and activation pairs need not be 4-byte aligned.
    x = _bf16(rows, 161, seed=rows)[:, 17:145]
    got = matmul(x, cpu_kernels.pack_bf16_amx(weight), b)
    _assert_rounded_from(got, _reference(x, weight, b))


@pytest.mark.parametrize("kernel", BOTH)
def test_a_row_does_not_depend_on_the_others(kernel: str) -> None:
    matmul = KERNELS[kernel][0]
    weight, x = _bf16(64, 64, seed=3), _bf16(140, 64, seed=4)
    packed = cpu_kernels.pack_bf16_amx(weight)
    batched = matmul(x, packed)
    for i in (0, 7, 8, 15, 16, 31, 32, 39, 63, 64, 139):
        assert torch.equal(matmul(x[i:i + 1], packed)[0], batched[i])
        assert torch.equal(matmul(x[i:i + 3], packed)[0], batched[i])


@needs_dot
def test_dot_kernel_special_values() -> None:
    """Infinities and NaN pass through as float32 arithmetic gives them; a NaN output
    stays NaN after rounding to bfloat16."""
    weight = torch.ones(32, 32, dtype=torch.bfloat16)
    x = torch.zeros(3, 32, dtype=torch.bfloat16)
    x[0, 5], x[1, 6], x[2, 7] = float("inf"), float("nan"), 3.0
    got = cpu_kernels.bf16_matmul_dot(x, cpu_kernels.pack_bf16_amx(weight))
    assert got[0].isinf().all() and got[1].isnan().all() and (got[2] == 3.0).all()


@needs_amx
def test_onednn_amx_after_ours_still_right() -> None:
    """Both configure the same tile registers: a oneDNN bfloat16 matmul run after
    ours must still get its own configuration (it releases and reloads)."""
    weight, x = _bf16(256, 512, seed=5), _bf16(64, 512, seed=6)
    before = F.linear(x, weight)
    cpu_kernels.bf16_matmul_amx(x[:3], cpu_kernels.pack_bf16_amx(weight))
    assert torch.equal(F.linear(x, weight), before)


@pytest.mark.parametrize("kernel", BOTH)
def test_packed_linear_layer(kernel: str) -> None:
    weight, bias = _bf16(96, 64, seed=7), _bf16(96, seed=8)
    layer = KERNELS[kernel][1](weight, bias)
    assert torch.equal(layer.weight, weight)
    x = _bf16(2, 5, 64, seed=9)  # leading dims are flattened and restored
    got = layer(x)
    assert got.shape == (2, 5, 96)
    _assert_rounded_from(got, _reference(x, weight, bias))
    assert layer(torch.zeros(0, 64, dtype=torch.bfloat16)).shape == (0, 96)
    # Anything the kernel does not take falls back to F.linear on the unpacked weight.
    torch.testing.assert_close(layer(x.float()), _reference(x, weight, bias),
                               rtol=1e-5, atol=1e-5)


def test_none_without_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_kernels, "amx_bf16_available", lambda: False)
    monkeypatch.setattr(cpu_kernels, "bf16_dot_available", lambda: False)
    weight = _bf16(64, 64, seed=10)
    x, packed = _bf16(2, 64, seed=11), cpu_kernels.pack_bf16_amx(weight)
    assert cpu_kernels.bf16_matmul_amx(x, packed) is None
    assert cpu_kernels.bf16_matmul_dot(x, packed) is None
    assert not amx_usable(weight) and not bf16_dot_usable(weight)


@needs_dot
def test_which_layer_a_bfloat16_weight_becomes(monkeypatch: pytest.MonkeyPatch) -> None:
    """AMX first where the CPU has it, else AVX512-BF16; TOKENMILL_CPU_GEMM=onednn keeps
    oneDNN's; shapes off the 32-blocking keep oneDNN's too."""
    from tokenmill.model.layers import Linear

    def packed_kinds() -> list[str]:
        model = torch.nn.Sequential(Linear(64, 96, bias=False), Linear(64, 48, bias=False))
        for m in model:
            m.weight.data = _bf16(*m.weight.shape, seed=12)
        prepack_linears(model)
        return [type(m).__name__ for m in model]

    first = "AmxLinear" if cpu_kernels.amx_bf16_available() else "Bf16DotLinear"
    assert packed_kinds() == [first, "PrepackedLinear"]
    monkeypatch.setattr(cpu_kernels, "amx_bf16_available", lambda: False)
    assert packed_kinds() == ["Bf16DotLinear", "PrepackedLinear"]
    monkeypatch.setenv("TOKENMILL_CPU_GEMM", "onednn")
    assert packed_kinds() == ["PrepackedLinear", "PrepackedLinear"]
