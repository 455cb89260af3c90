"""Byte-level ("gpt2") GGUF vocabularies built by hand: reading the metadata,
choosing the word-splitting regex from `tokenizer.ggml.pre`, special and
user-defined tokens, BOS/EOS flags and merges; and loading the same vocabulary
back from a Hugging Face directory (tokenizer.json + tokenizer_config.json)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from tokenmill.tokenizer import IncrementalDetokenizer, Tokenizer, TokenType, read_gguf_vocab
from tokenmill.tokenizer.gguf_builder import (
    _split_merge,
    byte_level_pre_tokenizer,
    merges_from_priorities,
)


def byte_alphabet() -> list[str]:
    """GPT-2's spelling of the 256 bytes: printable Latin-1 bytes stand for
    themselves, the others are shifted to code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    spelling = {}
    shifted = 0
    for byte in range(256):
        if byte in printable:
            spelling[byte] = chr(byte)
        else:
            spelling[byte] = chr(256 + shifted)
            shifted += 1
    return [spelling[byte] for byte in range(256)]


BYTES = byte_alphabet()
SPACE = "Ġ"
assert BYTES[ord(" ")] == SPACE
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d"]
MERGED = ["he", "ll", "hell", "hello", "Ġw", "or", "Ġwor", "Ġworl", "Ġworld"]
SPECIAL = ["<|end|>", "<|start|>", "<think>"]
TOKENS = BYTES + MERGED + SPECIAL
TYPES = [TokenType.NORMAL] * (256 + len(MERGED)) + [
    TokenType.CONTROL,
    TokenType.CONTROL,
    TokenType.USER_DEFINED,
]
END, START, THINK = (TOKENS.index(token) for token in SPECIAL)


