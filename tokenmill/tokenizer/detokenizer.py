"""Streaming detokenization: turn generated ids into text deltas as they arrive.

Decoding token by token and concatenating is wrong in two ways:

* one character can span several tokens (an emoji is four UTF-8 bytes, often
  four byte tokens); decoding a prefix of it gives U+FFFD, and
* a token's text can depend on its left neighbour (SentencePiece drops the
  leading space of the first token decoded, so "▁world" alone is "world").

So each step decodes a short window of ids twice, with and without the new
ones, and emits the difference (the "prefix offset / read offset" technique of
text-generation servers). The window starts a few tokens back, giving left
context, and moves forward whenever the text comes out clean; if the new text
ends in U+FFFD, the tokens are held back until the character completes. Work
per token is bounded by the window, not by the length of the output.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenmill.tokenizer.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens kept as left context for the first generated tokens.
PROMPT_CONTEXT_TOKENS = 5
# A UTF-8 character has at most 4 bytes, so text still ending in U+FFFD after this
# many held tokens is a real replacement character (or invalid bytes from the
# model), not an unfinished one: emit it rather than let the window grow.
MAX_HELD_TOKENS = 16
# Drop ids that fell out of the window once this many have piled up.
_COMPACT_AFTER = 256


class IncrementalDetokenizer:
    """Text deltas for one request's generated tokens.

    `add_tokens(ids)` returns only the newly finalized text; `flush()` returns
    text still held back (an unfinished character at the end of generation, as
    U+FFFD). The deltas concatenate to the decode of the generated ids in the
    context of the prompt: with an empty prompt that is exactly
    `tokenizer.decode(generated_ids, skip_special_tokens)`; after a prompt it is
    `decode(prompt + generated)` minus `decode(prompt)`, which differs only for
    SentencePiece vocabularies, where it keeps the first generated token's
    leading space (a completion of "The capital is" is " Paris", not "Paris").

    `spaces_between_special_tokens` is accepted for OpenAI/vLLM API parity; HF
    fast tokenizers never insert spaces around added tokens, so it has no effect.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self._decode = tokenizer.backend.decode
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:]) if len(prompt_token_ids) else []
        # ids[prefix_offset:read_offset] is context whose text was already
        # emitted (or belongs to the prompt); ids[read_offset:] is held back.
        self._ids: list[int] = [int(token_id) for token_id in context]
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text: str | None = None  # decode of ids[prefix:read], cached
        self._pieces: list[str] = []
        self._num_generated = 0

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._pieces) > 1:  # join once, so repeated reads stay cheap
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    @property
    def num_generated_tokens(self) -> int:
        return self._num_generated

    @property
    def num_held_tokens(self) -> int:
        """Tokens whose text has not been emitted yet."""
        return len(self._ids) - self._read_offset

    def add_tokens(self, new_ids: Sequence[int]) -> str:
        """Take newly generated ids; return the text they finalize (maybe "")."""
        deltas = []
        for token_id in new_ids:
            self._ids.append(int(token_id))
            self._num_generated += 1
            delta = self._step(force=False)
            if delta:
                deltas.append(delta)
        delta = "".join(deltas)
        if delta:
            self._pieces.append(delta)
        return delta

    def flush(self) -> str:
        """Emit whatever is held back (call when generation ends)."""
        if self._read_offset == len(self._ids):
            return ""
        delta = self._step(force=True)
        if delta:
            self._pieces.append(delta)
        return delta

    def _window_text(self, start: int, end: int | None = None) -> str:
        return self._decode(self._ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def _step(self, force: bool) -> str:
        if self._prefix_text is None:
            self._prefix_text = self._window_text(self._prefix_offset, self._read_offset)
        new_text = self._window_text(self._prefix_offset)
        held = len(self._ids) - self._read_offset
        unfinished = new_text.endswith(REPLACEMENT_CHAR) and held < MAX_HELD_TOKENS
        grew = len(new_text) > len(self._prefix_text)
        # Nothing new (e.g. a skipped special token) keeps the window where it
        # is, so the next token still decodes with real left context.
        if not force and (unfinished or (not grew and held < MAX_HELD_TOKENS)):
            return ""
        delta = new_text[len(self._prefix_text) :] if grew else ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = None
        if self._prefix_offset >= _COMPACT_AFTER:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return delta
