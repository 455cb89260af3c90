"""Tokenization: `Tokenizer` (HF directory or GGUF metadata, chat templates) and
`IncrementalDetokenizer` (streaming text deltas)."""

from tokenmill.tokenizer.chat_template import CHATML_TEMPLATE, ChatTemplate, normalize_messages
from tokenmill.tokenizer.detokenizer import IncrementalDetokenizer
from tokenmill.tokenizer.gguf_vocab import GGUFVocab, TokenType, read_gguf_vocab
from tokenmill.tokenizer.tokenizer import Tokenizer

__all__ = [
    "CHATML_TEMPLATE",
    "ChatTemplate",
    "GGUFVocab",
    "IncrementalDetokenizer",
    "TokenType",
    "Tokenizer",
    "normalize_messages",
    "read_gguf_vocab",
]
