"""Read a llama.cpp GGUF file as a tokenmill model: config, names and float weights.

Architectures: ``llama`` (Llama, and Mixtral when the file has experts),
``qwen2``, ``qwen3``, ``qwen3moe``, ``gemma3`` and ``phi3``; anything else is
refused with a message naming the architecture.

A GGUF file carries the hyper-parameters as ``<arch>.*`` metadata keys and
the tensors under llama.cpp's names (``blk.N.attn_q.weight``), possibly
block-quantized. This module turns the metadata into a :class:`ModelConfig`,
renames tensors to Hugging Face names and dequantizes them to float32 with
``gguf.quants.dequantize`` so the regular ``load_weights`` path can take over.

Two llama.cpp conventions need undoing:

- Shapes: GGUF lists dimensions innermost first (``ne``); ``GGUFReader``
  already exposes the data in numpy order, which for matrices is Hugging
  Face's ``[out_features, in_features]``.
- Q/K rows: for llama-architecture files, llama.cpp's converter reorders the
  rows of each attention head's Q and K projections from "first half, second
  half" (rotate-half RoPE) to interleaved pairs (its own RoPE kernel). We
  reorder them back, per head, using the KV head count for K. Qwen2/3, Gemma 3
  and Phi-3 files are written without this permutation.
- Norms: Gemma's converter stores ``1 + weight``; we subtract the 1 (the model
  adds it back, as transformers does).

Some hyper-parameters are tensors or llama.cpp constants rather than metadata:
Llama 3's RoPE factors (``rope_freqs``), Phi-3's LongRoPE factors
(``rope_factors_long/short``), Gemma 3's query scale and local RoPE base.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tokenmill import gguf_file
from tokenmill.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelConfig
from tokenmill.model.decoder import WeightLoadError
from tokenmill.model.layers import rope_inv_freq

if TYPE_CHECKING:  # gguf is imported lazily by the functions that read files
    from gguf import GGUFReader, ReaderTensor


@dataclass(frozen=True)
class _Arch:
    """How one GGUF ``general.architecture`` maps onto tokenmill."""

    hf_architecture: str
    permuted_qk: bool  # llama.cpp's converter interleaved each head's Q/K rows
    block_names: dict[str, str]  # GGUF block tensor part -> HF module path in the layer
    norm_shift: float = 0.0  # stored norm weight = HF weight + norm_shift (Gemma: 1)


_LLAMA_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    # Mixture of experts: the router and the experts stacked per projection.
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}
_GEMMA3_BLOCK = {
    **_LLAMA_BLOCK,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_PHI3_BLOCK = {**_LLAMA_BLOCK, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
# Mixtral in a "llama" GGUF: the router is block_sparse_moe.gate, older files store
# one tensor per expert (blk.N.ffn_gate.E.weight).
_MIXTRAL_BLOCK = {**_LLAMA_BLOCK, "ffn_gate_inp": "block_sparse_moe.gate"}
_MIXTRAL_EXPERT = {"ffn_gate": "w1", "ffn_up": "w3", "ffn_down": "w2"}

# GGUF ``general.architecture`` -> how to read it ("llama" with experts is Mixtral).
_GGUF_ARCHITECTURES: dict[str, _Arch] = {
    "llama": _Arch("LlamaForCausalLM", True, _LLAMA_BLOCK),
    "qwen2": _Arch("Qwen2ForCausalLM", False, _LLAMA_BLOCK),
    "qwen3": _Arch("Qwen3ForCausalLM", False, _LLAMA_BLOCK),
    "qwen3moe": _Arch("Qwen3MoeForCausalLM", False, _LLAMA_BLOCK),
    "gemma3": _Arch("Gemma3ForCausalLM", False, _GEMMA3_BLOCK, norm_shift=1.0),
    "phi3": _Arch("Phi3ForCausalLM", False, _PHI3_BLOCK),
}
_MIXTRAL = _Arch("MixtralForCausalLM", True, _MIXTRAL_BLOCK)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_BLOCK_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_EXPERT_PATTERN = re.compile(r"blk\.(\d+)\.(ffn_gate|ffn_up|ffn_down)\.(\d+)\.weight")

# Llama 3.x stores its RoPE scaling as a precomputed per-frequency factor tensor
# instead of metadata; these are the published parameter sets it can encode.
_ROPE_FREQS_TENSOR = "rope_freqs.weight"
_LLAMA3_ROPE_CANDIDATES = tuple(
    {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    for factor in (8.0, 32.0, 16.0)
)
# Phi-3's LongRoPE factors, stored as tensors too.
_LONGROPE_TENSORS = {"rope_factors_long.weight": "long_factor",
                     "rope_factors_short.weight": "short_factor"}
# Tensors folded into the config rather than loaded.
_CONFIG_TENSORS = (_ROPE_FREQS_TENSOR, *_LONGROPE_TENSORS)
# Gemma 3: every sixth layer is global unless the file says otherwise.
_GEMMA3_PATTERN = 6


def open_gguf(path: str) -> GGUFReader:
    """Open ``path`` with ``gguf.GGUFReader`` (memory-mapped; tensors read lazily)."""
    return gguf_file.open_gguf(path)


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _arch(reader: GGUFReader, source: str) -> _Arch:
    arch = _field(reader, "general.architecture")
    if arch not in _GGUF_ARCHITECTURES:
        raise ValueError(
            f"{source}: unsupported GGUF architecture {arch!r}; supported: "
            f"{', '.join(sorted(_GGUF_ARCHITECTURES))}"
        )
    if arch == "llama" and int(_field(reader, "llama.expert_count", 0) or 0) > 0:
        return _MIXTRAL
    return _GGUF_ARCHITECTURES[arch]


# GGML block types whose codes and scales a tokenmill quantization method keeps as they
# are (quantization.py): Q4_0/Q4_1 blocks are int4's groups of 32, Q8_0 blocks int8's.
_NATIVE_QUANTIZATION = {"Q4_0": "int4", "Q4_1": "int4", "Q8_0": "int8"}


def file_quantization(reader: GGUFReader) -> str | None:
    """The weight quantization (``"int4"``/``"int8"``) that runs this file's decoder
    matrices on their own codes, or None when they are float or of other block types
    (K-quants, mixed files): those would be rounded again, so they load as floats."""
    kinds = {
        _NATIVE_QUANTIZATION.get(t.tensor_type.name)
        for t in reader.tensors
        if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) >= 2
    }
    return kinds.pop() if len(kinds) == 1 else None


def gguf_architecture(reader: GGUFReader, source: str) -> tuple[str, bool]:
    """(HF architecture name, whether Q/K rows are permuted) of a GGUF file."""
    info = _arch(reader, source)
    return info.hf_architecture, info.permuted_qk


def config_from_gguf(reader: GGUFReader, source: str = "<gguf>") -> ModelConfig:
    """Build a :class:`ModelConfig` from a GGUF file's metadata and tensor list."""
    info = _arch(reader, source)
    architecture = info.hf_architecture
    arch = _field(reader, "general.architecture")
    tensors = {t.name: t for t in reader.tensors}

    def required(key: str) -> Any:
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"{source}: GGUF metadata lacks {arch}.{key}")
        return value

    def optional(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    hidden = int(required("embedding_length"))
    heads = int(required("attention.head_count"))
    kv_heads = int(optional("attention.head_count_kv", heads))
    head_dim = int(optional("attention.key_length", hidden // heads))
    layers = int(required("block_count"))
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise WeightLoadError(f"{source}: missing tensor 'token_embd.weight'")
    # ne[1] of the embedding is the vocabulary the weights were trained with; in
    # well-formed files it equals the length of tokenizer.ggml.tokens.
    vocab_size = int(embed.shape[1])
    rope_theta = float(optional("rope.freq_base", 10000.0))
    rope_scaling = _rope_scaling(reader, arch, tensors, head_dim, rope_theta, source)
    rotary = optional("rope.dimension_count")
    partial = 1.0 if not rotary else int(rotary) / head_dim
    has_q_bias = "blk.0.attn_q.bias" in tensors
    eos_ids = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        token = _field(reader, key)
        if token is not None and int(token) not in eos_ids:
            eos_ids.append(int(token))
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    extra: dict[str, Any] = {}
    window = optional("attention.sliding_window")
    if window:
        extra["sliding_window"] = int(window)
        extra["layer_types"] = _layer_types(reader, arch, layers)
    experts = int(optional("expert_count", 0) or 0)
    inter = int(required("feed_forward_length"))
    if experts:
        moe_inter = int(optional("expert_feed_forward_length", 0) or inter)
        extra.update(
            num_experts=experts,
            num_experts_per_tok=int(required("expert_used_count")),
            moe_intermediate_size=moe_inter,
            # llama.cpp renormalises Mixtral's and Qwen3-MoE's top-k weights.
            norm_topk_prob=bool(optional("expert_weights_norm", True)),
            dense_layers=tuple(i for i in range(layers)
                               if f"blk.{i}.ffn_gate_inp.weight" not in tensors),
        )
    if architecture in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForCausalLM"):
        extra["qk_norm"] = True
    if architecture == "Gemma3ForCausalLM":
        # Not in the metadata: llama.cpp's constants (query scale 1/sqrt(hidden/heads)
        # for the 62-layer 27B, 1/sqrt(head_dim) otherwise; local RoPE base 10000).
        extra.update(
            query_pre_attn_scalar=float(hidden // heads if layers == 62 else head_dim),
            rope_local_theta=float(optional("rope.freq_base_swa", 10000.0)),
            hidden_act="gelu_pytorch_tanh",
            final_logit_softcapping=optional("final_logit_softcapping"),
        )
    return ModelConfig(
        architecture=architecture,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(optional("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=_frozen(rope_scaling),
        max_position_embeddings=int(optional("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias=architecture == "Qwen2ForCausalLM" or has_q_bias,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(eos_ids),
        partial_rotary_factor=partial,
        **extra,
    )


def _frozen(scaling: dict[str, Any] | None) -> tuple[tuple[str, Any], ...] | None:
    if not scaling:
        return None
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                        for k, v in scaling.items()))


def _layer_types(reader: GGUFReader, arch: str, layers: int) -> tuple[str, ...]:
    """Which layers slide: the file's ``attention.sliding_window_pattern`` (one flag per
    layer, or a period whose last layer is global), else Gemma 3's period of 6, else all."""
    pattern = _field(reader, f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list) and len(pattern) == layers:
        return tuple(SLIDING_ATTENTION if p else FULL_ATTENTION for p in pattern)
    period = int(pattern) if isinstance(pattern, int) and pattern > 0 else (
        _GEMMA3_PATTERN if arch == "gemma3" else 0)
    if not period:
        return (SLIDING_ATTENTION,) * layers
    return tuple(SLIDING_ATTENTION if (i + 1) % period else FULL_ATTENTION
                 for i in range(layers))


def _rope_scaling(reader: GGUFReader, arch: str, tensors: dict[str, ReaderTensor],
                  head_dim: int, rope_theta: float, source: str) -> dict[str, Any] | None:
    """RoPE scaling from metadata (linear), Llama 3's factor tensor or Phi-3's LongRoPE
    factor tensors; ValueError for a type tokenmill does not implement."""
    if any(name in tensors for name in _LONGROPE_TENSORS):
        scaling: dict[str, Any] = {"rope_type": "longrope"}
        for name, key in _LONGROPE_TENSORS.items():
            if name not in tensors:
                raise ValueError(f"{source}: LongRoPE needs both {', '.join(_LONGROPE_TENSORS)}")
            values = dequantize_tensor(tensors[name], source).astype(np.float32).ravel()
            scaling[key] = [float(v) for v in values]
        original = _field(reader, f"{arch}.rope.scaling.original_context_length")
        if original is None:
            raise ValueError(f"{source}: LongRoPE needs "
                             f"{arch}.rope.scaling.original_context_length")
        scaling["original_max_position_embeddings"] = int(original)
        scaling["attention_factor"] = float(
            _field(reader, f"{arch}.rope.scaling.attn_factor", 1.0))
        return scaling
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if kind == "linear":
        return {"rope_type": "linear",
                "factor": float(_field(reader, f"{arch}.rope.scaling.factor", 1.0))}
    if kind not in (None, "none"):
        raise ValueError(f"{source}: unsupported GGUF rope scaling type {kind!r} "
                         f"for {arch} (supported: linear, llama3 factors, LongRoPE)")
    if _ROPE_FREQS_TENSOR in tensors:
        return _llama3_scaling_from_factors(tensors[_ROPE_FREQS_TENSOR], head_dim, rope_theta,
                                            source)
    return None


def _llama3_scaling_from_factors(
    tensor: ReaderTensor, head_dim: int, rope_theta: float, source: str
) -> dict[str, Any]:
    """Recognise which Llama 3 rope_scaling produced a ``rope_freqs`` factor tensor."""
    factors = torch.from_numpy(dequantize_tensor(tensor, source).astype(np.float32).ravel())
    base = rope_inv_freq(head_dim, rope_theta)
    for candidate in _LLAMA3_ROPE_CANDIDATES:
        expected = base / rope_inv_freq(head_dim, rope_theta, candidate)
        if expected.shape == factors.shape and torch.allclose(expected, factors, rtol=1e-4):
            return dict(candidate)
    raise ValueError(
        f"{source}: tensor {_ROPE_FREQS_TENSOR!r} holds RoPE factors that match no known "
        "Llama 3 rope_scaling; convert the model from its Hugging Face checkpoint instead"
    )


def hf_tensor_name(gguf_name: str, source: str = "<gguf>",
                   architecture: str = "llama") -> str | None:
    """Hugging Face name for a GGUF tensor name; None for tensors folded into the config.

    ``architecture`` is the file's ``general.architecture`` ("mixtral" for a llama
    file with experts): it decides names that differ between families.
    """
    if gguf_name in _CONFIG_TENSORS:
        return None
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    info = _MIXTRAL if architecture == "mixtral" else _GGUF_ARCHITECTURES.get(
        architecture, _GGUF_ARCHITECTURES["llama"])
    expert = _EXPERT_PATTERN.fullmatch(gguf_name)
    if expert and info is _MIXTRAL:
        layer, part, index = expert.groups()
        experts = f"model.layers.{layer}.block_sparse_moe.experts"
        return f"{experts}.{index}.{_MIXTRAL_EXPERT[part]}.weight"
    match = _BLOCK_PATTERN.fullmatch(gguf_name)
    if match and match.group(2) in info.block_names:
        layer, part, kind = match.groups()
        module = info.block_names[part]
        if part.endswith("_exps"):
            return f"model.layers.{layer}.{module}"  # stacked experts: no ".weight"
        return f"model.layers.{layer}.{module}.{kind}"
    raise WeightLoadError(f"{source}: unexpected tensor {gguf_name!r} in GGUF file")


def dequantize_tensor(tensor: ReaderTensor, source: str = "<gguf>") -> np.ndarray:
    """Float32 numpy array (numpy / HF dimension order) of a possibly quantized tensor."""
    from gguf import quants

    try:
        array = quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise WeightLoadError(
            f"{source}: tensor {tensor.name!r} uses GGML type {tensor.tensor_type.name}, "
            "which gguf.quants cannot dequantize"
        ) from None
    # Float tensors come back as read-only views into the memory map.
    return array if array.flags.writeable else array.copy()


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row interleaving of a Q or K projection (or its bias).

    llama.cpp stores the rows of each head as pairs (x0, x_half, x1, x_half+1,
    ...); rotate-half RoPE wants (x0, x1, ..., x_half, ...).
    """
    rows = weight.shape[0]
    half = rows // num_heads // 2
    grouped = weight.reshape(num_heads, half, 2, *weight.shape[1:])
    return grouped.transpose(1, 2).reshape(weight.shape)


def permute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's converter permutation (HF rows -> GGUF rows); inverse of unpermute_qk."""
    rows = weight.shape[0]
    half = rows // num_heads // 2
    grouped = weight.reshape(num_heads, 2, half, *weight.shape[1:])
    return grouped.transpose(1, 2).reshape(weight.shape)


def iter_gguf_weights(
    reader: GGUFReader, config: ModelConfig, source: str = "<gguf>"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, float32 tensor)`` for every weight in the file, in Hugging Face
    conventions: Q/K rows un-permuted, Gemma's norm weights without their +1 shift."""
    info = _arch(reader, source)
    arch = "mixtral" if info is _MIXTRAL else _field(reader, "general.architecture")
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name, source, arch)
        if name is None:
            continue
        weight = torch.from_numpy(dequantize_tensor(tensor, source))
        if info.permuted_qk and ".self_attn.q_proj." in name:
            weight = unpermute_qk(weight, config.num_attention_heads)
        elif info.permuted_qk and ".self_attn.k_proj." in name:
            weight = unpermute_qk(weight, config.num_key_value_heads)
        elif info.norm_shift and name.endswith("norm.weight"):
            # The model adds it back (the way transformers does, so float32 values match).
            weight = weight - info.norm_shift
        yield name, weight


__all__ = [
    "config_from_gguf",
    "dequantize_tensor",
    "file_quantization",
    "hf_tensor_name",
    "iter_gguf_weights",
    "open_gguf",
    "permute_qk",
    "unpermute_qk",
]
