"""Architecture name (``config.json``'s ``architectures[0]``) -> model class."""

from __future__ import annotations

from tokenmill.model.decoder import DecoderCausalLM
from tokenmill.model.families import (
    Gemma3CausalLM,
    MixtralCausalLM,
    Phi3CausalLM,
    Qwen3CausalLM,
    Qwen3MoeCausalLM,
)
from tokenmill.model.llama import LlamaCausalLM, MistralCausalLM, Qwen2CausalLM

_MODEL_CLASSES: dict[str, type[DecoderCausalLM]] = {
    "LlamaForCausalLM": LlamaCausalLM,
    "MistralForCausalLM": MistralCausalLM,
    "Qwen2ForCausalLM": Qwen2CausalLM,
    "Qwen3ForCausalLM": Qwen3CausalLM,
    "Gemma3ForCausalLM": Gemma3CausalLM,
    "Phi3ForCausalLM": Phi3CausalLM,
    "MixtralForCausalLM": MixtralCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeCausalLM,
}


def supported_architectures() -> list[str]:
    """Names of every architecture tokenmill can run."""
    return sorted(_MODEL_CLASSES)


def get_model_class(architecture: str) -> type[DecoderCausalLM]:
    """The model class for ``architecture``; ValueError listing the supported ones."""
    try:
        return _MODEL_CLASSES[architecture]
    except KeyError:
        raise ValueError(
            f"unsupported model architecture {architecture!r}; supported: "
            f"{', '.join(supported_architectures())}"
        ) from None
