"""Architecture name (``config.json``'s ``architectures[0]``) -> model class."""

from __future__ import annotations

from tokenmill.model.llama import LlamaCausalLM, MistralCausalLM, Qwen2CausalLM

_MODEL_CLASSES: dict[str, type[LlamaCausalLM]] = {
    "LlamaForCausalLM": LlamaCausalLM,
    "MistralForCausalLM": MistralCausalLM,
    "Qwen2ForCausalLM": Qwen2CausalLM,
}


def supported_architectures() -> list[str]:
    """Names of every architecture tokenmill can run."""
    return sorted(_MODEL_CLASSES)


def get_model_class(architecture: str) -> type[LlamaCausalLM]:
    """The model class for ``architecture``; ValueError listing the supported ones."""
    try:
        return _MODEL_CLASSES[architecture]
    except KeyError:
        raise ValueError(
            f"unsupported model architecture {architecture!r}; supported: "
            f"{', '.join(supported_architectures())}"
        ) from None
