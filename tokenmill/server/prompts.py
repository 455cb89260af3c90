"""From request text to prompt token ids, without stalling the event loop.

Chat templates (Jinja) and tokenization run in a small thread pool: the Rust
tokenizer's batch call releases the GIL, so a huge prompt is tokenized while
the event loop keeps answering other clients. Before any of that work, a
prompt whose text cannot fit the context whatever the tokenization is refused
at once: no token of the vocabulary decodes to more than
``max_bytes_per_token`` bytes, so a text of ``B`` UTF-8 bytes needs at least
``B / max_bytes_per_token`` tokens (halved again for safety against
normalizers that shrink text).
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tokenmill.server.errors import APIError, invalid_param

# Margin on the lower bound of a text's token count (normalization may shrink text).
_BOUND_SAFETY = 2


class PromptBuilder:
    """Renders chat templates and tokenizes prompts off the event loop."""

    def __init__(self, tokenizer: Any, max_model_len: int, workers: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self._pool = ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1),
                                        thread_name_prefix="tokenmill-tokenize")
        self._max_bytes_per_token: int | None = None

    def prepare(self) -> None:
        """Compute the per-token byte bound now (blocking; run it off the event loop)."""
        _ = self.max_bytes_per_token

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def max_bytes_per_token(self) -> int:
        """The most UTF-8 bytes any single token decodes to (computed once)."""
        if self._max_bytes_per_token is None:
            tok = self.tokenizer
            longest = 1
            for token_id in range(int(tok.vocab_size)):
                text = tok.decode([token_id], skip_special_tokens=False)
                longest = max(longest, len(text.encode("utf-8", "surrogatepass")))
            self._max_bytes_per_token = longest
        return self._max_bytes_per_token

    def check_text_length(self, num_bytes: int, param: str) -> None:
        """400 if ``num_bytes`` of text cannot fit the context in any tokenization."""
        at_least = num_bytes // (self.max_bytes_per_token * _BOUND_SAFETY)
        if at_least >= self.max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens; the "
                f"prompt ({num_bytes:,} bytes of text) is far longer than that.",
                param=param, code="context_length_exceeded")

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def encode(self, text: str, add_special_tokens: bool, param: str) -> list[int]:
        """Token ids of ``text`` (length-checked first)."""
        self.check_text_length(len(text.encode("utf-8")), param)
        return (await self._run(self.tokenizer.encode_batch, [text], add_special_tokens))[0]

    async def render_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool, param: str = "messages",
        **template_kwargs: Any,
    ) -> str:
        """The chat template applied to ``messages`` (ValueError from it becomes a 400)."""
        size = sum(len(str(m.get("content") or "").encode("utf-8")) for m in messages)
        self.check_text_length(size, param)

        def render() -> str:
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, **template_kwargs)

        try:
            return await self._run(render)
        except ValueError as exc:
            raise invalid_param(f"Invalid messages: {exc}", param) from None

    async def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool, param: str = "messages",
    ) -> tuple[str, list[int]]:
        """The rendered chat prompt and its token ids (no extra BOS: templates write it)."""
        text = await self.render_chat(messages, add_generation_prompt, param)
        return text, await self.encode(text, False, param)

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = int(self.tokenizer.vocab_size)
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise invalid_param(f"Token id {bad} is out of the vocabulary range [0, {vocab}).",
                                param)
