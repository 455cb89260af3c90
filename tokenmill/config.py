"""Frozen configuration objects shared by every part of the engine.

Values that are only known at run time (for example how many KV blocks fit in
memory) are never written back into these objects: they are returned by the
component that discovers them and passed on explicitly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

# Hugging Face architecture name -> config.json ``model_type``. The model classes live in
# tokenmill.model.registry; this is the list the config parser accepts.
ARCHITECTURE_MODEL_TYPES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3_text",
    "Phi3ForCausalLM": "phi3",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURE_MODEL_TYPES)

# Layer kinds, with transformers' names.
FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
# RoPE variants the rotary embedding implements (rope_scaling["rope_type"]).
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
HIDDEN_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """Turn a user-facing dtype name ("float32", "bf16", ...) into a torch dtype."""
    if isinstance(value, torch.dtype):
        return value
    try:
        return _DTYPES[str(value).lower()]
    except KeyError:
        raise ValueError(
            f"unknown dtype {value!r}; choose one of float32, bfloat16, float16"
        ) from None


def parse_memory(value: int | float | str) -> int:
    """Parse a memory size: an int of bytes, or a string like "2GiB", "512MiB", "1.5G"."""
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ValueError(f"memory size must be positive, got {value}")
        return int(value)
    text = str(value).strip().lower().replace(" ", "")
    units = {
        "gib": 1 << 30, "gb": 1 << 30, "g": 1 << 30,
        "mib": 1 << 20, "mb": 1 << 20, "m": 1 << 20,
        "kib": 1 << 10, "kb": 1 << 10, "k": 1 << 10,
        "b": 1, "": 1,
    }
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            number = text[: len(text) - len(suffix)] if suffix else text
            try:
                size = float(number) * units[suffix]
            except ValueError:
                break
            if size <= 0:
                raise ValueError(f"memory size must be positive, got {value!r}")
            return int(size)
    raise ValueError(f"cannot parse memory size {value!r} (examples: 2GiB, 512MiB, 1000000)")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters of a decoder-only transformer (HF naming).

    One dataclass covers every supported family; fields a family does not use
    keep their defaults. Per-layer variation is explicit: ``layer_types`` says
    which layers attend through a sliding window, ``dense_layers`` which layers
    of a mixture-of-experts model keep a dense MLP.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Scaled RoPE, e.g. {"rope_type": "llama3", "factor": 8.0, ...}; kept as a tuple of
    # items (lists as tuples) so the dataclass stays hashable and immutable.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # -- attention variants
    # RMSNorm over each head's dimension on Q and K before RoPE (Qwen3, Gemma 3).
    qk_norm: bool = False
    # Keys older than the window are not attended by "sliding_attention" layers: query
    # at position p sees keys p - sliding_window + 1 .. p (transformers' convention).
    sliding_window: int | None = None
    # Per layer FULL_ATTENTION or SLIDING_ATTENTION; () means every layer is full,
    # or every layer slides when ``sliding_window`` is set (filled in at construction).
    layer_types: tuple[str, ...] = ()
    # RoPE base of the sliding layers (Gemma 3's local layers); None: ``rope_theta``.
    rope_local_theta: float | None = None
    # Fraction of each head's dimensions that RoPE rotates (Phi-4-mini: 0.75).
    partial_rotary_factor: float = 1.0
    # Attention scale is query_pre_attn_scalar ** -0.5 (Gemma); None: head_dim ** -0.5.
    query_pre_attn_scalar: float | None = None
    # logits = cap * tanh(logits / cap) (Gemma); None: no capping.
    final_logit_softcapping: float | None = None
    hidden_act: str = "silu"
    # -- mixture of experts (num_experts == 0: a dense model)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # each expert's hidden width
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to one
    dense_layers: tuple[int, ...] = ()  # layers of an MoE model that keep a dense MLP

    def __post_init__(self) -> None:
        layers = self.num_hidden_layers
        if self.layer_types:
            if len(self.layer_types) != layers:
                raise ValueError(f"{self.architecture}: {len(self.layer_types)} layer_types for "
                                 f"{layers} layers")
            unknown = set(self.layer_types) - {FULL_ATTENTION, SLIDING_ATTENTION}
            if unknown:
                raise ValueError(f"{self.architecture}: unknown layer types {sorted(unknown)}")
        elif self.sliding_window is not None:
            object.__setattr__(self, "layer_types", (SLIDING_ATTENTION,) * layers)
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"{self.architecture}: sliding_window must be positive")
        if SLIDING_ATTENTION in self.layer_types and self.sliding_window is None:
            raise ValueError(f"{self.architecture}: sliding layers need a sliding_window")
        if self.hidden_act not in HIDDEN_ACTIVATIONS:
            raise ValueError(f"{self.architecture}: unsupported activation {self.hidden_act!r} "
                             f"(supported: {', '.join(HIDDEN_ACTIVATIONS)})")
        if self.num_experts:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ValueError(f"{self.architecture}: num_experts_per_tok must be in "
                                 f"1..{self.num_experts}, got {self.num_experts_per_tok}")
            if self.moe_intermediate_size <= 0:
                raise ValueError(f"{self.architecture}: moe_intermediate_size must be positive")
        rotary = self.head_dim * self.partial_rotary_factor
        if not 0 < self.partial_rotary_factor <= 1 or rotary != int(rotary) or int(rotary) % 2:
            raise ValueError(f"{self.architecture}: partial_rotary_factor "
                             f"{self.partial_rotary_factor} does not give an even rotary width")

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @property
    def kv_bytes_per_token_per_dtype_byte(self) -> int:
        """Elements of K and V stored per token across all layers."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim

    @property
    def rotary_dim(self) -> int:
        """Leading dimensions of each head that RoPE rotates."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def attention_scale(self) -> float:
        """Factor applied to Q.K scores."""
        base = self.query_pre_attn_scalar if self.query_pre_attn_scalar else self.head_dim
        return float(base) ** -0.5

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of ``layer``, or None when it attends to the whole context."""
        if self.layer_types and self.layer_types[layer] == SLIDING_ATTENTION:
            return self.sliding_window
        return None

    @property
    def kv_window(self) -> int | None:
        """Window outside which no layer reads K/V: set only when *every* layer slides.

        The KV cache keeps all layers of a token in one block, so a block can be
        freed only once it is outside every layer's window.
        """
        if self.layer_types and all(t == SLIDING_ATTENTION for t in self.layer_types):
            return self.sliding_window
        return None

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        """Whether ``layer``'s MLP is a mixture of experts."""
        return self.is_moe and layer not in self.dense_layers

    @classmethod
    def from_hf_dict(cls, cfg: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dictionary.

        Raises ValueError naming ``source`` and the architecture for anything
        tokenmill cannot run (an unknown architecture, an unsupported RoPE type or
        activation, attention logit soft-capping...).
        """
        raw = dict(cfg)
        archs = raw.get("architectures") or []
        arch = archs[0] if archs else _arch_from_model_type(raw.get("model_type"))
        if arch not in SUPPORTED_ARCHITECTURES:
            hint = ""
            if arch == "Gemma3ForConditionalGeneration":
                hint = (" (the multimodal checkpoint; tokenmill runs the text-only "
                        "Gemma3ForCausalLM)")
            raise ValueError(
                f"{source}: unsupported architecture {arch!r}{hint}; tokenmill supports "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for key in ("vocab_size", "hidden_size", "intermediate_size",
                    "num_hidden_layers", "num_attention_heads"):
            if key not in raw:
                raise ValueError(f"{source}: missing required field {key!r}")
        try:
            return _FAMILY_PARSERS.get(arch, _parse_common)(arch, raw, source)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{source}: malformed {arch} config ({exc!r})") from None

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> ModelConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_hf_dict(json.load(f), source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json``-style dictionary (used to build reference HF models)."""
        d: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": ARCHITECTURE_MODEL_TYPES[self.architecture],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": _json_rope(self.rope_scaling_dict),
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
        if self.architecture != "Qwen2ForCausalLM":
            d["attention_bias"] = self.attention_bias
        if self.bos_token_id is not None:
            d["bos_token_id"] = self.bos_token_id
        if self.eos_token_ids:
            d["eos_token_id"] = list(self.eos_token_ids)
        if self.sliding_window is not None:
            d["sliding_window"] = self.sliding_window
            d["layer_types"] = list(self.layer_types)
            if self.architecture.startswith("Qwen"):
                d["use_sliding_window"] = True
                d["max_window_layers"] = self.layer_types.index(SLIDING_ATTENTION)
        if self.architecture == "Gemma3ForCausalLM":
            d.update(rope_local_base_freq=self.rope_local_theta,
                     query_pre_attn_scalar=self.query_pre_attn_scalar,
                     final_logit_softcapping=self.final_logit_softcapping,
                     hidden_activation=self.hidden_act)
        else:
            d["hidden_act"] = self.hidden_act
        if self.partial_rotary_factor != 1.0:
            d["partial_rotary_factor"] = self.partial_rotary_factor
        if self.rope_scaling_dict and self.rope_scaling_dict.get("rope_type") == "longrope":
            d["original_max_position_embeddings"] = self.rope_scaling_dict[
                "original_max_position_embeddings"]
        if self.is_moe:
            d["num_experts_per_tok"] = self.num_experts_per_tok
            if self.architecture == "MixtralForCausalLM":
                d["num_local_experts"] = self.num_experts
            else:
                d.update(num_experts=self.num_experts,
                         moe_intermediate_size=self.moe_intermediate_size,
                         norm_topk_prob=self.norm_topk_prob,
                         mlp_only_layers=list(self.dense_layers))
        return d


def _json_rope(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    if scaling is None:
        return None
    return {k: list(v) if isinstance(v, tuple) else v for k, v in scaling.items()}


def _frozen_rope(scaling: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...] | None:
    if not scaling:
        return None
    items = {k: tuple(v) if isinstance(v, list) else v for k, v in scaling.items()}
    return tuple(sorted(items.items()))


def _eos_ids(raw: Mapping[str, Any]) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    return tuple(int(e) for e in ids)


def _rope_from(raw: Mapping[str, Any], params: Mapping[str, Any] | None, arch: str,
               source: str, default_theta: float = 10000.0) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from old-style top-level keys or one
    transformers 5 ``rope_parameters`` dict; ValueError for unsupported types."""
    params = dict(params or {})
    theta = float(params.get("rope_theta", raw.get("rope_theta", default_theta)))
    scaling = dict(raw.get("rope_scaling") or {})
    if not scaling:
        scaling = {k: v for k, v in params.items()
                   if k not in ("rope_theta", "partial_rotary_factor")}
    kind = scaling.get("rope_type", scaling.get("type"))
    if arch == "Phi3ForCausalLM" and kind in ("su", "yarn"):
        kind = "longrope"  # Phi-3's own names for the same scheme (as transformers reads them)
    if kind in (None, "default"):
        return theta, None
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{source}: {arch} uses rope_scaling type {kind!r}, which tokenmill "
                         f"does not implement (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    scaling.pop("type", None)
    scaling["rope_type"] = kind
    if kind == "longrope":
        scaling = _longrope(raw, scaling, source)
    return theta, scaling


def _longrope(raw: Mapping[str, Any], scaling: dict[str, Any], source: str) -> dict[str, Any]:
    """Phi-3's LongRoPE: short/long per-frequency factors and the cos/sin scale.

    The scale defaults the way transformers derives it: sqrt(1 + ln(f) / ln(orig))
    with f = max_position_embeddings / original_max_position_embeddings.
    """
    original = raw.get("original_max_position_embeddings") or scaling.get(
        "original_max_position_embeddings")
    if not original:
        raise ValueError(f"{source}: longrope needs original_max_position_embeddings")
    max_pos = int(raw.get("max_position_embeddings", original))
    factor = scaling.get("factor") or max_pos / original
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return {
        "rope_type": "longrope",
        "short_factor": [float(x) for x in scaling["short_factor"]],
        "long_factor": [float(x) for x in scaling["long_factor"]],
        "original_max_position_embeddings": int(original),
        "attention_factor": float(attention),
    }


def _sliding(raw: Mapping[str, Any], layers: int, qwen_style: bool) -> tuple[int | None,
                                                                            tuple[str, ...]]:
    """(sliding_window, layer_types) of Llama-like configs.

    Qwen2/Qwen3 slide only with ``use_sliding_window`` and only from layer
    ``max_window_layers`` on (unless ``layer_types`` lists them); Mistral, Mixtral
    and Phi-3 slide on every layer when ``sliding_window`` is set.
    """
    window = raw.get("sliding_window")
    if qwen_style and not raw.get("use_sliding_window", False):
        window = None
    if window is None:
        return None, ()
    types = raw.get("layer_types")
    if types:
        types = tuple(types)
    elif qwen_style:
        first = int(raw.get("max_window_layers", layers))
        types = tuple(SLIDING_ATTENTION if i >= first else FULL_ATTENTION for i in range(layers))
    else:
        types = (SLIDING_ATTENTION,) * layers
    if SLIDING_ATTENTION not in types:
        return None, ()
    return int(window), types


def _parse_common(arch: str, raw: dict[str, Any], source: str, **extra: Any) -> ModelConfig:
    """The fields every family shares; ``extra`` overrides or adds family fields."""
    raw = normalize_hf_config(raw)
    heads = int(raw["num_attention_heads"])
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    head_dim = int(raw.get("head_dim") or raw["hidden_size"] // heads)
    layers = int(raw["num_hidden_layers"])
    theta, scaling = _rope_from(raw, raw.get("rope_parameters"), arch, source)
    params = raw.get("rope_parameters") or {}
    partial = float(raw.get("partial_rotary_factor") or params.get("partial_rotary_factor")
                    or 1.0)
    window, types = _sliding(raw, layers, qwen_style=arch.startswith("Qwen"))
    if raw.get("mlp_bias"):
        raise ValueError(f"{source}: {arch} with mlp_bias is not supported")
    fields: dict[str, Any] = dict(
        architecture=arch,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=_frozen_rope(scaling),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(raw),
        sliding_window=window,
        layer_types=types,
        partial_rotary_factor=partial,
        hidden_act=str(raw.get("hidden_act") or "silu"),
    )
    fields.update(extra)
    try:
        return ModelConfig(**fields)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None


def _parse_qwen2(arch: str, raw: dict[str, Any], source: str) -> ModelConfig:
    return _parse_common(arch, raw, source, attention_bias=True)  # Q/K/V biases, always


def _parse_qwen3(arch: str, raw: dict[str, Any], source: str) -> ModelConfig:
    return _parse_common(arch, raw, source, qk_norm=True)


def _parse_mixtral(arch: str, raw: dict[str, Any], source: str) -> ModelConfig:
    experts = int(raw.get("num_local_experts") or raw.get("num_experts") or 8)
    return _parse_common(
        arch, raw, source, num_experts=experts,
        num_experts_per_tok=int(raw.get("num_experts_per_tok", 2)),
        moe_intermediate_size=int(raw["intermediate_size"]), norm_topk_prob=True)


def _parse_qwen3_moe(arch: str, raw: dict[str, Any], source: str) -> ModelConfig:
    layers = int(raw["num_hidden_layers"])
    experts = int(raw.get("num_experts") or raw.get("num_local_experts") or 0)
    step = int(raw.get("decoder_sparse_step") or 1)
    only_mlp = set(raw.get("mlp_only_layers") or [])
    dense = tuple(i for i in range(layers)
                  if i in only_mlp or not (experts > 0 and (i + 1) % step == 0))
    return _parse_common(
        arch, raw, source, qk_norm=True, num_experts=experts,
        num_experts_per_tok=int(raw.get("num_experts_per_tok", 1)),
        moe_intermediate_size=int(raw.get("moe_intermediate_size") or 0),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)), dense_layers=dense)


def _parse_phi3(arch: str, raw: dict[str, Any], source: str) -> ModelConfig:
    return _parse_common(arch, raw, source, attention_bias=False)


def _parse_gemma3(arch: str, raw: dict[str, Any], source: str) -> ModelConfig:
    """Gemma 3 text: local (sliding) and global layers with their own RoPE.

    Reads both the published layout (``rope_theta``, ``rope_local_base_freq``,
    ``rope_scaling`` for the global layers, ``sliding_window_pattern``) and
    transformers 5's (``rope_parameters`` keyed by layer type, ``layer_types``).
    """
    if raw.get("attn_logit_softcapping") is not None:
        raise ValueError(f"{source}: {arch} with attn_logit_softcapping is not supported")
    if raw.get("use_bidirectional_attention"):
        raise ValueError(f"{source}: {arch} with bidirectional attention is not supported")
    layers = int(raw["num_hidden_layers"])
    params = raw.get("rope_parameters") or {}
    nested = isinstance(params.get(FULL_ATTENTION), dict) or isinstance(
        params.get(SLIDING_ATTENTION), dict)
    global_params = params.get(FULL_ATTENTION) if nested else params
    local_params = params.get(SLIDING_ATTENTION) if nested else None
    theta, scaling = _rope_from(raw, global_params, arch, source, default_theta=1_000_000.0)
    local_theta = float((local_params or {}).get(
        "rope_theta", raw.get("rope_local_base_freq", 10_000.0)))
    _, local_scaling = _rope_from({}, local_params, arch, source)
    if local_scaling is not None:
        raise ValueError(f"{source}: {arch}: scaled RoPE on the sliding layers is not supported")
    types = raw.get("layer_types")
    if not types:
        pattern = int(raw.get("sliding_window_pattern") or 6)
        types = [SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION
                 for i in range(layers)]
    window = raw.get("sliding_window")
    types = tuple(types) if window is not None else ()
    stripped = {k: v for k, v in raw.items()
                if k not in ("rope_parameters", "rope_scaling", "layer_types")}
    return _parse_common(
        arch, {**stripped, "sliding_window": None}, source,
        rope_theta=theta, rope_scaling=_frozen_rope(scaling), rope_local_theta=local_theta,
        sliding_window=None if window is None else int(window), layer_types=types,
        qk_norm=True, query_pre_attn_scalar=float(raw.get("query_pre_attn_scalar") or 256),
        final_logit_softcapping=raw.get("final_logit_softcapping"),
        hidden_act=str(raw.get("hidden_activation") or raw.get("hidden_act")
                       or "gelu_pytorch_tanh"),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        head_dim=int(raw.get("head_dim") or 256),
    )


_FAMILY_PARSERS = {
    "Qwen2ForCausalLM": _parse_qwen2,
    "Qwen3ForCausalLM": _parse_qwen3,
    "Qwen3MoeForCausalLM": _parse_qwen3_moe,
    "MixtralForCausalLM": _parse_mixtral,
    "Phi3ForCausalLM": _parse_phi3,
    "Gemma3ForCausalLM": _parse_gemma3,
}


def normalize_hf_config(raw: dict[str, Any]) -> dict[str, Any]:
    """Fold transformers 5's ``rope_parameters`` into ``rope_theta``/``rope_scaling``.

    transformers >= 5 writes ``{"rope_parameters": {"rope_theta": ..., "rope_type":
    ...}}`` instead of the older top-level keys; without this the theta would
    silently fall back to its default. Per-layer-type parameters (Gemma 3) are
    left for the family's parser.
    """
    params = raw.get("rope_parameters")
    if not isinstance(params, dict) or "rope_theta" in raw:
        return raw
    if any(isinstance(v, dict) for v in params.values()):
        return raw
    raw = dict(raw)
    if "rope_theta" in params:
        raw["rope_theta"] = params["rope_theta"]
    if not raw.get("rope_scaling"):
        scaling = {k: v for k, v in params.items()
                   if k not in ("rope_theta", "partial_rotary_factor")}
        kind = scaling.get("rope_type", scaling.get("type"))
        raw["rope_scaling"] = None if kind in (None, "default") else scaling
    return raw


def _arch_from_model_type(model_type: str | None) -> str:
    by_type = {t: arch for arch, t in ARCHITECTURE_MODEL_TYPES.items()}
    by_type["gemma3"] = "Gemma3ForConditionalGeneration"
    return by_type.get(model_type or "", f"<unknown model_type {model_type!r}>")


# auto = the model's dtype (float16 for a float32 model with int4/int8 weights on the CPU);
# float32 / bfloat16 / float16 = that dtype whatever the model's (llama.cpp's default cache
# type is float16); fp8 = e4m3
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8", "fp8")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV-cache settings."""

    block_size: int = 16
    # Storage of K/V: the model's dtype, a 16-bit float type, or 8-bit codes with a scale
    # per token and head.
    kv_cache_dtype: str = "auto"
    # CPU: bytes for the KV cache. GPU: used only if set, else the fraction below.
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    # Explicit block count (tests); overrides the memory budget when set.
    num_gpu_blocks_override: int | None = None
    # Offload tiers of the prefix cache: host memory (bytes; 0 = off) and a disk
    # directory (None = off) holding at most offload_dir_bytes.
    offload_memory_bytes: int = 0
    offload_dir: str | None = None
    offload_dir_bytes: int = 16 << 30

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.offload_memory_bytes < 0 or self.offload_dir_bytes <= 0:
            raise ValueError("KV offload sizes must be positive")
        if self.offload_enabled and not self.enable_prefix_caching:
            raise ValueError("KV offload tiers extend the prefix cache: they need prefix "
                             "caching on")

    @property
    def offload_enabled(self) -> bool:
        """Whether any offload tier is configured."""
        return self.offload_memory_bytes > 0 or self.offload_dir is not None


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step limits and queueing policy."""

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_model_len: int = 2048
    policy: Literal["fcfs", "priority"] = "fcfs"
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens <= 0:
            raise ValueError("max_num_batched_tokens must be positive")
        if self.max_num_seqs <= 0:
            raise ValueError("max_num_seqs must be positive")
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling policy must be 'fcfs' or 'priority', got {self.policy!r}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                "without chunked prefill, max_num_batched_tokens must be >= max_model_len "
                f"({self.max_num_batched_tokens} < {self.max_model_len})"
            )


@dataclass(frozen=True)
class ParallelConfig:
    """Tensor parallelism: ``tensor_parallel_size`` ranks over ``nnodes`` machines."""

    tensor_parallel_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None  # HOST:PORT of node 0's TCP store
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        tp, nodes = self.tensor_parallel_size, self.nnodes
        if tp < 1 or nodes < 1:
            raise ValueError("tensor_parallel_size and nnodes must be >= 1")
        if tp % nodes:
            raise ValueError(f"tensor_parallel_size {tp} must be a multiple of nnodes {nodes} "
                             "(each node runs the same number of ranks)")
        if not 0 <= self.node_rank < nodes:
            raise ValueError(f"node_rank must be in [0, {nodes}), got {self.node_rank}")
        if nodes > 1 and not self.dist_init_addr:
            raise ValueError("--nnodes > 1 needs --dist-init-addr HOST:PORT (node 0's address)")
        if self.timeout_s <= 0:
            raise ValueError("distributed_timeout must be positive")

    @property
    def ranks_per_node(self) -> int:
        return self.tensor_parallel_size // self.nnodes

    def node_ranks(self, node: int | None = None) -> range:
        """Global ranks that run on ``node`` (default: this node)."""
        node = self.node_rank if node is None else node
        return range(node * self.ranks_per_node, (node + 1) * self.ranks_per_node)


SPECULATIVE_METHODS = ("ngram", "draft")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: who proposes draft tokens and how many per step.

    ``ngram`` looks the sequence's latest ``n``-gram up in its own tokens
    (``n`` from ``ngram_prompt_lookup_max`` down to ``ngram_prompt_lookup_min``)
    and proposes what followed it; ``draft`` runs the smaller ``model`` (same
    vocabulary) autoregressively. Either way the target verifies up to
    ``num_speculative_tokens`` drafts per sequence in one forward pass.
    """

    method: Literal["ngram", "draft"]
    num_speculative_tokens: int = 4
    ngram_prompt_lookup_max: int = 4
    ngram_prompt_lookup_min: int = 1
    model: str | None = None  # draft-model path (method "draft" only)

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(
                f"speculative method must be one of {', '.join(SPECULATIVE_METHODS)}, "
                f"got {self.method!r}"
            )
        if self.num_speculative_tokens <= 0:
            raise ValueError("num_speculative_tokens must be positive")
        if not 1 <= self.ngram_prompt_lookup_min <= self.ngram_prompt_lookup_max:
            raise ValueError(
                "need 1 <= ngram_prompt_lookup_min <= ngram_prompt_lookup_max, got "
                f"{self.ngram_prompt_lookup_min} and {self.ngram_prompt_lookup_max}"
            )
        if self.method == "draft" and not self.model:
            raise ValueError("speculative method 'draft' needs a speculative model path")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs, assembled once from user arguments."""

    model: ModelConfig
    model_path: str
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    dtype: torch.dtype = torch.float32
    quantization: str | None = None
    device: str = "cpu"
    load_format: Literal["auto", "safetensors", "gguf", "dummy"] = "auto"
    attention_backend: str = "torch"
    seed: int = 0
    num_threads: int | None = None
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)
