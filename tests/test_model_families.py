"""The added families at the model level, against transformers with the same weights.

Logits of one batched prefill step (prompts longer than the sliding window)
match transformers in float32 for Qwen3, Gemma 3 (with soft-capping and
linear RoPE on its global layers), Phi-3 (partial rotary, sliding window,
LongRoPE short and long factors), Mixtral and Qwen3-MoE. Also: config parsing
of both config layouts, the errors that name an unsupported architecture or
feature, and the mixture-of-experts paths (grouped, per token, quantized).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from family_models import WINDOW, family_model, save_family
from test_model_arch import hf_logits, load_dir, tokenmill_logits

from tokenmill.config import ModelConfig
from tokenmill.model.layers import uses_long_rope_factors
from tokenmill.model.moe import MoEBlock

PROMPTS = [[1, 5, 77, 12, 99, 3, 64, 8, 120, 33, 2, 17, 250, 9, 31, 46, 7],
           [7, 44, 101, 9, 0, 127, 56, 200, 13, 3, 18]]  # both longer than WINDOW

CASES = {
    "qwen3": {},
    "gemma3": {},
    "gemma3-linear-rope": dict(rope_scaling={"rope_type": "linear", "factor": 8.0}),
    "phi3": {},
    # Both prompts longer than the original 10: transformers switches to the long
    # factors, as the engine does for any max_model_len > 10 (here 64).
    "phi3-longrope": dict(max_position_embeddings=64, original_max_position_embeddings=10,
                          rope_scaling={"rope_type": "longrope",
                                        "short_factor": [1.0, 1.5, 2.0, 3.0],
                                        "long_factor": [1.0, 2.0, 5.0, 9.0]}),
    "mistral-window": {},
    "mixtral": {},
    "qwen3-moe": {},
    "qwen3-moe-norm": dict(norm_topk_prob=True, decoder_sparse_step=2, mlp_only_layers=[]),
}


def _build(case: str, tmp_path: Path):
    family = case.split("-linear")[0].split("-longrope")[0].replace("-norm", "")
    return save_family(tmp_path, family, **CASES[case])


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case: str, tmp_path: Path) -> None:
    path, hf_model = _build(case, tmp_path)
    loaded = load_dir(Path(path))
    ours = tokenmill_logits(loaded, PROMPTS)
    ref = hf_logits(hf_model, PROMPTS)
    for got, want in zip(ours, ref, strict=True):
        assert want.abs().max() > 1.0
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_parsed_configs(tmp_path: Path) -> None:
    gemma = load_dir(Path(_build("gemma3", tmp_path)[0])).config
    assert gemma.qk_norm and gemma.sliding_window == WINDOW
    assert [gemma.layer_window(i) for i in range(3)] == [WINDOW, None, WINDOW]
    assert gemma.kv_window is None  # a global layer keeps every block
    assert gemma.rope_theta == 1e6 and gemma.rope_local_theta == 10000.0
    assert gemma.attention_scale == 16**-0.5 and gemma.final_logit_softcapping == 20.0
    assert gemma.hidden_act == "gelu_pytorch_tanh" and gemma.tie_word_embeddings
    phi = load_dir(Path(_build("phi3", tmp_path)[0])).config
    assert phi.rotary_dim == 8 and phi.kv_window == WINDOW
    moe = load_dir(Path(_build("qwen3-moe-norm", tmp_path)[0])).config
    assert (moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size) == (6, 2, 32)
    assert moe.dense_layers == (0,) and moe.norm_topk_prob  # sparse step 2: layer 1 only
    mixtral = load_dir(Path(_build("mixtral", tmp_path)[0])).config
    assert mixtral.num_experts == 4 and mixtral.moe_intermediate_size == 128
    for cfg in (gemma, phi, moe, mixtral):
        assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_gemma3_published_config_layout() -> None:
    """google/gemma-3-*'s config.json: rope_local_base_freq and sliding_window_pattern."""
    published = {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048,
        "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1,
        "head_dim": 256, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
        "sliding_window": 512, "sliding_window_pattern": 6, "query_pre_attn_scalar": 256,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
    }
    cfg = ModelConfig.from_hf_dict(published)
    assert [i for i in range(18) if cfg.layer_window(i) is None] == [5, 11, 17]
    assert cfg.rope_scaling_dict == {"rope_type": "linear", "factor": 8.0}
    assert cfg.rope_local_theta == 10000.0 and cfg.tie_word_embeddings


def test_qwen_sliding_window_only_from_max_window_layers() -> None:
    base = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 4, "num_attention_heads": 2,
            "sliding_window": 32, "max_window_layers": 2}
    assert ModelConfig.from_hf_dict(base).sliding_window is None  # use_sliding_window off
    cfg = ModelConfig.from_hf_dict({**base, "use_sliding_window": True})
    assert [cfg.layer_window(i) for i in range(4)] == [None, None, 32, 32]
    mistral = ModelConfig.from_hf_dict({**base, "architectures": ["MistralForCausalLM"]})
    assert mistral.kv_window == 32  # Mistral slides on every layer