def write_byte_level_gguf(
    path: Path, *, pre: str | None = "gpt2", merges: bool = True, **flags
) -> Path:
    writer = GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(TOKENS)
    writer.add_token_types(TYPES)
    if merges:
        writer.add_token_merges(MERGES)
    writer.add_bos_token_id(START)
    writer.add_eos_token_id(END)
    if "add_bos" in flags:
        writer.add_add_bos_token(flags["add_bos"])
    if "add_eos" in flags:
        writer.add_add_eos_token(flags["add_eos"])
    writer.add_tensor("token_embd.weight", np.zeros((len(TOKENS), 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory) -> Path:
    return write_byte_level_gguf(tmp_path_factory.mktemp("bpe") / "bpe.gguf")


@pytest.fixture(scope="module")
def tokenizer(gguf_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf_file(gguf_path)


def test_read_gguf_vocab(gguf_path: Path) -> None:
    vocab = read_gguf_vocab(GGUFReader(str(gguf_path)))
    assert vocab.model == "gpt2" and vocab.pre == "gpt2"
    assert vocab.tokens == TOKENS
    assert vocab.token_types == [int(kind) for kind in TYPES]
    assert vocab.merges == MERGES
    assert (vocab.bos_token_id, vocab.eos_token_id) == (START, END)
    assert vocab.unk_token_id is None and vocab.scores is None
    assert vocab.add_bos_token is None and vocab.chat_template is None
    assert vocab.architecture == "llama"


def test_merges_and_special_tokens(tokenizer: Tokenizer) -> None:
    tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode("hello world<|end|>"))
    assert tokens == ["hello", f"{SPACE}world", "<|end|>"]
    assert tokenizer.encode("<think>hello") == [THINK, TOKENS.index("hello")]
    assert tokenizer.all_special_ids == sorted([START, END])
    assert tokenizer.eos_token_ids == (END,)
    assert tokenizer.vocab_size == len(TOKENS)
    assert not tokenizer.has_chat_template
    # Control tokens are dropped by default; user-defined ones are text.
    ids = tokenizer.encode("<|start|>a<think>b<|end|>")
    assert tokenizer.decode(ids) == "a<think>b"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<|start|>a<think>b<|end|>"


def test_any_text_round_trips(tokenizer: Tokenizer) -> None:
    for text in ["naïve 日本 👍🏽\n\t", "\x00\x01 control bytes", "   ", "hello hello"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_missing_merges_are_derived_from_token_order(tmp_path: Path, tokenizer: Tokenizer) -> None:
    derived = Tokenizer.from_gguf_file(write_byte_level_gguf(tmp_path / "m.gguf", merges=False))
    for text in ["hello world", "he ll o", "worldhello world"]:
        assert derived.encode(text) == tokenizer.encode(text)


def test_bos_and_eos_flags(tmp_path: Path) -> None:
    both = Tokenizer.from_gguf_file(
        write_byte_level_gguf(tmp_path / "f.gguf", add_bos=True, add_eos=True)
    )
    plain = both.encode("hello", add_special_tokens=False)
    assert both.encode("hello") == [START, *plain, END]
    assert both.decode(both.encode("hello")) == "hello"


def test_incremental_detokenizer_on_byte_tokens(tokenizer: Tokenizer) -> None:
    text = "hello 日本 👍🏽 world"
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("<|start|>"))
    deltas = [detok.add_tokens([token_id]) for token_id in ids]
    assert "".join(deltas) + detok.flush() == text
    assert not any("\ufffd" in delta for delta in deltas)
    assert deltas.count("") >= 6  # the bytes of 日, 本, 👍 and 🏽 were held back


# ------------------------------------------------------------ pre-tokenizers


def _words(pre: str | None, text: str) -> list[str]:
    return [word for word, _ in byte_level_pre_tokenizer(pre).pre_tokenize_str(text)]


def test_pre_tokenizer_regexes() -> None:
    text = "$hello 12345"
    assert _words("smollm", text) == ["$", "hello", SPACE, "1", "2", "3", "4", "5"]
    assert _words("qwen2", text) == ["$hello", SPACE, "1", "2", "3", "4", "5"]
    assert _words("llama-bpe", text) == ["$hello", SPACE, "123", "45"]
    assert _words("gpt2", text) == ["$", "hello", f"{SPACE}12345"]
    assert _words(None, text) == _words("gpt2", text)
    assert _words("qwen2", "a\n\n  b") == ["a", "ĊĊ", SPACE, f"{SPACE}b"]


def test_unknown_pre_tokenizer_falls_back_to_gpt2(caplog) -> None:
    assert _words("some-future-model", "it's 42") == _words("gpt2", "it's 42")
    assert "some-future-model" in caplog.text


# ------------------------------------------------------------ merge helpers


def test_merges_from_priorities_orders_by_joined_token() -> None:
    tokens = ["a", "b", "c", "ab", "bc", "abc", "<x>"]
    priorities = [0, 0, 0, -3, -1, -2, 5]
    mergeable = [True] * 6 + [False]
    assert merges_from_priorities(tokens, priorities, mergeable) == [
        ("b", "c"),
        ("a", "bc"),
        ("ab", "c"),
        ("a", "b"),
    ]


def test_split_merge_with_spaces_inside_tokens() -> None:
    vocab = {"a": 0, " b": 1, "a b": 2, "x": 3, "y": 4, "xy": 5}
    assert _split_merge("x y", vocab) == ("x", "y")
    assert _split_merge("a  b", vocab) == ("a", " b")
    with pytest.raises(ValueError, match="cannot split"):
        _split_merge("p q r", vocab)


def test_unsupported_tokenizer_model(tmp_path: Path) -> None:
    writer = GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
    writer.add_tokenizer_model("bert")
    writer.add_token_list(["[CLS]", "a"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer model 'bert'"):
        Tokenizer.from_gguf_file(tmp_path / "bert.gguf")


def test_file_without_tokenizer(tmp_path: Path) -> None:
    writer = GGUFWriter(str(tmp_path / "bare.gguf"), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(ValueError, match="no tokenizer"):
        Tokenizer.from_path(tmp_path / "bare.gguf")


# ------------------------------------------------------------ HF directory


def _hf_dir(tmp_path: Path, tokenizer: Tokenizer, config: dict, generation: dict | None) -> Path:
    tmp_path.mkdir(exist_ok=True)
    tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    return tmp_path


def test_hf_dir_config_forms(tmp_path: Path) -> None:
    with_bos = Tokenizer.from_gguf_file(write_byte_level_gguf(tmp_path / "b.gguf", add_bos=True))
    assert with_bos.encode("hello")[0] == START
    config = {
        "bos_token": {"content": "<|start|>", "special": True},
        "eos_token": "<|end|>",
        "add_bos_token": False,  # overrides the saved post-processor
        "chat_template": [
            {"name": "default", "template": "D{{ messages | length }}"},
            {"name": "tool_use", "template": "T{{ tools | length }}"},
        ],
    }
    directory = _hf_dir(tmp_path / "hf", with_bos, config, {"eos_token_id": THINK})
    loaded = Tokenizer.from_path(directory)
    assert (loaded.bos_token_id, loaded.eos_token_ids) == (START, (END, THINK))
    assert loaded.encode("hello") == loaded.encode("hello", add_special_tokens=False)
    messages = [{"role": "user", "content": "x"}]
    assert loaded.apply_chat_template(messages) == "D1"
    assert loaded.apply_chat_template(messages, tools=[{"type": "function"}]) == "T1"
    # A chat_template.jinja file takes precedence, and an explicit template beats both.
    (directory / "chat_template.jinja").write_text("J")
    assert Tokenizer.from_hf_dir(directory).apply_chat_template(messages) == "J"
    assert Tokenizer.from_hf_dir(directory, chat_template="X").apply_chat_template(messages) == "X"


def test_hf_dir_without_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
