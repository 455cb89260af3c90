"""SentencePiece-style ("llama") GGUF vocabularies.

A tiny SentencePiece BPE model is trained in the test (byte fallback on, like
Llama 2), written into a GGUF with `gguf.GGUFWriter`, and our tokenizer built
from that file is compared with the `sentencepiece` library itself, with
transformers' reading of the same GGUF, and with expectations derived by hand
from a handmade vocabulary.

Text that contains special tokens follows llama.cpp: each stretch of text
between special tokens is encoded as SentencePiece would encode it alone (so it
gets its own dummy-prefix "▁"). transformers instead adds "▁" only at the very
start, and Metaspace never doubles a leading space; those cases are checked
against sentencepiece/hand expectations, not transformers.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest

from tokenmill.tokenizer import IncrementalDetokenizer, Tokenizer, TokenType

spm = pytest.importorskip("sentencepiece")
gguf = pytest.importorskip("gguf")

CORPUS = [
    "Hello world, this is a tiny corpus for training a tokenizer.",
    "The quick brown fox jumps over the lazy dog 12345.",
    "Tokenizers split text into pieces; merges join them back.",
    "日本語のテキストも少し。",
    "Café naïve résumé façade.",
    "def foo(x):\n    return x * 2\n",
    "  indented   spaces\tand tabs",
    "hello hello hello world world the the the",
]

TEXTS = [
    "Hello world",
    "hello hello the world",
    "The quick brown fox 12345",
    "trailing  ",
    "a\nb\n\nc",
    "日本語のテキスト",
    "€ unknown ☃ chars",  # not in the vocabulary: byte fallback
    "Café naïve",
    "👍🏽 emoji",
    "\t tab",
    "",
    " ",
    " leading",
    "  two leading",
]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
    "{{ eos_token }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
)


def write_llama_gguf(
    path: Path,
    tokens: list[str],
    scores: list[float],
    types: list[int],
    *,
    bos: int | None = None,
    eos: int | None = None,
    unk: int | None = None,
    add_bos: bool | None = True,
    add_space_prefix: bool | None = True,
    chat_template: str | None = None,
) -> Path:
    """A GGUF holding a "llama" tokenizer (and one tiny tensor, so that readers
    that expect a model accept it)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    for setter, value in (
        (writer.add_bos_token_id, bos),
        (writer.add_eos_token_id, eos),
        (writer.add_unk_token_id, unk),
        (writer.add_add_bos_token, add_bos),
        (writer.add_add_space_prefix, add_space_prefix),
        (writer.add_chat_template, chat_template),
    ):
        if value is not None:
            setter(value)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(sentencepiece processor, GGUF path) for a freshly trained BPE model."""
    from sentencepiece import sentencepiece_model_pb2

    model_bytes = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20),
        model_writer=model_bytes,
        vocab_size=420,
        model_type="bpe",
        byte_fallback=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        character_coverage=1.0,
        user_defined_symbols=["<tool>"],
        hard_vocab_limit=False,
        minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_proto=model_bytes.getvalue())
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes.getvalue())
    directory = tmp_path_factory.mktemp("spm")
    path = write_llama_gguf(
        directory / "tiny-spm.gguf",
        [piece.piece for piece in proto.pieces],
        [piece.score for piece in proto.pieces],
        [piece.type for piece in proto.pieces],
        bos=processor.bos_id(),
        eos=processor.eos_id(),
        unk=processor.unk_id(),
        chat_template=CHAT_TEMPLATE,
    )
    return processor, path


@pytest.fixture(scope="module")
def tokenizer(trained) -> Tokenizer:
    return Tokenizer.from_gguf_file(trained[1])


def test_special_tokens(tokenizer: Tokenizer, trained) -> None:
    processor, _ = trained
    assert (tokenizer.bos_token_id, tokenizer.eos_token_ids) == (1, (2,))
    assert tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>"
    assert tokenizer.unk_token_id == 0
    assert tokenizer.all_special_ids == [0, 1, 2]
    assert not tokenizer.is_special(3)  # <tool> is user-defined: whole, but not special
    assert tokenizer.vocab_size == processor.get_piece_size()


@pytest.mark.parametrize("text", TEXTS)
def test_matches_sentencepiece(tokenizer: Tokenizer, trained, text: str) -> None:
    processor, _ = trained
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids == processor.encode(text)
    assert tokenizer.decode(ids) == processor.decode(ids)
    assert tokenizer.encode(text) == [1, *ids]  # add_bos_token


def test_matches_sentencepiece_on_random_text(tokenizer: Tokenizer, trained) -> None:
    processor, _ = trained
    rng = random.Random(0)
    alphabet = "abcdefhiklmnorstuw THE  \n\t.,;:!?'\"()0123456789éïçà日本語のテキスト€☃👍"
    words = ["hello", "world", "the", "quick", "brown", "tokenizers", "merges", "Café", "naïve"]
    for index in range(500):
        if index % 2:
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        else:
            text = " ".join(rng.choice(words) + rng.choice(["", ",", " "]) for _ in range(6))
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == processor.encode(text), text
        assert tokenizer.decode(ids) == processor.decode(ids) == text


def test_byte_fallback(tokenizer: Tokenizer) -> None:
    tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode("€", add_special_tokens=False))
    assert tokens == ["▁", "<0xE2>", "<0x82>", "<0xAC>"]
    assert tokenizer.decode(tokenizer.encode("€")) == "€"


def test_text_around_special_tokens_follows_llama_cpp(tokenizer: Tokenizer, trained) -> None:
    processor, _ = trained
    # Each stretch between special tokens is encoded alone, with its own "▁".
    assert tokenizer.encode("<s>Hello</s>", add_special_tokens=False) == [
        1,
        *processor.encode("Hello"),
        2,
    ]
    tool = tokenizer.token_to_id("<tool>")
    assert tool == 3
    assert tokenizer.encode("hello <tool> world", add_special_tokens=False) == [
        *processor.encode("hello "),
        tool,
        *processor.encode(" world"),
    ]
    ids = tokenizer.encode("<s>Hello</s>", add_special_tokens=False)
    assert tokenizer.decode(ids) == "Hello"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<s> Hello</s>"
    assert tokenizer.decode(tokenizer.encode("a<tool>b")) == "a<tool> b"  # user-defined kept


def test_matches_transformers(tokenizer: Tokenizer, trained) -> None:
    transformers = pytest.importorskip("transformers")
    path = trained[1]
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # Leading whitespace and text after special tokens differ on purpose (see module doc).
    for text in [t for t in TEXTS if not t[:1].isspace()]:
        ids = tokenizer.encode(text)
        assert ids == reference.encode(text), text
        assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True)
        assert tokenizer.decode(ids, skip_special_tokens=False) == reference.decode(ids)


def test_chat_template_from_gguf(tokenizer: Tokenizer) -> None:
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages) == "<s>[user] hi</s>[assistant]"
    without_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    assert without_prompt == "<s>[user] hi</s>"
    assert tokenizer.encode_chat(messages)[:2] == [1, tokenizer.encode("[", False)[0]]


# ------------------------------------------------------------ handmade vocabulary


HAND_TOKENS = (
    ["<unk>", "<s>", "</s>"]
    + [f"<0x{byte:02X}>" for byte in range(256)]
    + [
        "▁",
        "a",
        "b",
        "c",
        "ab",
        "bc",
        "▁a",
        "▁abc",
        "abc",
    ]
)
HAND_SCORES = [0.0] * 259 + [-1.0, -2.0, -2.0, -2.0, -5.0, -3.0, -4.0, -0.5, -6.0]
HAND_TYPES = (
    [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    + [TokenType.BYTE] * 256
    + [TokenType.NORMAL] * 9
)


@pytest.fixture(scope="module")
def hand_tokenizers(tmp_path_factory) -> tuple[Tokenizer, Tokenizer]:
    directory = tmp_path_factory.mktemp("hand")
    built = []
    for prefix in (True, False):
        path = write_llama_gguf(
            directory / f"hand-{prefix}.gguf",
            HAND_TOKENS,
            HAND_SCORES,
            HAND_TYPES,
            bos=1,
            eos=2,
            unk=0,
            add_bos=None,
            add_space_prefix=prefix,
        )
        built.append(Tokenizer.from_gguf_file(path))
    return built[0], built[1]


def _best_score_first(text: str, token: dict[str, int]) -> list[int]:
    """SentencePiece BPE by its definition: start from characters, and keep
    joining the adjacent pair whose join is the best-scored piece (leftmost on
    ties). Only used with texts whose characters are all pieces."""
    symbols = list("▁" + text.replace(" ", "▁"))
    while True:
        best = None
        for i in range(len(symbols) - 1):
            joined = symbols[i] + symbols[i + 1]
            if joined in token:
                score = HAND_SCORES[token[joined]]
                if best is None or score > best[0]:
                    best = (score, i)
        if best is None:
            return [token[symbol] for symbol in symbols]
        i = best[1]
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]


def test_merges_follow_scores(hand_tokenizers) -> None:
    with_prefix, _ = hand_tokenizers
    token = {text: index for index, text in enumerate(HAND_TOKENS)}
    # "bc" (-3) beats "ab" (-5) so "abc" = a + bc; "▁abc" (-0.5) then wins
    # over everything once "▁a" (-4) and "bc" exist: ▁ a b c -> ▁ a bc -> ▁a bc -> ▁abc.
    assert with_prefix.encode("abc", False) == [token["▁abc"]]
    # c a b c -> c a bc -> c abc ("abc" = a + bc exists); "▁c" is no piece.
    assert with_prefix.encode("cabc", False) == [token["▁"], token["c"], token["abc"]]
    for text in ["abc", "cabc", "ab ab", "bcab", "aabbcc", "abcabc abc", "c b a"]:
        assert with_prefix.encode(text, False) == _best_score_first(text, token), text
    # A missing add_bos_token means "add BOS" for SentencePiece vocabularies.
    assert with_prefix.encode("ab")[0] == 1
    # "d" is not a piece: its byte token stands in.
    assert with_prefix.convert_ids_to_tokens(with_prefix.encode("ad", False)) == ["▁a", "<0x64>"]
    assert with_prefix.decode(with_prefix.encode("ad")) == "ad"


def test_without_space_prefix(hand_tokenizers) -> None:
    _, no_prefix = hand_tokenizers
    token = {text: index for index, text in enumerate(HAND_TOKENS)}
    assert no_prefix.encode("abc", False) == [token["abc"]]  # no "▁" in front
    assert no_prefix.encode("a abc", False) == [token["a"], token["▁abc"]]
    assert no_prefix.decode(no_prefix.encode(" abc")) == " abc"  # nothing stripped


# ------------------------------------------------------------ streaming decode


def _stream(tokenizer: Tokenizer, ids: list[int], prompt: list[int], chunk: int = 1) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.add_tokens(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("chunk", [1, 3])
def test_stream_without_prompt_equals_decode(tokenizer: Tokenizer, chunk: int) -> None:
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        deltas = _stream(tokenizer, ids, [], chunk)
        assert "".join(deltas) == tokenizer.decode(ids)
        if "\ufffd" not in text:
            assert not any("\ufffd" in delta for delta in deltas)


def test_stream_after_prompt_keeps_leading_space(tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode("The quick brown")
    for text in [" fox jumps", " 日本語 👍🏽 €", "\nhello world"]:
        generated = tokenizer.encode(text, add_special_tokens=False)[1:]  # drop the dummy "▁"
        deltas = _stream(tokenizer, generated, prompt)
        full = tokenizer.decode(prompt + generated)
        assert "".join(deltas) == full[len(tokenizer.decode(prompt)) :]
        assert not any("\ufffd" in delta for delta in deltas)
    first = _stream(tokenizer, tokenizer.encode(" fox", False)[1:], prompt)
    assert "".join(first).startswith(" f")
