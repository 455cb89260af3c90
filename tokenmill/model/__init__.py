"""Model definitions and loading: Llama-family decoders over a paged KV cache.

- ``layers``: RMSNorm, rotary embedding, SwiGLU, uninitialised Linear/Embedding.
- ``llama``: LlamaCausalLM (also Mistral and Qwen2) with fused QKV and gate/up.
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
