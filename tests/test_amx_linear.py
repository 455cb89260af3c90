"""tokenmill's bfloat16 AMX matmul (kernels/cpu/bf16_matmul.c) against float32 products
of the same bfloat16 values, and the AmxLinear layer built on it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.kernels import cpu as cpu_kernels
from tokenmill.model.prepacked import AmxLinear, amx_usable

needs_amx = pytest.mark.skipif(not cpu_kernels.amx_bf16_available(),
                               reason="no AMX-BF16 here (or no C compiler)")


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


@needs_amx
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 32, 33, 100])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_float32_products(rows: int, bias: bool) -> None:
    weight = _bf16(96, 128, seed=1)
    b = _bf16(96, seed=2) if bias else None
    # Rows further apart than K: the kernel reads x with its row stride.
    x = _bf16(rows, 160, seed=rows)[:, 16:144]
    got = cpu_kernels.bf16_matmul_amx(x, cpu_kernels.pack_bf16_amx(weight), b)
    _assert_rounded_from(got, _reference(x, weight, b))


@needs_amx
def test_a_row_does_not_depend_on_the_others() -> None:
    weight, x = _bf16(64, 64, seed=3), _bf16(40, 64, seed=4)
    packed = cpu_kernels.pack_bf16_amx(weight)
    batched = cpu_kernels.bf16_matmul_amx(x, packed)
    for i in (0, 15, 16, 31, 32, 39):
        assert torch.equal(cpu_kernels.bf16_matmul_amx(x[i:i + 1], packed)[0], batched[i])


@needs_amx
def test_onednn_amx_after_ours_still_right() -> None:
    """Both configure the same tile registers: a oneDNN bfloat16 matmul run after
    ours must still get its own configuration (it releases and reloads)."""
    weight, x = _bf16(256, 512, seed=5), _bf16(64, 512, seed=6)
    before = F.linear(x, weight)
    cpu_kernels.bf16_matmul_amx(x[:3], cpu_kernels.pack_bf16_amx(weight))
    assert torch.equal(F.linear(x, weight), before)


@needs_amx
def test_amx_linear_layer() -> None:
    weight, bias = _bf16(96, 64, seed=7), _bf16(96, seed=8)
    layer = AmxLinear(weight, bias)
    assert torch.equal(layer.weight, weight)
    x = _bf16(2, 5, 64, seed=9)  # leading dims are flattened and restored
    got = layer(x)
    assert got.shape == (2, 5, 96)
    _assert_rounded_from(got, _reference(x, weight, bias))
    assert layer(torch.zeros(0, 64, dtype=torch.bfloat16)).shape == (0, 96)
    # Anything the kernel does not take falls back to F.linear on the unpacked weight.
    torch.testing.assert_close(layer(x.float()), _reference(x, weight, bias),
                               rtol=1e-5, atol=1e-5)


def test_none_without_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_kernels, "amx_bf16_available", lambda: False)
    weight = _bf16(64, 64, seed=10)
    assert cpu_kernels.bf16_matmul_amx(_bf16(2, 64, seed=11),
                                       cpu_kernels.pack_bf16_amx(weight)) is None
    assert not amx_usable(weight)
