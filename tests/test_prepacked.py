"""oneDNN prepacked float32 and bfloat16 linear layers against F.linear and the
unpacked model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_engine_tiny import _save_tiny
from test_model_arch import tokenmill_logits

from tokenmill.attention.torch_backend import TorchAttentionBackend
from tokenmill.kernels import cpu as cpu_kernels
from tokenmill.kernels.cpu_features import has_native_bf16
from tokenmill.model.layers import Linear
from tokenmill.model.loader import LoadedModel, load_model, resolve_model
from tokenmill.model.prepacked import (
    AmxLinear,
    Bf16DotLinear,
    F32PanelLinear,
    PrepackedLinear,
    amx_usable,
    bf16_dot_usable,
    default_prepack,
    prepack_linears,
)
from tokenmill.model.quantization import Int8Linear

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                reason="PyTorch built without oneDNN")


def _linear(n: int, k: int, bias: bool, seed: int = 0) -> Linear:
    g = torch.Generator().manual_seed(seed)
    layer = Linear(k, n, bias, torch.float32)
    layer.weight.data.copy_(torch.randn(n, k, generator=g) * 0.1)
    if bias:
        layer.bias.data.copy_(torch.randn(n, generator=g))
    return layer


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 8, 32, 300])
def test_matches_f_linear(rows: int, bias: bool) -> None:
    dense = _linear(96, 64, bias)
    packed = PrepackedLinear.from_linear(dense)
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))
    want = F.linear(x, dense.weight, dense.bias)
    got = packed(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_leading_dims_strides_and_empty_input() -> None:
    dense = _linear(48, 32, True)
    packed = PrepackedLinear.from_linear(dense)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(packed(x), F.linear(x, dense.weight, dense.bias))
    strided = torch.randn(32, 7).T  # not contiguous
    torch.testing.assert_close(packed(strided), F.linear(strided, dense.weight, dense.bias))
    assert packed(torch.randn(0, 32)).shape == (0, 48)


def test_weight_unpacks_exactly() -> None:
    dense = _linear(40, 32, False)
    packed = PrepackedLinear.from_linear(dense)
    assert torch.equal(packed.weight, dense.weight)
    assert (packed.in_features, packed.out_features) == (32, 40)


def test_default_follows_device_dtype_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOKENMILL_CPU_GEMM", raising=False)
    assert default_prepack("cpu", torch.float32)
    assert default_prepack("cpu", torch.bfloat16) == has_native_bf16()
    assert not default_prepack("cuda", torch.float32)
    monkeypatch.setenv("TOKENMILL_CPU_GEMM", "onednn")
    assert default_prepack("cpu", torch.float32)
    monkeypatch.setenv("TOKENMILL_CPU_GEMM", "aten")
    assert not default_prepack("cpu", torch.float32)
    monkeypatch.setenv("TOKENMILL_CPU_GEMM", "mkl")
    with pytest.raises(ValueError, match="TOKENMILL_CPU_GEMM"):
        default_prepack("cpu", torch.float32)


needs_native_bf16 = pytest.mark.skipif(not has_native_bf16(),
                                       reason="no bfloat16 in hardware (AVX512_BF16/AMX)")


@needs_native_bf16
@pytest.mark.parametrize("rows", [1, 3, 8, 32, 300])
def test_bfloat16_matches_f_linear(rows: int) -> None:
    dense = _linear(96, 64, True)
    weight, bias = dense.weight.bfloat16(), dense.bias.bfloat16()
    packed = PrepackedLinear(weight, bias)
    assert torch.equal(packed.weight, weight)
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)).bfloat16()
    # Reference: float32 products of the bfloat16 values, rounded once to bfloat16.
    want = F.linear(x.float(), weight.float(), bias.float())
    got = packed(x)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=1.6e-2, atol=1e-2)


def _tiny(tmp_path, arch: str):
    path, _ = _save_tiny(tmp_path, arch)
    return resolve_model(path)


def _greedy(loaded: LoadedModel, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens by full recomputation (no KV cache; a 2-layer model), and the
    prompt's logits."""
    ids, first = list(prompt), None
    for _ in range(steps):
        logits = tokenmill_logits(loaded, [ids])[0]
        first = logits if first is None else first
        ids.append(int(logits[-1].argmax()))
    return ids[len(prompt):], first


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # untied head; tied head with QKV bias
def test_loaded_model_is_packed_and_agrees(tmp_path, arch: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENMILL_CPU_GEMM", "onednn")  # not the panel kernel of AVX2 CPUs
    resolved = _tiny(tmp_path, arch)
    plain = load_model(resolved, torch.float32, "cpu", TorchAttentionBackend(), prepack=False)
    packed = load_model(resolved, torch.float32, "cpu", TorchAttentionBackend(), prepack=True)
    assert not any(isinstance(m, PrepackedLinear) for m in plain.model.modules())
    layer = packed.model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, PrepackedLinear)
    assert isinstance(layer.mlp.down_proj, PrepackedLinear)
    if arch == "qwen2":  # tied: the head is a packed copy, the embedding stays for lookups
        assert isinstance(packed.model.tied_lm_head, PrepackedLinear)
        assert torch.equal(packed.model.tied_lm_head.weight,
                           packed.model.model.embed_tokens.weight)
    else:
        assert isinstance(packed.model.lm_head, PrepackedLinear)
    prompt = [5, 17, 99, 3, 250, 42, 7]
    want_tokens, want_logits = _greedy(plain, prompt, 12)
    got_tokens, got_logits = _greedy(packed, prompt, 12)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    assert got_tokens == want_tokens


