"""`Tokenizer`: text <-> token ids, special tokens and the chat template of a model.

It wraps a Hugging Face `tokenizers.Tokenizer` (Rust, fast) built either from a
Hugging Face model directory (`tokenizer.json` and friends) or from the metadata
of a GGUF file (see `gguf_builder`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from tokenmill.tokenizer.chat_template import ChatTemplate
from tokenmill.tokenizer.gguf_builder import bos_eos_post_processor, build_gguf_backend
from tokenmill.tokenizer.gguf_vocab import GGUFVocab, TokenType, read_gguf_vocab

logger = logging.getLogger(__name__)

# Control tokens that end a chat turn in well-known templates. GGUF files name a
# single EOS; llama.cpp also stops on these, and so does HF's generation_config
# for models such as Qwen2.5 (<|im_end|> and <|endoftext|>).
_END_OF_TURN_TOKENS = frozenset(
    {"<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>"}
)


def _unique(ids: Iterable[int | None]) -> tuple[int, ...]:
    seen: dict[int, None] = {}
    for token_id in ids:
        if token_id is not None:
            seen.setdefault(int(token_id), None)
    return tuple(seen)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    return data if isinstance(data, dict) else {}


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json spells special tokens as strings or AddedToken dicts."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _config_chat_template(directory: Path, config: Mapping[str, Any]) -> Any:
    """The chat template of an HF directory: a string, {name: template}, or None."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None:
        template = _read_json(directory / "chat_template.json").get("chat_template")
    if isinstance(template, list):
        # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        return {
            entry["name"]: entry["template"]
            for entry in template
            if isinstance(entry, Mapping) and "name" in entry and "template" in entry
        }
    return template


