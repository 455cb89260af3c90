"""GGUF files of the added architectures, written here with gguf.GGUFWriter.

Each file holds a tiny transformers model's weights under llama.cpp's names and
conventions, spelled out here independently of tokenmill's loader: the
``qwen3``, ``qwen3moe``, ``gemma3`` (norms stored as 1 + weight, a per-layer
sliding pattern), ``phi3`` (fused attn_qkv and gate/up in ffn_up, LongRoPE
factor tensors, partial rotary) and ``llama`` with experts (Mixtral: permuted
Q/K rows; experts stacked per projection, or one tensor per expert as older
files have them). Loading must give the logits of the transformers model.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from family_models import family_model
from gguf import GGMLQuantizationType as Q
from gguf import quants
from test_model_gguf import llama_cpp_row_order, prefill_logits

from tokenmill.attention.torch_backend import TorchAttentionBackend
from tokenmill.model.loader import load_model, resolve_model

IDS = [1, 40, 7, 88, 13, 2, 61, 95, 30, 5, 17, 200, 9, 4]  # 14 tokens: past window 8

# Per-layer HF module -> llama.cpp block tensor, by GGUF architecture.
_COMMON = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm", "mlp.gate": "ffn_gate_inp",
}
_NAMES = {
    "qwen3": _COMMON,
    "qwen3moe": _COMMON,
    "llama": _COMMON,
    "gemma3": {**_COMMON, "post_attention_layernorm": "post_attention_norm",
               "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm"},
    "phi3": {**_COMMON, "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"},
}
GGUF_ARCH = {"qwen3": "qwen3", "qwen3-moe": "qwen3moe", "gemma3": "gemma3", "phi3": "phi3",
             "mixtral": "llama", "mixtral-per-expert": "llama"}


def gguf_tensors(arch: str, model: torch.nn.Module, per_expert: bool = False
                 ) -> dict[str, np.ndarray]:
    """llama.cpp-named float32 arrays for the model's state dict."""
    cfg = model.config
    out: dict[str, np.ndarray] = {}
    for hf_name, tensor in model.state_dict().items():
        w = tensor.float().numpy()
        if hf_name == "model.embed_tokens.weight":
            out["token_embd.weight"] = w
            continue
        if hf_name == "model.norm.weight":
            out["output_norm.weight"] = w + (1.0 if arch == "gemma3" else 0.0)
            continue
        if hf_name == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                out["output.weight"] = w
            continue
        _, _, layer, rest = hf_name.split(".", 3)
        module, _, kind = rest.rpartition(".")
        blk = f"blk.{layer}"
        if rest == "mlp.experts.gate_up_proj":  # [E, 2I, H]: gate rows then up rows
            inter = w.shape[1] // 2
            parts = {"ffn_gate": w[:, :inter], "ffn_up": w[:, inter:]}
        elif rest == "mlp.experts.down_proj":
            parts = {"ffn_down": w}
        else:
            parts = None
        if parts is not None:
            for part, stacked in parts.items():
                if per_expert:
                    for e in range(stacked.shape[0]):
                        out[f"{blk}.{part}.{e}.weight"] = np.ascontiguousarray(stacked[e])
                else:
                    out[f"{blk}.{part}_exps.weight"] = np.ascontiguousarray(stacked)
            continue
        name = f"{blk}.{_NAMES[arch][module]}.{kind}"
        if arch == "gemma3" and module.endswith("norm"):
            w = w + 1.0  # the converter stores 1 + weight
        if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
            heads = cfg.num_attention_heads if "q_proj" in module else cfg.num_key_value_heads
            w = w[llama_cpp_row_order(w.shape[0], heads)]
        out[name] = np.ascontiguousarray(w)
    return out