@pytest.mark.skipif(not cpu_kernels.f32_panel_available(), reason="needs AVX2/FMA")
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_float32_panel_model_agrees(tmp_path, arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """float32 layers on tokenmill's panel kernel (auto on AVX2 CPUs without AVX-512;
    ``native`` forces it here): the same greedy tokens as F.linear, and the native stack."""
    monkeypatch.setenv("TOKENMILL_CPU_GEMM", "native")
    resolved = _tiny(tmp_path, arch)
    plain = load_model(resolved, torch.float32, "cpu", TorchAttentionBackend(), prepack=False)
    packed = load_model(resolved, torch.float32, "cpu", TorchAttentionBackend(), prepack=True)
    layer = packed.model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, F32PanelLinear)
    assert isinstance(layer.mlp.down_proj, F32PanelLinear)
    head = packed.model.tied_lm_head if arch == "qwen2" else packed.model.lm_head
    assert isinstance(head, F32PanelLinear)
    assert packed.model.model.native_stack is not None  # every projection is C now
    prompt = [5, 17, 99, 3, 250, 42, 7]
    want_tokens, want_logits = _greedy(plain, prompt, 12)
    got_tokens, got_logits = _greedy(packed, prompt, 12)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    assert got_tokens == want_tokens


@needs_native_bf16
def test_bfloat16_model_is_packed_and_close(tmp_path) -> None:
    resolved = _tiny(tmp_path, "qwen2")
    plain = load_model(resolved, torch.bfloat16, "cpu", TorchAttentionBackend(), prepack=False)
    packed = load_model(resolved, torch.bfloat16, "cpu", TorchAttentionBackend())
    # tokenmill's AMX kernel where the CPU has AMX-BF16 (the tiny sizes are multiples of
    # 32), its AVX512-BF16 kernel where it has that, oneDNN's otherwise.
    head = plain.model.lm_head_weight
    kind = (AmxLinear if amx_usable(head) else Bf16DotLinear if bf16_dot_usable(head)
            else PrepackedLinear)
    assert isinstance(packed.model.model.layers[0].mlp.down_proj, kind)
    assert isinstance(packed.model.tied_lm_head, kind)
    # The loader also moves a bfloat16 CPU model's norms to C kernels, and its SiLU-mul
    # where the model gets the native stack (on tokenmill's kernels), whose per-layer path
    # rounds as it.
    layer = packed.model.model.layers[0]
    assert layer.input_layernorm.native_cpu
    assert layer.mlp.native_cpu_act == (packed.model.model.native_stack is not None)
    assert (packed.model.model.native_stack is not None) == (kind is not PrepackedLinear)
    prompt = [5, 17, 99, 3, 250, 42, 7]
    want = tokenmill_logits(plain, [prompt])[0].float()
    got = tokenmill_logits(packed, [prompt])[0].float()
    assert got.dtype == want.dtype
    # Both round every layer's output to bfloat16, in different summation orders.
    torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)


def test_quantized_layers_stay_quantized(tmp_path) -> None:
    resolved = _tiny(tmp_path, "qwen2")
    loaded = load_model(resolved, torch.float32, "cpu", TorchAttentionBackend(),
                        quantization="int8", prepack=True)
    # Every layer here quantizes (64 and 128 are multiples of 32), the tied head too.
    assert isinstance(loaded.model.tied_lm_head, Int8Linear)
    assert prepack_linears(loaded.model) == 0
