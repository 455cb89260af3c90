"""tokenmill's Llama/Mistral/Qwen2 against Hugging Face transformers with the same weights.

Each case builds a tiny random transformers model in float32, saves it with
``save_pretrained`` (safetensors + config.json), loads the directory with
tokenmill's loader and compares logits for two prompts run together in one
step (a mixed batch through the paged cache).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

from tokenmill.attention.base import AttentionMetadata
from tokenmill.attention.torch_backend import TorchAttentionBackend
from tokenmill.config import ModelConfig
from tokenmill.model.llama import (
    LlamaCausalLM,
    MistralCausalLM,
    Qwen2CausalLM,
    WeightLoadError,
)
from tokenmill.model.loader import (
    LoadedModel,
    init_dummy_weights,
    load_model,
    read_hf_config,
    resolve_model,
)
from tokenmill.model.registry import get_model_class, supported_architectures

BLOCK_SIZE = 4
PROMPTS = [[1, 5, 77, 12, 99, 3, 64, 8, 120, 33, 2], [7, 44, 101, 9, 0, 127, 56]]

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

CASES = {
    "llama": (transformers.LlamaConfig, dict(rope_theta=10000.0)),
    "llama-head_dim": (transformers.LlamaConfig, dict(head_dim=24, rope_theta=5e5)),
    "llama-llama3-rope": (
        transformers.LlamaConfig,
        dict(rope_theta=5e5, rope_scaling=LLAMA3_SCALING),
    ),
    "llama-tied-bias": (
        transformers.LlamaConfig,
        dict(tie_word_embeddings=True, attention_bias=True),
    ),
    "mistral": (transformers.MistralConfig, dict(rope_theta=1e6, sliding_window=None)),
    "qwen2": (transformers.Qwen2Config, dict(rope_theta=1e6, tie_word_embeddings=False)),
    "qwen2-tied": (transformers.Qwen2Config, dict(rope_theta=1e6, tie_word_embeddings=True)),
}


# ------------------------------------------------------------------- helpers


def prefill_batch(
    prompts: list[list[int]], block_size: int = BLOCK_SIZE
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, int]:
    """Flattened ids/positions and metadata for whole prompts, one block range each."""
    ids, positions, slots, tables, starts = [], [], [], [], [0]
    next_block = 0
    max_blocks = max(-(-len(p) // block_size) for p in prompts)
    for prompt in prompts:
        nblocks = -(-len(prompt) // block_size)
        table = list(range(next_block, next_block + nblocks))
        next_block += nblocks
        for pos, token in enumerate(prompt):
            ids.append(token)
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        tables.append(table + [0] * (max_blocks - nblocks))
        starts.append(starts[-1] + len(prompt))
    lens = [len(p) for p in prompts]
    meta = AttentionMetadata(
        num_tokens=len(ids),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        max_query_len=max(lens),
        max_seq_len=max(lens),
        query_start_loc_cpu=starts,
        seq_lens_cpu=lens,
    )
    return torch.tensor(ids), torch.tensor(positions), meta, next_block


def empty_kv_caches(config: ModelConfig, num_blocks: int, dtype: torch.dtype) -> list:
    shape = (num_blocks, BLOCK_SIZE, config.num_key_value_heads, config.head_dim)
    return [
        (torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
        for _ in range(config.num_hidden_layers)
    ]


def tokenmill_logits(loaded: LoadedModel, prompts: list[list[int]],
                     dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Per-prompt [len, vocab] float32 logits from one batched prefill step (KV cache in
    ``dtype``, default the head's)."""
    ids, positions, meta, nblocks = prefill_batch(prompts)
    dtype = dtype or loaded.model.lm_head_weight.dtype
    kv = empty_kv_caches(loaded.config, nblocks, dtype)
    with torch.inference_mode():
        hidden = loaded.model(ids, positions, kv, meta)
        logits = loaded.model.compute_logits(hidden)
    starts = meta.query_start_loc_cpu
    return [logits[starts[i] : starts[i + 1]] for i in range(len(prompts))]


def hf_logits(hf_model: torch.nn.Module, prompts: list[list[int]]) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [hf_model(torch.tensor([p])).logits[0].float() for p in prompts]


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights large enough that a wrong rotation or slice shows up in the logits."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        if name.endswith("norm.weight"):
            param.copy_(1.0 + 0.2 * noise)
        else:
            param.copy_(0.15 * noise)


