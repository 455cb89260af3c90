"""Read a llama.cpp GGUF file as a tokenmill model: config, names and float weights.

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
  reorder them back, per head, using the KV head count for K. Qwen2 files are
  written without this permutation.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tokenmill.config import ModelConfig
from tokenmill.model.layers import rope_inv_freq
from tokenmill.model.llama import WeightLoadError

if TYPE_CHECKING:  # gguf is imported lazily by the functions that read files
    from gguf import GGUFReader, ReaderTensor

# GGUF ``general.architecture`` -> (HF architecture, Q/K rows permuted by the converter)
_GGUF_ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("LlamaForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

_BLOCK_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# Llama 3.x stores its RoPE scaling as a precomputed per-frequency factor tensor
# instead of metadata; these are the published parameter sets it can encode.
_ROPE_FREQS_TENSOR = "rope_freqs.weight"
_LLAMA3_ROPE_CANDIDATES = tuple(
    {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    for factor in (8.0, 32.0, 16.0)
)


def open_gguf(path: str) -> GGUFReader:
    """Open ``path`` with ``gguf.GGUFReader`` (memory-mapped; tensors read lazily)."""
    from gguf import GGUFReader

    return GGUFReader(path)


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_architecture(reader: GGUFReader, source: str) -> tuple[str, bool]:
    """(HF architecture name, whether Q/K rows are permuted) of a GGUF file."""
    arch = _field(reader, "general.architecture")
    if arch not in _GGUF_ARCHITECTURES:
        raise ValueError(
            f"{source}: unsupported GGUF architecture {arch!r}; supported: "
            f"{', '.join(sorted(_GGUF_ARCHITECTURES))}"
        )
    return _GGUF_ARCHITECTURES[arch]


def config_from_gguf(reader: GGUFReader, source: str = "<gguf>") -> ModelConfig:
    """Build a :class:`ModelConfig` from a GGUF file's metadata and tensor list."""
    architecture, _ = gguf_architecture(reader, source)
    arch = _field(reader, "general.architecture")
    tensors = {t.name: t for t in reader.tensors}

    def required(key: str) -> Any:
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"{source}: GGUF metadata lacks {arch}.{key}")
        return value

    hidden = int(required("embedding_length"))
    heads = int(required("attention.head_count"))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise WeightLoadError(f"{source}: missing tensor 'token_embd.weight'")
    # ne[1] of the embedding is the vocabulary the weights were trained with; in
    # well-formed files it equals the length of tokenizer.ggml.tokens.
    vocab_size = int(embed.shape[1])
    scaling_type = _field(reader, f"{arch}.rope.scaling.type")
    if scaling_type not in (None, "none"):
        raise ValueError(f"{source}: unsupported GGUF rope scaling type {scaling_type!r}")
    rope_theta = float(_field(reader, f"{arch}.rope.freq_base", 10000.0))
    rope_scaling = None
    if _ROPE_FREQS_TENSOR in tensors:
        rope_scaling = _llama3_scaling_from_factors(
            tensors[_ROPE_FREQS_TENSOR], head_dim, rope_theta, source
        )
    has_q_bias = "blk.0.attn_q.bias" in tensors
    eos_ids = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        token = _field(reader, key)
        if token is not None and int(token) not in eos_ids:
            eos_ids.append(int(token))
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    return ModelConfig(
        architecture=architecture,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(required("feed_forward_length")),
        num_hidden_layers=int(required("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=tuple(sorted(rope_scaling.items())) if rope_scaling else None,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias=architecture == "Qwen2ForCausalLM" or has_q_bias,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(eos_ids),
    )


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


def hf_tensor_name(gguf_name: str, source: str = "<gguf>") -> str | None:
    """Hugging Face name for a GGUF tensor name; None for tensors folded into the config."""
    if gguf_name == _ROPE_FREQS_TENSOR:
        return None
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK_PATTERN.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"
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
    """Yield ``(hf_name, float32 tensor)`` for every weight in the file, un-permuted."""
    _, permuted = gguf_architecture(reader, source)
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name, source)
        if name is None:
            continue
        weight = torch.from_numpy(dequantize_tensor(tensor, source))
        if permuted and ".self_attn.q_proj." in name:
            weight = unpermute_qk(weight, config.num_attention_heads)
        elif permuted and ".self_attn.k_proj." in name:
            weight = unpermute_qk(weight, config.num_key_value_heads)
        yield name, weight


__all__ = [
    "config_from_gguf",
    "dequantize_tensor",
    "hf_tensor_name",
    "iter_gguf_weights",
    "open_gguf",
    "permute_qk",
    "unpermute_qk",
]
