"""Weight-only int4: codes, the packed CPU matmul, the model swap, and SmolLM2 vs float32."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokenmill.model.layers import Linear
from tokenmill.model.quantization import (
    Int4Linear,
    Int8Linear,
    check_quantization,
    dequantize_int4,
    dequantize_int8,
    dequantize_q4_1,
    q4_1_scales,
    quantize_int4,
    quantize_int8,
    quantize_model,
    round_to_q8,
)


def _q4_1_style(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight exactly of the form d * q + m per group of 32, with q spanning 0..15."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    codes.view(n, k // 32, 32)[..., 0] = 0  # every group reaches both ends
    codes.view(n, k // 32, 32)[..., 1] = 15
    d = torch.rand(n, k // 32, generator=g) * 0.02 + 0.001
    m = torch.randn(n, k // 32, generator=g) * 0.05
    weight = (codes.view(n, k // 32, 32).float() * d[..., None] + m[..., None]).view(n, k)
    return weight, codes


def test_quantize_recovers_q4_1_codes_exactly():
    weight, codes = _q4_1_style(64, 128)
    got, scales, zeros = quantize_int4(weight)
    assert torch.equal(got, codes)
    torch.testing.assert_close(dequantize_int4(got, scales, zeros), weight, rtol=0, atol=1e-6)


def test_quantize_error_is_bounded_by_half_a_step():
    weight = torch.randn(32, 96, generator=torch.Generator().manual_seed(1))
    codes, scales, zeros = quantize_int4(weight)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15
    err = (dequantize_int4(codes, scales, zeros) - weight).abs().view(32, 3, 32)
    assert bool((err <= scales[..., None] / 2 + 1e-6).all())


def test_constant_group_is_exact():
    weight = torch.full((8, 32), 0.25)
    codes, scales, zeros = quantize_int4(weight)
    torch.testing.assert_close(dequantize_int4(codes, scales, zeros), weight)


def test_group_size_must_divide_in_features():
    with pytest.raises(ValueError, match="multiple of the group size"):
        quantize_int4(torch.randn(4, 40))


def _native_available() -> bool:
    from tokenmill.kernels import cpu

    return cpu.cpu_kernels() is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 33])
@pytest.mark.parametrize("kernel", ["native", "torch"])
def test_int4_linear_matches_dense_dequantized(dtype, rows, kernel):
    if kernel == "native" and not _native_available():
        pytest.skip("no C compiler for the native kernels")
    weight, _ = _q4_1_style(96, 160, seed=2)
    bias = torch.randn(96)
    layer = Int4Linear(weight, bias, kernel=kernel)
    layer.dense_min_rows = 0  # the integer path (the dense one: test_dequant_matmul.py)
    x = torch.randn(rows, 160, generator=torch.Generator().manual_seed(3)).to(dtype)
    codes, scales, zeros = quantize_int4(weight)
    if kernel == "native":
        # Exact codes, half-precision d and m; the input rounded to 8 bits per group.
        w_ref = dequantize_q4_1(codes, *q4_1_scales(scales, zeros))
        expected = F.linear(round_to_q8(x.float()), w_ref) + bias
        tol = 1e-4 if dtype == torch.float32 else 6e-2  # + bf16 output rounding
    else:
        # The PyTorch kernel rounds its input and scales to bfloat16.
        w_ref = dequantize_int4(codes, scales.bfloat16().float(), zeros.bfloat16().float())
        expected = F.linear(x.bfloat16().float(), w_ref) + bias
        tol = 2e-2 if dtype == torch.float32 else 6e-2
    got = layer(x)
    assert got.dtype == dtype and got.shape == (rows, 96)
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)
    # and a close approximation of the dense layer itself
    dense = F.linear(x.float(), weight, bias)
    assert float((got.float() - dense).norm() / dense.norm()) < 0.03


def test_int4_linear_keeps_leading_dims():
    layer = Int4Linear(torch.randn(64, 64))
    assert layer(torch.randn(2, 3, 64)).shape == (2, 3, 64)


def test_round_to_q8_matches_the_q8_grid():
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(7))
    r = round_to_q8(x).view(3, 2, 32)
    scale = x.view(3, 2, 32).abs().amax(-1, keepdim=True) / 127
    steps = r / scale
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)
    assert float((r - x.view(3, 2, 32)).abs().max()) <= float(scale.max()) / 2 + 1e-6


def test_quantize_int8_recovers_q8_0_codes_exactly():
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(-127, 128, (16, 64), generator=g).to(torch.int8)
    codes.view(16, 2, 32)[..., 0] = 127  # Q8_0: the largest magnitude maps to +-127
    scales = torch.rand(16, 2, generator=g) * 0.01 + 1e-4
    weight = dequantize_int8(codes, scales)
    got, got_scales = quantize_int8(weight)
    assert torch.equal(got, codes)
    torch.testing.assert_close(got_scales, scales, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kernel", ["panels", "native", "fallback"])
@pytest.mark.parametrize("rows", [1, 5, 70])
def test_int8_linear_matches_dense_dequantized(monkeypatch, kernel, rows):
    from tokenmill.kernels import cpu

    if kernel != "fallback" and cpu.cpu_kernels() is None:
        pytest.skip("no C compiler for the native kernels")
    if kernel == "panels" and not cpu.int8_panels_available():
        pytest.skip("the int8 panel kernel needs AVX512-VNNI")
    if kernel == "fallback":
        monkeypatch.setattr(cpu, "int8_matmul", lambda *a: None)
    weight = torch.randn(80, 96, generator=torch.Generator().manual_seed(5))
    bias = torch.randn(80)
    layer = Int8Linear(weight, bias, kernel="panels" if kernel == "panels" else "native")
    layer.dense_min_rows = 0  # the integer path (the dense one: test_dequant_matmul.py)
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(6))
    expected = F.linear(round_to_q8(x), dequantize_int8(*quantize_int8(weight)), bias)
    got = layer(x)
    assert got.shape == (rows, 80) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # and a close approximation of the dense layer itself (8-bit rounding noise only)
    dense = F.linear(x, weight, bias)
    assert float((got - dense).norm() / dense.norm()) < 0.01


def _dummy_model(architecture: str, num_layers: int, **config):
    """A small dummy-weight model (hidden 64, intermediate 96: every linear quantizable)."""
    from tokenmill.attention.torch_backend import TorchAttentionBackend
    from tokenmill.config import ModelConfig
    from tokenmill.model.llama import LlamaCausalLM
    from tokenmill.model.loader import init_dummy_weights

    cfg = ModelConfig(architecture=architecture, vocab_size=128, hidden_size=64,
                      intermediate_size=96, num_hidden_layers=num_layers, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, **config)
    model = LlamaCausalLM(cfg, TorchAttentionBackend(), torch.float32, "cpu")
    init_dummy_weights(model)
    return model


def test_quantize_model_swaps_linears_and_ties_head():
    model = _dummy_model("LlamaForCausalLM", 2, tie_word_embeddings=True)
    hidden = torch.randn(3, 64)
    dense_logits = model.compute_logits(hidden)
    # 2 layers x (qkv, o, gate_up, down) + the tied head (8-bit).
    assert quantize_model(model, "int4") == 2 * 4 + 1
    assert not any(isinstance(m, Linear) for m in model.modules())
    assert isinstance(model.model.layers[0].mlp.down_proj, Int4Linear)
    assert isinstance(model.tied_lm_head, Int8Linear)
    assert model.model.embed_tokens.weight.dtype == torch.float32  # lookups stay dense
    logits = model.compute_logits(hidden)
    assert logits.dtype == torch.float32
    cos = F.cosine_similarity(logits, dense_logits, dim=-1)
    assert bool((cos > 0.99).all())


def test_quantize_model_untied_head_gets_8_bits():
    model = _dummy_model("Qwen2ForCausalLM", 1, attention_bias=True)
    assert quantize_model(model, "int8") == 4 + 1
    assert isinstance(model.lm_head, Int8Linear)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, Int8Linear)
    assert model.model.layers[0].self_attn.qkv_proj.bias is not None


def test_check_quantization_rejects_unknown_and_gpu():
    check_quantization(None, torch.device("cpu"))
    check_quantization("int4", torch.device("cpu"))
    check_quantization("int8", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown quantization"):
        check_quantization("int3", torch.device("cpu"))
    with pytest.raises(ValueError, match="CPU only"):
        check_quantization("int4", torch.device("cuda"))


# ------------------------------------------------------------------ SmolLM2 (real GGUF)


def _raw_q4_1_codes(tensor) -> np.ndarray:
    """Codes 0..15 of a Q4_1 tensor straight from its blocks (d, m: fp16; 16 nibble bytes)."""
    blocks = np.asarray(tensor.data).reshape(-1, 20)
    qs = blocks[:, 4:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=1)  # element j, then j + 16
    rows = tensor.data.shape[0]
    return codes.reshape(rows, -1).astype(np.int32)


@pytest.mark.slow
def test_smollm2_int4_keeps_the_gguf_codes():
    from tokenmill.model.gguf_loader import dequantize_tensor, open_gguf
    from tokenmill.model.loader import default_model_path

    reader = open_gguf(default_model_path())
    tensor = next(t for t in reader.tensors if t.name == "blk.3.ffn_down.weight")
    assert tensor.tensor_type.name == "Q4_1"
    dense = torch.from_numpy(dequantize_tensor(tensor))
    codes, _, _ = quantize_int4(dense)
    assert np.array_equal(codes.numpy(), _raw_q4_1_codes(tensor))


@pytest.mark.slow
def test_smollm2_int8_head_keeps_the_gguf_q8_0_codes():
    from tokenmill.model.gguf_loader import dequantize_tensor, open_gguf
    from tokenmill.model.loader import default_model_path

    reader = open_gguf(default_model_path())
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert tensor.tensor_type.name == "Q8_0"
    rows = np.asarray(tensor.data)[:64]  # [rows, blocks * 34]: fp16 d, then 32 int8 codes
    blocks = rows.reshape(64, -1, 34)
    raw_codes = blocks[..., 2:].view(np.int8).reshape(64, -1)
    dense = torch.from_numpy(dequantize_tensor(tensor)[:64])
    codes, _ = quantize_int8(dense)
    assert np.array_equal(codes.numpy(), raw_codes)


@pytest.mark.slow
def test_smollm2_quantized_close_to_float32_teacher_forced():
    """Teacher-forced next-token logprobs of int4 / int8 vs float32 on the same text."""
    from tokenmill import LLM, SamplingParams

    text = ("The river runs past the old mill, and the miller counts the sacks of grain "
            "that the farmers bring in autumn. Each sack is weighed, written down and "
            "stored in the loft until the winter market opens in the town.")
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1)
    results = {}
    for quant in (None, "int4", "int8"):
        llm = LLM(quantization=quant, num_threads=2)
        out = llm.generate([text], params, use_tqdm=False)[0]
        ids = out.prompt_token_ids
        entries = out.prompt_logprobs[1:]
        results[quant] = (ids, entries)
        del llm
    ids, ref = results[None]
    nll_ref = -sum(e.logprob for e in ref) / len(ref)
    # int4: the file's own codes, Q8_0 head, matmul inputs rounded to 8 bits; int8
    # re-rounds the Q4_1 layers onto a symmetric 8-bit grid. Both stay close to float32.
    for quant, bound in (("int4", 0.1), ("int8", 0.1)):
        _, got = results[quant]
        deltas = [abs(a.logprob - b.logprob) for a, b in zip(ref, got)]
        assert len(deltas) == len(ids) - 1 > 30
        mean_delta = sum(deltas) / len(deltas)
        assert mean_delta < bound, (quant, mean_delta)
        nll = -sum(e.logprob for e in got) / len(got)
        assert abs(math.exp(nll) / math.exp(nll_ref) - 1) < 0.03, quant