def build_hf_model(case: str, tmp_path: Path, seed: int = 0) -> tuple[torch.nn.Module, Path]:
    config_cls, extra = CASES[case]
    extra = copy.deepcopy(extra)  # transformers edits rope_scaling in place
    hf_config = config_cls(**BASE, **extra, attn_implementation="eager")
    torch.manual_seed(seed)
    model_cls = {
        transformers.LlamaConfig: transformers.LlamaForCausalLM,
        transformers.MistralConfig: transformers.MistralForCausalLM,
        transformers.Qwen2Config: transformers.Qwen2ForCausalLM,
    }[config_cls]
    hf_model = model_cls(hf_config).eval()
    randomize(hf_model, seed)
    out = tmp_path / case
    hf_model.save_pretrained(out)
    return hf_model, out


def load_dir(path: Path, dtype: torch.dtype = torch.float32, fmt: str = "auto") -> LoadedModel:
    return load_model(resolve_model(str(path), fmt), dtype, "cpu", TorchAttentionBackend())


# --------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case: str, tmp_path: Path) -> None:
    hf_model, path = build_hf_model(case, tmp_path)
    loaded = load_dir(path)
    assert loaded.gguf_reader is None
    assert isinstance(loaded.model, get_model_class(loaded.config.architecture))
    ours = tokenmill_logits(loaded, PROMPTS)
    ref = hf_logits(hf_model, PROMPTS)
    for got, want in zip(ours, ref, strict=True):
        assert got.dtype == torch.float32
        assert want.abs().max() > 1.0  # the comparison is not trivially small numbers
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_config_fields_from_transformers5_config(tmp_path: Path) -> None:
    """rope_parameters (transformers 5 layout) must reach rope_theta and rope_scaling."""
    _, path = build_hf_model("llama-llama3-rope", tmp_path)
    assert "rope_parameters" in json.loads((path / "config.json").read_text())
    config = read_hf_config(path)
    assert config.rope_theta == 5e5
    assert config.rope_scaling_dict == LLAMA3_SCALING
    assert config.head_dim == 16


def test_old_style_config_and_generation_eos(tmp_path: Path) -> None:
    """Top-level rope_theta/rope_scaling (pre-5 configs) and eos from generation_config."""
    hf_model, path = build_hf_model("llama-llama3-rope", tmp_path)
    old = ModelConfig.from_hf_dict(json.loads((path / "config.json").read_text()))
    old = ModelConfig(**{**old.__dict__, "rope_theta": 5e5,
                         "rope_scaling": tuple(sorted(LLAMA3_SCALING.items()))})
    (path / "config.json").write_text(json.dumps(old.to_hf_dict()))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    loaded = load_dir(path)
    assert loaded.config.eos_token_ids == (2, 7)
    torch.testing.assert_close(
        tokenmill_logits(loaded, PROMPTS[:1])[0], hf_logits(hf_model, PROMPTS[:1])[0],
        atol=1e-4, rtol=1e-4,
    )


def test_sharded_checkpoint_with_index(tmp_path: Path) -> None:
    hf_model, path = build_hf_model("qwen2", tmp_path)
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    (path / "model.safetensors").unlink()
    names = sorted(state)
    halves = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in halves.items():
        save_file({k: state[k] for k in keys}, str(path / file))
        weight_map.update({k: file for k in keys})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = load_dir(path)
    torch.testing.assert_close(
        tokenmill_logits(loaded, PROMPTS)[1], hf_logits(hf_model, PROMPTS)[1],
        atol=1e-4, rtol=1e-4,
    )
    # A shard named by the index but absent is reported by name.
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_dir(path)


def test_bfloat16_close_to_float32(tmp_path: Path) -> None:
    _, path = build_hf_model("llama", tmp_path)
    fp32 = tokenmill_logits(load_dir(path), PROMPTS)
    bf16_model = load_dir(path, torch.bfloat16)
    assert bf16_model.model.lm_head_weight.dtype == torch.bfloat16
    bf16 = tokenmill_logits(bf16_model, PROMPTS)
    for low, high in zip(bf16, fp32, strict=True):
        assert low.dtype == torch.float32
        scale = high.abs().max()
        assert (low - high).abs().max() < 0.05 * scale
        assert (low.argmax(-1) == high.argmax(-1)).float().mean() >= 0.8


