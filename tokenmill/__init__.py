"""tokenmill: an LLM inference and serving engine."""

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from tokenmill.llm import LLM
    from tokenmill.sampling import SamplingParams


def __getattr__(name: str) -> Any:
    # Lazy imports keep `import tokenmill` (and the CLI's --help) fast.
    if name == "LLM":
        from tokenmill.llm import LLM

        return LLM
    if name == "SamplingParams":
        from tokenmill.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(name)
