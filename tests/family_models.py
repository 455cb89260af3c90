"""Tiny random transformers models of the added families, shared by several test modules."""

from __future__ import annotations

from typing import Any

import torch

WINDOW = 8
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              rms_norm_eps=1e-5)


def _family(name: str) -> tuple[str, str, dict[str, Any]]:
    """(config class, model class, config kwargs) of a family's tiny model."""
    if name == "qwen3":
        return "Qwen3Config", "Qwen3ForCausalLM", dict(COMMON, head_dim=16,
                                                       tie_word_embeddings=True)
    if name == "gemma3":
        return "Gemma3TextConfig", "Gemma3ForCausalLM", dict(
            COMMON, num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=16,
            sliding_window=WINDOW, rope_local_base_freq=10000.0, rope_theta=1e6,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            final_logit_softcapping=20.0, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    if name == "phi3":
        return "Phi3Config", "Phi3ForCausalLM", dict(
            COMMON, sliding_window=WINDOW, partial_rotary_factor=0.5, pad_token_id=0,
            eos_token_id=2)
    if name == "mistral-window":
        return "MistralConfig", "MistralForCausalLM", dict(COMMON, sliding_window=WINDOW)
    if name == "mixtral":
        return "MixtralConfig", "MixtralForCausalLM", dict(
            COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW)
    if name == "qwen3-moe":
        return "Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
            COMMON, head_dim=16, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
            mlp_only_layers=[0], norm_topk_prob=False)
    raise ValueError(name)


def family_model(name: str, **overrides: Any) -> torch.nn.Module:
    """A tiny float32 transformers model of the family (seeded, eager attention).

    ``overrides`` change the config's keyword arguments.
    """
    import transformers

    config_cls, model_cls, kwargs = _family(name)
    kwargs.update(overrides)
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**kwargs, attn_implementation="eager")
    model = getattr(transformers, model_cls)(config).float().eval()
    with torch.no_grad():
        # Larger random weights give sharper, less tie-prone logits.
        for pname, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.15)
            elif "norm" in pname and name == "gemma3":
                p.normal_(0, 0.1)  # Gemma's norms scale by 1 + weight
    return model


def save_family(tmp_path, name: str, **overrides: Any) -> tuple[str, torch.nn.Module]:
    """Save a family's tiny model with ``save_pretrained``; (directory, the model)."""
    model = family_model(name, **overrides)
    path = tmp_path / name
    model.save_pretrained(path)
    return str(path), model
