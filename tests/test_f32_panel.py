"""tokenmill's float32 panel matmul (kernels/cpu/f32_matmul.c) against float64 products,
and the F32PanelLinear layer built on it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.kernels import cpu as cpu_kernels
from tokenmill.model.prepacked import F32PanelLinear, PrepackedLinear, _packed, f32_panel_usable

needs_panel = pytest.mark.skipif(not cpu_kernels.f32_panel_available(),
                                 reason="no AVX2/FMA here (or no C compiler)")


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_pack_layout_and_round_trip() -> None:
    weight = _randn(48, 40, seed=0)
    packed = cpu_kernels.pack_f32_panels(weight)
    assert packed.shape == (3, 40, 16)
    # packed[nb, k, c] = W[16 nb + c, k]
    assert packed[2, 33, 5] == weight[16 * 2 + 5, 33]
    assert torch.equal(cpu_kernels.unpack_f32_panels(packed), weight)


def _assert_close_to_exact(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor | None) -> None:
    want = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert got.dtype == torch.float32 and got.shape == want.shape
    # float32 sums of K terms: within a few ulp of the terms' magnitude
    scale = F.linear(x.double().abs(), weight.double().abs()) + 1.0
    assert ((got.double() - want).abs() <= 1e-6 * scale).all()


@needs_panel
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 13, 32, 100, 301])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_exact_products(rows: int, bias: bool) -> None:
    # K = 700: more than one 256-input pass over a panel when there are several row tiles
    weight = _randn(96, 700, seed=1)
    b = _randn(96, seed=2) if bias else None
    x = _randn(rows, 720, seed=rows)[:, 10:710]  # the kernel reads x with its row stride
    got = cpu_kernels.f32_matmul_panel(x, cpu_kernels.pack_f32_panels(weight), b)
    _assert_close_to_exact(got, x, weight, b)


@needs_panel
def test_a_row_does_not_depend_on_the_others() -> None:
    weight, x = _randn(64, 300, seed=3), _randn(40, 300, seed=4)
    packed = cpu_kernels.pack_f32_panels(weight)
    batched = cpu_kernels.f32_matmul_panel(x, packed)
    for i in (0, 5, 6, 17, 36, 39):
        assert torch.equal(cpu_kernels.f32_matmul_panel(x[i:i + 1], packed)[0], batched[i])
        assert torch.equal(cpu_kernels.f32_matmul_panel(x[i:i + 7], packed)[0], batched[i])


@needs_panel
def test_panel_linear_layer() -> None:
    weight, bias = _randn(32, 24, seed=7), _randn(32, seed=8)
    layer = F32PanelLinear(weight, bias)
    assert torch.equal(layer.weight, weight)
    x = _randn(2, 5, 24, seed=9)  # leading dims are flattened and restored
    got = layer(x)
    assert got.shape == (2, 5, 32)
    _assert_close_to_exact(got.reshape(10, 32), x.reshape(10, 24), weight, bias)
    assert layer(torch.zeros(0, 24)).shape == (0, 32)
    # Anything the kernel does not take falls back to F.linear on the unpacked weight.
    torch.testing.assert_close(layer(x.double()), F.linear(x.double(), weight.double(),
                                                           bias.double()))


def test_inputs_it_does_not_take() -> None:
    packed = cpu_kernels.pack_f32_panels(_randn(16, 8, seed=10))
    assert cpu_kernels.f32_matmul_panel(_randn(2, 8, seed=11).bfloat16(), packed) is None
    assert cpu_kernels.f32_matmul_panel(_randn(2, 9, seed=11), packed) is None  # K mismatch
    assert cpu_kernels.f32_matmul_panel(_randn(8, 2, seed=11).T, packed) is None  # strided K


def test_which_layers_use_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENMILL_CPU_GEMM", "native")
    assert f32_panel_usable(torch.zeros(32, 8)) == cpu_kernels.f32_panel_available()
    assert not f32_panel_usable(torch.zeros(40, 8))  # 40 columns: not whole panels
    assert not f32_panel_usable(torch.zeros(32, 8, dtype=torch.bfloat16))
    monkeypatch.setenv("TOKENMILL_CPU_GEMM", "onednn")
    assert not f32_panel_usable(torch.zeros(32, 8))
    assert isinstance(_packed(torch.zeros(32, 8)), PrepackedLinear)
    # auto: only where the kernel beats oneDNN (an AVX2 CPU without AVX-512)
    monkeypatch.setenv("TOKENMILL_CPU_GEMM", "auto")
    assert f32_panel_usable(torch.zeros(32, 8)) == cpu_kernels.f32_panel_preferred()