def test_fused_parameters_hold_the_projections(tmp_path: Path) -> None:
    hf_model, path = build_hf_model("qwen2", tmp_path)
    model = load_dir(path).model
    attn = model.model.layers[1].self_attn
    hf_attn = hf_model.model.layers[1].self_attn
    q, kv = attn.q_size, attn.kv_size
    assert torch.equal(attn.qkv_proj.weight[:q], hf_attn.q_proj.weight)
    assert torch.equal(attn.qkv_proj.weight[q + kv :], hf_attn.v_proj.weight)
    assert torch.equal(attn.qkv_proj.bias[q : q + kv], hf_attn.k_proj.bias)
    assert attn.o_proj.bias is None
    mlp, hf_mlp = model.model.layers[1].mlp, hf_model.model.layers[1].mlp
    inter = hf_mlp.up_proj.weight.shape[0]
    assert torch.equal(mlp.gate_up_proj.weight[inter:], hf_mlp.up_proj.weight)


def test_dummy_weights(tmp_path: Path) -> None:
    _, path = build_hf_model("llama", tmp_path)
    resolved = resolve_model(str(path), "dummy")
    assert resolved.format == "dummy"
    loaded = load_model(resolved, torch.float32, "cpu", TorchAttentionBackend())
    layer = loaded.model.model.layers[0]
    assert torch.equal(layer.input_layernorm.weight, torch.ones(64))
    std = layer.mlp.gate_up_proj.weight.std().item()
    assert 0.015 < std < 0.025
    logits = tokenmill_logits(loaded, PROMPTS)[0]
    assert torch.isfinite(logits).all()
    # Same seed, same weights: dummy runs are reproducible.
    other = LlamaCausalLM(loaded.config, TorchAttentionBackend())
    init_dummy_weights(other)
    assert torch.equal(other.model.embed_tokens.weight, loaded.model.model.embed_tokens.weight)


# ------------------------------------------------------------------- errors


def test_registry() -> None:
    assert supported_architectures() == [
        "Gemma3ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM",
        "Phi3ForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"]
    assert get_model_class("MistralForCausalLM") is MistralCausalLM
    assert get_model_class("Qwen2ForCausalLM") is Qwen2CausalLM
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        get_model_class("GPT2LMHeadModel")


def test_unknown_architecture_names_the_file(tmp_path: Path) -> None:
    _, path = build_hf_model("llama", tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json.*GPT2LMHeadModel"):
        load_dir(path)


def test_missing_files(tmp_path: Path) -> None:
    _, path = build_hf_model("llama", tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nowhere"))
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        resolve_model(str(path))
    assert resolve_model(str(path / "config.json"), "dummy").format == "dummy"
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        resolve_model(str(path), "dummy")
    with pytest.raises(ValueError, match="load_format"):
        resolve_model(str(path), "pickle")


def _rewrite_weights(path: Path, edit) -> None:
    from safetensors.torch import load_file

    state = load_file(str(path / "model.safetensors"))
    edit(state)
    save_file(state, str(path / "model.safetensors"))


def test_missing_tensor_names_file_and_tensor(tmp_path: Path) -> None:
    _, path = build_hf_model("llama", tmp_path)
    _rewrite_weights(path, lambda s: s.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(WeightLoadError, match=rf"{path}.*model\.layers\.1\.self_attn\.k_proj"):
        load_dir(path)


def test_wrong_shape_names_file_and_tensor(tmp_path: Path) -> None:
    _, path = build_hf_model("llama", tmp_path)

    def shrink(state: dict) -> None:
        state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(95, 64)

    _rewrite_weights(path, shrink)
    with pytest.raises(
        WeightLoadError,
        match=r"model\.safetensors.*model\.layers\.0\.mlp\.up_proj\.weight.*\(95, 64\)",
    ):
        load_dir(path)


def test_unknown_tensor_names_file_and_tensor(tmp_path: Path) -> None:
    _, path = build_hf_model("llama", tmp_path)
    _rewrite_weights(path, lambda s: s.update({"model.layers.0.mlp.extra.weight": torch.ones(2)}))
    with pytest.raises(
        WeightLoadError, match=r"model\.safetensors.*unexpected tensor.*mlp\.extra\.weight"
    ):
        load_dir(path)
