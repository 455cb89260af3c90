"""The Llama family: Llama 2/3, Mistral, Qwen2 (and SmolLM2) on the shared decoder.

The three architectures differ only in details the config and a class
attribute carry:

- Qwen2 has biases on the Q/K/V projections but none on the output
  projection; Llama with ``attention_bias`` has both;
- Mistral (and Qwen2 with ``use_sliding_window``) attend through a sliding
  window, honoured by every attention backend (see ``ModelConfig.layer_window``).

Everything else lives in :mod:`tokenmill.model.decoder`; the names below stay
importable from here for code written against earlier versions.
"""

from __future__ import annotations

from tokenmill.model.decoder import (
    DecoderCausalLM,
    DecoderLayer,
    DecoderModel,
    KVCache,
    RopeTables,
    WeightLoadError,
)

__all__ = [
    "DecoderLayer",
    "DecoderModel",
    "KVCache",
    "LlamaCausalLM",
    "MistralCausalLM",
    "Qwen2CausalLM",
    "RopeTables",
    "WeightLoadError",
]


class LlamaCausalLM(DecoderCausalLM):
    """LlamaForCausalLM: biases as ``config.attention_bias`` says."""


class MistralCausalLM(LlamaCausalLM):
    """MistralForCausalLM: Llama math, no biases, optional sliding window."""

    qkv_bias = False
    o_bias = False


class Qwen2CausalLM(LlamaCausalLM):
    """Qwen2ForCausalLM: Llama math with Q/K/V biases and a bias-free output projection."""

    qkv_bias = True
    o_bias = False
