"""Read the tokenizer a GGUF file describes into plain Python data.

A GGUF file has no `tokenizer.json`; llama.cpp's converter stores the vocabulary,
merges, scores, token types and special ids as metadata under `tokenizer.ggml.*`.
This module only *reads* those keys (see `gguf_builder` for turning them into a
working `tokenizers.Tokenizer`).

`gguf.GGUFReader` exposes each metadata value as a `ReaderField` whose `parts`
are numpy views into the memory-mapped file and whose `data` lists the indices of
the parts that hold the values: one index for a scalar or string, one per element
for an array. Reading through `field.data` keeps this independent of the header
layout (key length, key bytes, type, array length) that precedes the values.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # gguf is imported when a file is read: GGUF-free setups never need it
    from gguf import GGUFReader, GGUFValueType
    from gguf.gguf_reader import ReaderField


class TokenType(enum.IntEnum):
    """llama.cpp token types (the same numbering as SentencePiece's piece types)."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


@dataclass(frozen=True)
class GGUFVocab:
    """Everything about the tokenizer that a GGUF file's metadata says.

    Optional values are None when the file does not carry the key, so the builder
    can apply llama.cpp's defaults (which differ between tokenizer models).
    """

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str | None  # tokenizer.ggml.pre: names the pre-tokenizer regex of byte-level vocabs
    tokens: list[str] = field(repr=False)
    token_types: list[int] | None = field(default=None, repr=False)
    scores: list[float] | None = field(default=None, repr=False)
    merges: list[str] | None = field(default=None, repr=False)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    unk_token_id: int | None = None
    pad_token_id: int | None = None
    eot_token_id: int | None = None  # end of turn, e.g. <|eot_id|>
    eom_token_id: int | None = None  # end of message (tool call), e.g. <|eom_id|>
    add_bos_token: bool | None = None
    add_eos_token: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | None = field(default=None, repr=False)
    architecture: str | None = None


def _field_value_type(reader_field: ReaderField) -> GGUFValueType:
    return reader_field.types[0]


def _read_scalar(reader: GGUFReader, key: str) -> Any:
    """A scalar or string value, or None when the key is absent."""
    from gguf import GGUFValueType

    reader_field = reader.get_field(key)
    if reader_field is None:
        return None
    value_type = _field_value_type(reader_field)
    if value_type == GGUFValueType.ARRAY:
        raise ValueError(f"GGUF key {key!r} is an array, expected a single value")
    value = reader_field.parts[reader_field.data[0]]
    if value_type == GGUFValueType.STRING:
        return value.tobytes().decode("utf-8")
    return value[0].item()


def _read_string_array(reader: GGUFReader, key: str) -> list[str] | None:
    from gguf import GGUFValueType

    reader_field = reader.get_field(key)
    if reader_field is None:
        return None
    if reader_field.types[:1] != [GGUFValueType.ARRAY] or (
        len(reader_field.data) and reader_field.types[-1] != GGUFValueType.STRING
    ):
        raise ValueError(f"GGUF key {key!r} is not an array of strings")
    parts = reader_field.parts
    # Tokens are UTF-8 in every converter we know of; "replace" keeps a damaged
    # file loadable instead of failing on one bad token.
    return [parts[index].tobytes().decode("utf-8", errors="replace") for index in reader_field.data]


def _read_numeric_array(reader: GGUFReader, key: str) -> np.ndarray | None:
    from gguf import GGUFValueType

    reader_field = reader.get_field(key)
    if reader_field is None:
        return None
    if reader_field.types[:1] != [GGUFValueType.ARRAY]:
        raise ValueError(f"GGUF key {key!r} is not an array")
    if not reader_field.data:
        return np.zeros(0)
    if reader_field.types[-1] == GGUFValueType.STRING:
        raise ValueError(f"GGUF key {key!r} is an array of strings, expected numbers")
    # Each element is its own one-item view into the file; one concatenate is
    # far cheaper than converting 50k numpy scalars one by one.
    return np.concatenate([reader_field.parts[index] for index in reader_field.data])


def _optional_bool(value: Any) -> bool | None:
    return None if value is None else bool(value)


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def read_gguf_vocab(reader: GGUFReader) -> GGUFVocab:
    """Collect the `tokenizer.ggml.*` metadata of an open GGUF file.

    Raises ValueError when the file carries no tokenizer.
    """
    model = _read_scalar(reader, "tokenizer.ggml.model")
    tokens = _read_string_array(reader, "tokenizer.ggml.tokens")
    if model is None or tokens is None:
        raise ValueError("GGUF file has no tokenizer (tokenizer.ggml.model/tokens missing)")
    token_types = _read_numeric_array(reader, "tokenizer.ggml.token_type")
    scores = _read_numeric_array(reader, "tokenizer.ggml.scores")
    for name, array in (("token_type", token_types), ("scores", scores)):
        if array is not None and len(array) != len(tokens):
            raise ValueError(
                f"GGUF tokenizer.ggml.{name} has {len(array)} entries for {len(tokens)} tokens"
            )

    def token_id(key: str) -> int | None:
        value = _optional_int(_read_scalar(reader, f"tokenizer.ggml.{key}"))
        # Some converters write -1 or an out-of-range id to mean "none".
        return value if value is not None and 0 <= value < len(tokens) else None

    return GGUFVocab(
        model=model,
        pre=_read_scalar(reader, "tokenizer.ggml.pre"),
        tokens=tokens,
        token_types=None if token_types is None else token_types.astype(np.int64).tolist(),
        scores=None if scores is None else scores.astype(np.float64).tolist(),
        merges=_read_string_array(reader, "tokenizer.ggml.merges"),
        bos_token_id=token_id("bos_token_id"),
        eos_token_id=token_id("eos_token_id"),
        unk_token_id=token_id("unknown_token_id"),
        pad_token_id=token_id("padding_token_id"),
        eot_token_id=token_id("eot_token_id"),
        eom_token_id=token_id("eom_token_id"),
        add_bos_token=_optional_bool(_read_scalar(reader, "tokenizer.ggml.add_bos_token")),
        add_eos_token=_optional_bool(_read_scalar(reader, "tokenizer.ggml.add_eos_token")),
        add_space_prefix=_optional_bool(_read_scalar(reader, "tokenizer.ggml.add_space_prefix")),
        chat_template=_read_scalar(reader, "tokenizer.chat_template"),
        architecture=_read_scalar(reader, "general.architecture"),
    )
