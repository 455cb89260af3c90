"""Build a `tokenizers.Tokenizer` from the vocabulary stored in a GGUF file.

Two tokenizer models cover the Llama family and its relatives:

* ``gpt2`` -- byte-level BPE (SmolLM2, Qwen2, Llama 3). Tokens are spelled in
  GPT-2's byte-to-unicode alphabet and the file lists the merges. What varies
  between models is the regex that cuts text into words before BPE runs; the
  file names it in ``tokenizer.ggml.pre``.
* ``llama`` -- SentencePiece BPE (Llama 2, Mistral, TinyLlama). Tokens use ``▁``
  for spaces, carry scores, and ``<0x00>``..``<0xFF>`` byte tokens stand in for
  characters outside the vocabulary. There are no merges: SentencePiece (and
  llama.cpp) repeatedly join the adjacent pair whose joined piece has the best
  score, so we derive BPE merges ranked by that score, which makes a standard
  BPE model take the same steps.

Control tokens (and the unknown token) become special added tokens, so they are
matched whole in text and dropped by ``decode(skip_special_tokens=True)``;
user-defined tokens become ordinary added tokens, matched whole but kept.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from tokenmill.tokenizer.gguf_vocab import GGUFVocab, TokenType

logger = logging.getLogger(__name__)

SPIECE_SPACE = "\u2581"  # "▁", SentencePiece's visible space

# Word-splitting regexes, written out from the models' own tokenizer configs.
# Qwen2: single digits, letters with at most one leading non-letter, newline runs.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama 3: like Qwen2 but numbers in groups of up to three digits.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# `tokenizer.ggml.pre` names, grouped by the splitting they stand for (names as
# llama.cpp's converter writes them).
_DIGITS_THEN_GPT2_PRE = frozenset(
    {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
)
_QWEN2_PRE = frozenset({"qwen2", "deepseek-r1-qwen", "megrez"})
_LLAMA3_PRE = frozenset({"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"})
# Llama 3's reference tokenizer takes a whole word that is itself a token
# without running merges; llama.cpp does the same for this pre-tokenizer.
_IGNORE_MERGES_PRE = frozenset({"llama3", "llama-v3", "llama-bpe"})
_GPT2_PRE = frozenset({"default", "gpt2", "gpt-2"})

SUPPORTED_TOKENIZER_MODELS = ("gpt2", "llama")


def byte_level_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    """The word splitting a byte-level BPE vocabulary was trained with.

    Unknown names fall back to GPT-2's regex (with a warning): right for many
    older vocabularies, and a near miss for the rest.
    """
    if pre in _DIGITS_THEN_GPT2_PRE:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    for names, pattern in ((_QWEN2_PRE, _QWEN2_SPLIT), (_LLAMA3_PRE, _LLAMA3_SPLIT)):
        if pre in names:
            return pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
    if pre is not None and pre not in _GPT2_PRE:
        logger.warning("unknown GGUF pre-tokenizer %r; splitting words with GPT-2's regex", pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _first_ids(tokens: Sequence[str]) -> dict[str, int]:
    """Token -> id. A few files repeat a token (padding fillers); the first id wins."""
    vocab: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        vocab.setdefault(token, token_id)
    return vocab


def _split_merge(merge: str, vocab: dict[str, int]) -> tuple[str, str]:
    left, _, right = merge.partition(" ")
    if " " not in right:
        return left, right
    # A token spelled with a literal space makes the split ambiguous: take the
    # split whose two halves and whose join are all tokens.
    for cut, char in enumerate(merge):
        if char != " ":
            continue
        left, right = merge[:cut], merge[cut + 1 :]
        if left in vocab and right in vocab and left + right in vocab:
            return left, right
    raise ValueError(f"cannot split GGUF merge {merge!r} into two tokens")


def merges_from_priorities(
    tokens: Sequence[str], priorities: Sequence[float], mergeable: Sequence[bool]
) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary: every way to cut a mergeable token into
    two mergeable tokens, best priority of the joined token first.

    With SentencePiece scores as priorities, BPE applying these merges in rank
    order takes the same steps as SentencePiece's best-score-first joining.
    """
    index: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        if mergeable[token_id]:
            index.setdefault(token, token_id)
    found: list[tuple[float, int, int, str, str]] = []
    for token, token_id in index.items():
        for cut in range(1, len(token)):
            left_id = index.get(token[:cut])
            if left_id is None:
                continue
            right_id = index.get(token[cut:])
            if right_id is not None:
                found.append((-priorities[token_id], left_id, right_id, token[:cut], token[cut:]))
    found.sort()
    return [(left, right) for _, _, _, left, right in found]


def _token_types(vocab: GGUFVocab) -> list[int]:
    if vocab.token_types is not None:
        return vocab.token_types
    return [TokenType.NORMAL] * len(vocab.tokens)


def _bpe(**kwargs: Any) -> BPE:
    try:
        return BPE(**kwargs)
    except Exception as error:  # tokenizers raises a bare Exception on bad input
        raise ValueError(f"GGUF vocabulary is inconsistent: {error}") from error


