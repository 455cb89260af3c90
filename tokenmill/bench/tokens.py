"""Counting tokens on the client side, with the target model's tokenizer when we have it.

The benchmark works without any tokenizer (it then trusts the server's ``usage``), but
with one it can build prompts of an exact token length and count every server's tokens
the same way, which keeps side-by-side comparisons fair.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class TokenCounter:
    """A thin adapter over a tokenizer object: ``encode``/``decode`` without special tokens.

    Accepts tokenmill's ``Tokenizer``, a Hugging Face ``tokenizers.Tokenizer`` or a
    ``transformers`` tokenizer; they differ in keyword names and return types.
    """

    def __init__(self, tokenizer: Any, name: str = "") -> None:
        self.tokenizer = tokenizer
        self.name = name or type(tokenizer).__name__

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no BOS/EOS added."""
        try:
            out = self.tokenizer.encode(text, add_special_tokens=False)
        except TypeError:
            out = self.tokenizer.encode(text)
        ids = getattr(out, "ids", out)  # tokenizers.Encoding carries .ids
        return list(ids)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``."""
        try:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        except TypeError:
            return self.tokenizer.decode(ids)

    def count(self, text: str) -> int:
        """Number of tokens in ``text``."""
        return len(self.encode(text)) if text else 0

    def count_chat(self, messages: list[dict[str, str]]) -> int:
        """Prompt tokens of a chat request: the chat template when the tokenizer has one."""
        apply = getattr(self.tokenizer, "apply_chat_template", None)
        if apply is not None:
            try:
                rendered = apply(messages, add_generation_prompt=True)
            except (TypeError, ValueError):
                rendered = None
            if isinstance(rendered, str):
                return len(self.encode(rendered))
            if isinstance(rendered, list) and all(isinstance(t, int) for t in rendered):
                return len(rendered)
        return sum(self.count(m.get("content") or "") for m in messages)


def load_token_counter(path: str) -> TokenCounter:
    """Load the tokenizer of a GGUF file or a Hugging Face model directory.

    Uses ``tokenmill.tokenizer.Tokenizer`` (imported lazily: it is heavy and optional here).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer path does not exist: {path}")
    try:
        from tokenmill.tokenizer import Tokenizer
    except ImportError as exc:  # pragma: no cover - depends on the installed tree
        raise RuntimeError(
            f"--tokenizer needs tokenmill.tokenizer, which failed to import: {exc}"
        ) from exc
    if p.is_dir():
        tok = Tokenizer.from_hf_dir(str(p))
    elif p.suffix.lower() == ".gguf":
        tok = Tokenizer.from_gguf_file(str(p))
    else:
        raise ValueError(f"--tokenizer must be a .gguf file or a Hugging Face directory: {path}")
    return TokenCounter(tok, name=p.name)