class Tokenizer:
    """A model's tokenizer: encode/decode, special ids, and its chat template.

    Build one with `from_hf_dir`, `from_gguf_reader`, `from_gguf_file` or
    `from_path`. Thread-safe for encode/decode (the Rust tokenizer is).
    """

    def __init__(
        self,
        backend: HFTokenizer,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] = (),
        pad_token_id: int | None = None,
        unk_token_id: int | None = None,
        special_ids: Iterable[int] = (),
        chat_template: str | Mapping[str, str] | None = None,
        vocab_size: int | None = None,
    ) -> None:
        """Wrap `backend`. `eos_token_ids` lists every id that ends generation,
        primary EOS first; `special_ids` adds to the backend's special added
        tokens; a None `chat_template` falls back to ChatML."""
        self._backend = backend
        self._bos_token_id = bos_token_id
        self._eos_token_ids = _unique(eos_token_ids)
        self._pad_token_id = pad_token_id
        self._unk_token_id = unk_token_id
        backend_special = (
            token_id
            for token_id, added in backend.get_added_tokens_decoder().items()
            if added.special
        )
        self._special_ids = frozenset(
            _unique(
                [
                    *special_ids,
                    *backend_special,
                    bos_token_id,
                    *self._eos_token_ids,
                    pad_token_id,
                    unk_token_id,
                ]
            )
        )
        self._vocab_size = max(backend.get_vocab_size(with_added_tokens=True), vocab_size or 0)
        self._chat_template = ChatTemplate(
            chat_template,
            {
                "bos_token": self._token_text(bos_token_id),
                "eos_token": self._token_text(self.eos_token_id),
                "pad_token": self._token_text(pad_token_id),
                "unk_token": self._token_text(unk_token_id),
            },
        )

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_hf_dir(
        cls, path: str | os.PathLike[str], chat_template: str | None = None
    ) -> Tokenizer:
        """Load `tokenizer.json`, `tokenizer_config.json` (special tokens,
        add_bos/eos_token, chat template; or `chat_template.jinja`) and the extra
        EOS ids of `generation_config.json`. `chat_template` overrides the model's."""
        directory = Path(path)
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"{tokenizer_file} not found (only fast tokenizers saved as tokenizer.json load)"
            )
        backend = HFTokenizer.from_file(str(tokenizer_file))
        config = _read_json(directory / "tokenizer_config.json")
        generation = _read_json(directory / "generation_config.json")

        def special_id(name: str) -> int | None:
            content = _token_content(config.get(name))
            return None if content is None else backend.token_to_id(content)

        bos_id, eos_id = special_id("bos_token"), special_id("eos_token")
        _apply_bos_eos_flags(backend, config, bos_id, eos_id)
        generation_eos = generation.get("eos_token_id")
        if isinstance(generation_eos, int):
            generation_eos = [generation_eos]
        eos_ids = [eos_id, *(generation_eos if isinstance(generation_eos, list) else [])]
        return cls(
            backend,
            bos_token_id=bos_id,
            eos_token_ids=[token_id for token_id in eos_ids if token_id is not None],
            pad_token_id=special_id("pad_token"),
            unk_token_id=special_id("unk_token"),
            chat_template=chat_template or _config_chat_template(directory, config),
        )

    @classmethod
    def from_gguf_vocab(cls, vocab: GGUFVocab, chat_template: str | None = None) -> Tokenizer:
        """Build from GGUF tokenizer metadata already read by `read_gguf_vocab`."""
        backend = build_gguf_backend(vocab)
        types = vocab.token_types or [TokenType.NORMAL] * len(vocab.tokens)
        control_ids = [
            token_id
            for token_id, kind in enumerate(types)
            if kind in (TokenType.CONTROL, TokenType.UNKNOWN)
        ]
        end_of_turn_ids = [
            token_id
            for token_id in control_ids
            if types[token_id] == TokenType.CONTROL
            and vocab.tokens[token_id] in _END_OF_TURN_TOKENS
        ]
        return cls(
            backend,
            bos_token_id=vocab.bos_token_id,
            eos_token_ids=_unique(
                [vocab.eos_token_id, vocab.eot_token_id, vocab.eom_token_id, *end_of_turn_ids]
            ),
            pad_token_id=vocab.pad_token_id,
            unk_token_id=vocab.unk_token_id,
            special_ids=control_ids,
            chat_template=chat_template or vocab.chat_template,
            vocab_size=len(vocab.tokens),
        )

    @classmethod
    def from_gguf_reader(cls, reader: Any, chat_template: str | None = None) -> Tokenizer:
        """Build from a `gguf.GGUFReader` the model loader already opened."""
        return cls.from_gguf_vocab(read_gguf_vocab(reader), chat_template=chat_template)

    @classmethod
    def from_gguf_file(
        cls, path: str | os.PathLike[str], chat_template: str | None = None
    ) -> Tokenizer:
        """Open a GGUF file and build its tokenizer (opening reads all metadata:
        a second or two for a 50k-token vocabulary)."""
        from tokenmill.gguf_file import open_gguf

        return cls.from_gguf_reader(open_gguf(path), chat_template=chat_template)

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], chat_template: str | None = None) -> Tokenizer:
        """A `.gguf` file or a Hugging Face model directory."""
        if Path(path).is_dir():
            return cls.from_hf_dir(path, chat_template=chat_template)
        return cls.from_gguf_file(path, chat_template=chat_template)

    # --------------------------------------------------------------- properties

    @property
    def backend(self) -> HFTokenizer:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._vocab_size

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        """The primary EOS id (first of `eos_token_ids`)."""
        return self._eos_token_ids[0] if self._eos_token_ids else None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: EOS, then end-of-turn/generation_config extras."""
        return self._eos_token_ids

    @property
    def pad_token_id(self) -> int | None:
        return self._pad_token_id

    @property
    def unk_token_id(self) -> int | None:
        return self._unk_token_id

    @property
    def bos_token(self) -> str | None:
        return self._token_text(self._bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self._token_text(self.eos_token_id)

    @property
    def all_special_ids(self) -> list[int]:
        """Sorted ids of all special tokens (control tokens, BOS/EOS/PAD/UNK)."""
        return sorted(self._special_ids)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    @property
    def chat_template(self) -> str:
        """The template text in use (ChatML when the model has none)."""
        return self._chat_template.source()

    def chat_template_source(self, with_tools: bool = False) -> str:
        """The template text used for a conversation with (or without) tools."""
        return self._chat_template.source(with_tools)

    @property
    def has_chat_template(self) -> bool:
        """False when the model shipped no template and ChatML is used instead."""
        return not self._chat_template.is_fallback

    # ------------------------------------------------------------ encode/decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (e.g.
        "<|im_start|>") become their ids; `add_special_tokens` adds BOS/EOS as the
        model asks (add_bos_token/add_eos_token)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = True
    ) -> list[list[int]]:
        """`encode` for many texts at once (parallel in the Rust tokenizer)."""
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Ids outside the vocabulary are ignored."""
        return self._backend.decode(
            ids if isinstance(ids, list) else [int(token_id) for token_id in ids],
            skip_special_tokens=skip_special_tokens,
        )

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """Vocabulary spelling of each id ("Ġworld", "▁world", "<0x0A>"); "" for
        ids outside the vocabulary."""
        return [self._backend.id_to_token(int(token_id)) or "" for token_id in ids]

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    # -------------------------------------------------------------------- chat

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render chat messages to prompt text with the model's Jinja template.

        The template runs sandboxed with the variables HF transformers provides
        (messages, tools, add_generation_prompt, bos_token, eos_token, pad_token,
        unk_token, plus `kwargs` such as enable_thinking) and its globals
        (raise_exception, strftime_now, tojson...). Without a model template,
        ChatML is used (`has_chat_template` is then False). Malformed messages
        or a template error raise ValueError. Encode the result with
        `add_special_tokens=False` (or use `encode_chat`): templates write BOS
        themselves.
        """
        return self._chat_template.render(
            messages, add_generation_prompt=add_generation_prompt, tools=tools, **kwargs
        )

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """Token ids of the rendered chat prompt (no extra BOS, as in HF)."""
        text = self.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tools=tools, **kwargs
        )
        return self.encode(text, add_special_tokens=False)

    # ----------------------------------------------------------------- helpers

    def _token_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._backend.id_to_token(token_id)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
            f"eos_ids={self.eos_token_ids}, chat_template={self.has_chat_template})"
        )


def _apply_bos_eos_flags(
    backend: HFTokenizer, config: Mapping[str, Any], bos_id: int | None, eos_id: int | None
) -> None:
    """Honour explicit add_bos_token/add_eos_token in tokenizer_config.json when
    tokenizer.json's post-processor disagrees (transformers does the same)."""
    if "add_bos_token" not in config and "add_eos_token" not in config:
        return
    probe_plain = backend.encode("a", add_special_tokens=False).ids
    probe = backend.encode("a", add_special_tokens=True).ids
    adds_bos = bos_id is not None and len(probe) > len(probe_plain) and probe[0] == bos_id
    adds_eos = eos_id is not None and len(probe) > len(probe_plain) and probe[-1] == eos_id
    want_bos = bool(config.get("add_bos_token", adds_bos)) and bos_id is not None
    want_eos = bool(config.get("add_eos_token", adds_eos)) and eos_id is not None
    if (want_bos, want_eos) == (adds_bos, adds_eos):
        return
    if want_bos or want_eos:
        backend.post_processor = bos_eos_post_processor(
            (backend.id_to_token(bos_id), bos_id) if want_bos else None,
            (backend.id_to_token(eos_id), eos_id) if want_eos else None,
        )
    else:
        backend.post_processor = None
