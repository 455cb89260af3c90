"""Model definitions and loading: decoder-only transformers over a paged KV cache.

- ``layers``: RMSNorm, rotary embedding (llama3/linear/LongRoPE, partial), SwiGLU/GeGLU,
  uninitialised Linear/Embedding.
- ``decoder``: the shared decoder skeleton (fused QKV and gate/up, per-layer sliding
  windows, Q/K norms, sandwich norms) and its checkpoint slot table.
- ``llama``, ``families``: Llama, Mistral, Qwen2; Qwen3, Gemma 3, Phi-3, Mixtral, Qwen3-MoE.
- ``moe``: top-k routed experts, computed grouped by expert.
- ``registry``: architecture name -> model class.
- ``loader``: locate a model (HF directory, GGUF file, dummy) and load it.
- ``gguf_loader``: GGUF metadata -> ModelConfig, tensor names, dequantization.
"""

from tokenmill.model.loader import (
    LoadedModel,
    ResolvedModel,
    default_model_path,
    load_model,
    resolve_model,
)
from tokenmill.model.registry import get_model_class, supported_architectures

__all__ = [
    "LoadedModel",
    "ResolvedModel",
    "default_model_path",
    "get_model_class",
    "load_model",
    "resolve_model",
    "supported_architectures",
]
