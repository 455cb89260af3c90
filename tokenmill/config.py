"""Frozen configuration objects shared by every part of the engine.

Values that are only known at run time (for example how many KV blocks fit in
memory) are never written back into these objects: they are returned by the
component that discovers them and passed on explicitly.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

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
    """Architecture hyper-parameters of a decoder-only transformer (HF naming)."""

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
    # llama3-style scaling, e.g. {"rope_type": "llama3", "factor": 8.0, ...}; kept as
    # a tuple of items so the dataclass stays hashable and immutable.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @property
    def kv_bytes_per_token_per_dtype_byte(self) -> int:
        """Elements of K and V stored per token across all layers."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim

    @classmethod
    def from_hf_dict(cls, cfg: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dictionary."""
        cfg = normalize_hf_config(dict(cfg))
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else _arch_from_model_type(cfg.get("model_type"))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"{source}: unsupported architecture {arch!r}; tokenmill supports "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        for key in ("vocab_size", "hidden_size", "intermediate_size",
                    "num_hidden_layers", "num_attention_heads"):
            if key not in cfg:
                raise ValueError(f"{source}: missing required field {key!r}")
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        rope_scaling = cfg.get("rope_scaling")
        if rope_scaling:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if kind not in ("llama3", "default", None):
                raise ValueError(f"{source}: unsupported rope_scaling type {kind!r}")
            if kind in ("default", None):
                rope_scaling = None
        if arch == "Qwen2ForCausalLM":
            attention_bias = True
        else:
            attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rope_scaling=tuple(sorted(rope_scaling.items())) if rope_scaling else None,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
        )

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> ModelConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_hf_dict(json.load(f), source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json``-style dictionary (used to build reference HF models)."""
        d = {
            "architectures": [self.architecture],
            "model_type": {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                           "Qwen2ForCausalLM": "qwen2"}[self.architecture],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling_dict,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
        if self.architecture != "Qwen2ForCausalLM":
            d["attention_bias"] = self.attention_bias
        if self.bos_token_id is not None:
            d["bos_token_id"] = self.bos_token_id
        if self.eos_token_ids:
            d["eos_token_id"] = list(self.eos_token_ids)
        return d


def normalize_hf_config(raw: dict[str, Any]) -> dict[str, Any]:
    """Fold transformers 5's ``rope_parameters`` into ``rope_theta``/``rope_scaling``.

    transformers >= 5 writes ``{"rope_parameters": {"rope_theta": ..., "rope_type":
    ...}}`` instead of the older top-level keys that ``ModelConfig.from_hf_dict``
    reads; without this the theta would silently fall back to its default.
    """
    params = raw.get("rope_parameters")
    if not isinstance(params, dict) or "rope_theta" in raw:
        return raw
    raw = dict(raw)
    if "rope_theta" in params:
        raw["rope_theta"] = params["rope_theta"]
    if not raw.get("rope_scaling"):
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        kind = scaling.get("rope_type", scaling.get("type"))
        raw["rope_scaling"] = None if kind in (None, "default") else scaling
    return raw


def _arch_from_model_type(model_type: str | None) -> str:
    return {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
    }.get(model_type or "", f"<unknown model_type {model_type!r}>")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV-cache settings."""

    block_size: int = 16
    # CPU: bytes for the KV cache. GPU: used only if set, else the fraction below.
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    # Explicit block count (tests); overrides the memory budget when set.
    num_gpu_blocks_override: int | None = None

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")


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