def write_family_gguf(path: Path, family: str, model: torch.nn.Module) -> None:
    arch = GGUF_ARCH[family]
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = cfg.rope_parameters
    rope = rope.get("full_attention", rope)
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    extra: dict[str, np.ndarray] = {}
    if family == "gemma3":
        writer.add_sliding_window(cfg.sliding_window)
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if family == "phi3":
        writer.add_sliding_window(cfg.sliding_window)
        writer.add_rope_dimension_count(int(head_dim * rope["partial_rotary_factor"]))
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        factor = cfg.max_position_embeddings / rope["original_max_position_embeddings"]
        assert factor > 1
        writer.add_rope_scaling_attn_factors(
            float(np.sqrt(1 + np.log(factor) / np.log(rope["original_max_position_embeddings"]))))
        extra["rope_factors_long.weight"] = np.array(rope["long_factor"], dtype=np.float32)
        extra["rope_factors_short.weight"] = np.array(rope["short_factor"], dtype=np.float32)
    if family.startswith("mixtral"):
        writer.add_expert_count(cfg.num_local_experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
    if family == "qwen3-moe":
        writer.add_expert_count(cfg.num_experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
        writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        writer.add_expert_weights_norm(cfg.norm_topk_prob)
    tensors = gguf_tensors(arch, model, per_expert=family == "mixtral-per-expert")
    for name, data in {**tensors, **extra}.items():
        if name == "blk.0.attn_v.weight":  # one quantized tensor: dequantized on load
            data = quants.dequantize(quants.quantize(data, Q.Q8_0), Q.Q8_0)
        writer.add_tensor(name, data.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


PHI3_LONGROPE = dict(
    max_position_embeddings=64, original_max_position_embeddings=8,
    # One factor per rotated frequency: head_dim 16 x partial 0.5 / 2.
    rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.2, 2.0, 3.0],
                  "long_factor": [1.0, 2.0, 4.0, 9.0], "original_max_position_embeddings": 8},
)


@pytest.mark.parametrize("family", list(GGUF_ARCH))
def test_family_gguf_matches_transformers(family: str, tmp_path: Path) -> None:
    overrides = {}
    if family == "phi3":
        # 14 tokens > original 8: transformers uses the long factors, as an engine with
        # max_model_len 64 > 8 always does.
        overrides = dict(PHI3_LONGROPE)
    if family == "qwen3-moe":
        overrides = dict(norm_topk_prob=True, mlp_only_layers=[])
    base = "mixtral" if family.startswith("mixtral") else family
    if base == "mixtral":
        overrides = dict(sliding_window=None)  # llama-architecture files carry no window
    model = family_model(base, **overrides)
    if family == "qwen3-moe":
        # The GGUF keeps no "dense layer" list: llama.cpp derives it from the router tensors.
        assert not model.config.mlp_only_layers
    path = tmp_path / f"{family}.gguf"
    write_family_gguf(path, family, model)
    # The reference holds the values the file encodes (attn_v went through Q8_0).
    v = model.model.layers[0].self_attn
    if hasattr(v, "v_proj"):
        with torch.no_grad():
            w = v.v_proj.weight.numpy()
            v.v_proj.weight.copy_(torch.from_numpy(quants.dequantize(quants.quantize(w, Q.Q8_0),
                                                                     Q.Q8_0)))
    loaded = load_model(resolve_model(str(path)), torch.float32, "cpu", TorchAttentionBackend())
    cfg = loaded.config
    want_arch = {"qwen3": "Qwen3ForCausalLM", "qwen3-moe": "Qwen3MoeForCausalLM",
                 "gemma3": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM"}.get(
                     family, "MixtralForCausalLM")
    assert cfg.architecture == want_arch
    if family == "gemma3":
        assert cfg.layer_types == tuple(model.config.layer_types)
        assert cfg.final_logit_softcapping == 20.0 and cfg.sliding_window == 8
    if family == "phi3":
        scaling = cfg.rope_scaling_dict
        assert cfg.rotary_dim == 8 and scaling["rope_type"] == "longrope"
        assert scaling["original_max_position_embeddings"] == 8
        assert loaded.model.model.rotary.attention_factor == pytest.approx(2**0.5)
    if cfg.is_moe:
        assert cfg.num_experts in (4, 6) and cfg.num_experts_per_tok == 2
    with torch.inference_mode():
        want = model(torch.tensor([IDS])).logits[0].float()
    got = prefill_logits(loaded, IDS)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_unsupported_gguf_architecture_is_named(tmp_path: Path) -> None:
    path = tmp_path / "falcon.gguf"
    writer = gguf.GGUFWriter(str(path), "falcon")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'falcon'.*gemma3"):
        load_model(resolve_model(str(path)), torch.float32, "cpu", TorchAttentionBackend())