@pytest.mark.parametrize("edit,message", [
    ({"architectures": ["FalconForCausalLM"]}, "unsupported architecture 'FalconForCausalLM'"),
    ({"architectures": ["Gemma3ForConditionalGeneration"]}, "multimodal"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     "Qwen3ForCausalLM uses rope_scaling type 'yarn'"),
    ({"hidden_act": "relu"}, "unsupported activation 'relu'"),
])
def test_unsupported_features_are_named(edit: dict, message: str) -> None:
    cfg = {"architectures": ["Qwen3ForCausalLM"], "vocab_size": 10, "hidden_size": 8,
           "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, **edit}
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_dict(cfg, source="x/config.json")


def test_gemma3_attention_softcapping_is_refused() -> None:
    cfg = {"architectures": ["Gemma3ForCausalLM"], "vocab_size": 10, "hidden_size": 8,
           "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
           "attn_logit_softcapping": 50.0}
    with pytest.raises(ValueError, match="Gemma3ForCausalLM with attn_logit_softcapping"):
        ModelConfig.from_hf_dict(cfg)


def test_longrope_factor_set_is_fixed_by_max_model_len(tmp_path: Path) -> None:
    """Short factors while the engine never serves past the original length (transformers
    agrees for those sequences); long ones otherwise."""
    path, hf_model = _build("phi3-longrope", tmp_path)
    scaling = load_dir(Path(path)).config.rope_scaling_dict
    assert not uses_long_rope_factors(scaling, 10) and uses_long_rope_factors(scaling, 11)
    from tokenmill.attention.torch_backend import TorchAttentionBackend
    from tokenmill.model.loader import LoadedModel, load_model, resolve_model

    short = load_model(resolve_model(path), torch.float32, "cpu", TorchAttentionBackend(),
                       max_model_len=10)
    prompts = [p[:10] for p in PROMPTS]  # within the original length: short factors in HF too
    ours = tokenmill_logits(LoadedModel(short.config, short.model), prompts)
    for got, want in zip(ours, hf_logits(hf_model, prompts), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------- mixture of experts


def _moe_block(tmp_path: Path, family: str = "mixtral") -> MoEBlock:
    path, _ = save_family(tmp_path, family)
    model = load_dir(Path(path)).model
    return next(m for m in model.modules() if isinstance(m, MoEBlock))


def test_grouped_experts_equal_per_token(tmp_path: Path) -> None:
    block = _moe_block(tmp_path)
    x = torch.randn(37, 64, generator=torch.Generator().manual_seed(0))
    weights, ids = block.route(x)
    grouped = block.forward_grouped(x, weights, ids)
    per_token = block.forward_per_token(x, weights, ids)
    torch.testing.assert_close(grouped, per_token, atol=1e-5, rtol=1e-5)  # summation order
    assert torch.allclose(weights.sum(-1), torch.ones(37))  # Mixtral renormalises


def test_qwen3_moe_routing_without_renormalisation(tmp_path: Path) -> None:
    block = _moe_block(tmp_path, "qwen3-moe")  # norm_topk_prob False
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    weights, ids = block.route(x)
    probs = torch.softmax(torch.nn.functional.linear(x, block.router_weight), -1)
    torch.testing.assert_close(weights, probs.gather(1, ids))
    assert (weights.sum(-1) < 1).all()


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_experts(tmp_path: Path, method: str) -> None:
    """Every expert matrix is quantized (the router is not); a quantized block computes
    what a dense block holding the dequantized weights does, up to the kernels' 8-bit
    input rounding; int8 logits stay close to float32."""
    import copy

    from tokenmill.model.quantization import (
        dequantize_int4,
        dequantize_int8,
        quantize_int4,
        quantize_int8,
        quantize_model,
    )

    path, _ = save_family(tmp_path, "qwen3-moe")
    loaded = load_dir(Path(path))
    dense_logits = tokenmill_logits(loaded, PROMPTS)
    block = next(m for m in loaded.model.modules() if isinstance(m, MoEBlock))
    reference = copy.deepcopy(block)
    with torch.no_grad():
        for w in (reference.w13, reference.w2):
            for e in range(w.shape[0]):
                w[e] = (dequantize_int4(*quantize_int4(w[e])) if method == "int4"
                        else dequantize_int8(*quantize_int8(w[e])))
    router = {n: p.clone() for n, p in loaded.model.named_parameters() if "router" in n}
    replaced = quantize_model(loaded.model, method)
    blocks = [m for m in loaded.model.modules() if isinstance(m, MoEBlock)]
    assert blocks and all(b.quantized is not None and b.w13 is None for b in blocks)
    assert replaced >= 2 * 6 * len(blocks)
    for name, param in loaded.model.named_parameters():
        if "router" in name:
            assert torch.equal(param, router[name])  # the router stays dense
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(2))
    weights, ids = block.route(x)
    got = block.forward_grouped(x, weights, ids)
    want = reference.forward_grouped(x, weights, ids)
    assert (got - want).abs().max() < 0.03 * want.abs().max()
    if method == "int8":
        quantized = tokenmill_logits(loaded, PROMPTS, dtype=torch.float32)
        for q, d in zip(quantized, dense_logits, strict=True):
            assert (q - d).abs().max() < 0.05 * d.abs().max()


def test_moe_dummy_weights_and_json_round_trip(tmp_path: Path) -> None:
    """A config.json alone gives a runnable MoE model (benchmarks use this)."""
    from tokenmill.attention.torch_backend import TorchAttentionBackend
    from tokenmill.model.loader import load_model, resolve_model

    model = family_model("mixtral")
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    loaded = load_model(resolve_model(str(tmp_path), "dummy"), torch.float32, "cpu",
                        TorchAttentionBackend())
    assert torch.isfinite(tokenmill_logits(loaded, PROMPTS)[0]).all()