def _byte_level_backend(vocab: GGUFVocab) -> HFTokenizer:
    token_ids = _first_ids(vocab.tokens)
    if vocab.merges is not None:
        merges = [_split_merge(merge, token_ids) for merge in vocab.merges]
    else:
        # No merges stored: byte-level vocabularies are ordered by merge, so a
        # lower id means an earlier merge.
        types = _token_types(vocab)
        merges = merges_from_priorities(
            vocab.tokens,
            [-float(token_id) for token_id in range(len(vocab.tokens))],
            [token_type == TokenType.NORMAL for token_type in types],
        )
    model = _bpe(
        vocab=token_ids,
        merges=merges,
        ignore_merges=vocab.pre in _IGNORE_MERGES_PRE,
    )
    backend = HFTokenizer(model)
    if vocab.pre in _QWEN2_PRE:
        # Qwen2's reference tokenizer composes characters (NFC) before splitting.
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = byte_level_pre_tokenizer(vocab.pre)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(vocab: GGUFVocab) -> HFTokenizer:
    token_ids = _first_ids(vocab.tokens)
    types = _token_types(vocab)
    has_byte_tokens = any(token_type == TokenType.BYTE for token_type in types)
    if vocab.scores is not None:
        # Score-ranked merges are what llama.cpp's SentencePiece tokenizer uses
        # even when the file also lists merges.
        merges = merges_from_priorities(
            vocab.tokens,
            vocab.scores,
            [token_type == TokenType.NORMAL for token_type in types],
        )
    elif vocab.merges is not None:
        merges = [_split_merge(merge, token_ids) for merge in vocab.merges]
    else:
        raise ValueError("GGUF 'llama' tokenizer has neither scores nor merges")
    unk_token = None if vocab.unk_token_id is None else vocab.tokens[vocab.unk_token_id]
    model = _bpe(
        vocab=token_ids,
        merges=merges,
        unk_token=unk_token,
        fuse_unk=True,
        byte_fallback=has_byte_tokens,
    )
    backend = HFTokenizer(model)
    add_space_prefix = True if vocab.add_space_prefix is None else vocab.add_space_prefix
    # A normalizer (rather than the Metaspace pre-tokenizer) because it adds the
    # dummy "▁" even when the text already starts with a space, as SentencePiece
    # and llama.cpp do, and adds it again to each piece of text that follows a
    # special token, as llama.cpp does.
    to_spiece = normalizers.Replace(" ", SPIECE_SPACE)
    backend.normalizer = (
        normalizers.Sequence([normalizers.Prepend(SPIECE_SPACE), to_spiece])
        if add_space_prefix
        else to_spiece
    )
    steps = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _add_gguf_special_tokens(backend: HFTokenizer, vocab: GGUFVocab) -> None:
    special: list[AddedToken] = []
    user_defined: list[AddedToken] = []
    for token, token_type in zip(vocab.tokens, _token_types(vocab), strict=True):
        if token_type in (TokenType.CONTROL, TokenType.UNKNOWN):
            special.append(AddedToken(token, special=True, normalized=False))
        elif token_type == TokenType.USER_DEFINED:
            user_defined.append(AddedToken(token, special=False, normalized=False))
    # The contents are already in the model's vocabulary, so these keep their
    # ids; registering them only makes the text matcher find them whole.
    backend.add_special_tokens(special)
    backend.add_tokens(user_defined)


def bos_eos_post_processor(
    bos: tuple[str, int] | None, eos: tuple[str, int] | None
) -> processors.TemplateProcessing:
    """A post-processor that wraps each sequence in BOS and/or EOS."""
    single = (["BOS"] if bos else []) + ["$A"] + (["EOS"] if eos else [])
    pair = single + (["BOS:1"] if bos else []) + ["$B:1"] + (["EOS:1"] if eos else [])
    special_tokens = []
    for alias, token in (("BOS", bos), ("EOS", eos)):
        if token is not None:
            special_tokens.append({"id": alias, "ids": [token[1]], "tokens": [token[0]]})
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special_tokens)


def default_add_bos(vocab: GGUFVocab) -> bool:
    """llama.cpp's default: SentencePiece vocabularies add BOS unless told not to."""
    if vocab.add_bos_token is not None:
        return vocab.add_bos_token
    return vocab.model == "llama"


def build_gguf_backend(vocab: GGUFVocab) -> HFTokenizer:
    """A ready `tokenizers.Tokenizer` (model, splitting, decoder, special tokens,
    BOS/EOS post-processing) for a GGUF vocabulary."""
    if vocab.model == "gpt2":
        backend = _byte_level_backend(vocab)
    elif vocab.model == "llama":
        backend = _sentencepiece_backend(vocab)
    else:
        raise ValueError(
            f"unsupported GGUF tokenizer model {vocab.model!r}; "
            f"supported: {', '.join(SUPPORTED_TOKENIZER_MODELS)}"
        )
    _add_gguf_special_tokens(backend, vocab)
    add_bos = default_add_bos(vocab) and vocab.bos_token_id is not None
    add_eos = bool(vocab.add_eos_token) and vocab.eos_token_id is not None
    if add_bos or add_eos:
        backend.post_processor = bos_eos_post_processor(
            (vocab.tokens[vocab.bos_token_id], vocab.bos_token_id) if add_bos else None,
            (vocab.tokens[vocab.eos_token_id], vocab.eos_token_id) if add_eos else None,
        )
    return backend
