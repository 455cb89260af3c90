"""Build response bodies in the exact shapes of the OpenAI API.

Everything here is a pure function from plain values to dicts, so the shapes can be
read (and tested) in one place: chat completions and their stream chunks, text
completions and theirs, usage, and the two logprob layouts OpenAI uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenmill.outputs import TokenLogprob

TokenText = Callable[[int], str]
"""Maps a token id to the text of that token (used for logprob entries)."""

# JSON has no -inf; OpenAI-compatible servers send a large negative number instead.
MIN_LOGPROB = -9999.0


@dataclass
class ChoiceResult:
    """One finished choice of a non-streamed response."""

    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # chat: parsed tool calls
    reasoning_content: str | None = None  # chat with a reasoning parser


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def clamp_logprob(value: float) -> float:
    if math.isnan(value) or value < MIN_LOGPROB:
        return MIN_LOGPROB
    return float(value)


def _chat_token_entry(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": clamp_logprob(logprob), "bytes": list(text.encode())}


def chat_logprobs(
    entries: Sequence[TokenLogprob], top_n: int, token_text: TokenText
) -> dict[str, Any]:
    """``choices[].logprobs`` of a chat completion: ``{"content": [...], "refusal": None}``."""
    content = []
    for entry in entries:
        item = _chat_token_entry(token_text(entry.token_id), entry.logprob)
        item["top_logprobs"] = [
            _chat_token_entry(token_text(tid), lp) for tid, lp in entry.top[:top_n]
        ]
        content.append(item)
    return {"content": content, "refusal": None}


def completion_logprobs(
    entries: Sequence[TokenLogprob], top_n: int, token_text: TokenText, text_offset: int
) -> tuple[dict[str, Any], int]:
    """``choices[].logprobs`` of a text completion, and the text offset after these tokens."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for entry in entries:
        text = token_text(entry.token_id)
        tokens.append(text)
        token_logprobs.append(clamp_logprob(entry.logprob))
        offsets.append(text_offset)
        text_offset += len(text)
        top: dict[str, float] = {}
        for tid, lp in entry.top[:top_n]:
            top.setdefault(token_text(tid), clamp_logprob(lp))
        tops.append(top)
    body = {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": tops,
        "text_offset": offsets,
    }
    return body, text_offset


def chat_completion(
    response_id: str,
    created: int,
    model: str,
    choices: Sequence[ChoiceResult],
    usage: dict[str, Any],
    top_logprobs: int | None,
    token_text: TokenText,
    with_reasoning: bool = False,
) -> dict[str, Any]:
    """A ``chat.completion``; ``with_reasoning`` adds ``reasoning_content`` to messages."""
    out_choices = []
    for choice in choices:
        logprobs = None
        if top_logprobs is not None:
            logprobs = chat_logprobs(choice.logprobs or [], top_logprobs, token_text)
        out_choices.append({
            "index": choice.index,
            "message": chat_message(choice, with_reasoning),
            "logprobs": logprobs,
            "finish_reason": choice.finish_reason,
        })
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": out_choices,
        "usage": usage,
    }


def chat_message(choice: ChoiceResult, with_reasoning: bool = False) -> dict[str, Any]:
    """The assistant message of a choice: content (null when only tools were called),
    tool calls when there are any, reasoning when a reasoning parser is on."""
    content: str | None = choice.text
    if choice.tool_calls and not content:
        content = None
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if choice.tool_calls:
        message["tool_calls"] = choice.tool_calls
    if with_reasoning:
        message["reasoning_content"] = choice.reasoning_content
    return message


def chat_chunk(
    response_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    include_usage: bool,
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One ``chat.completion.chunk``; with include_usage every chunk has a ``usage`` key."""
    return _chunk("chat.completion.chunk", response_id, created, model, choices,
                  include_usage, usage)


def chat_chunk_choice(
    index: int,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def text_completion(
    response_id: str,
    created: int,
    model: str,
    choices: Sequence[ChoiceResult],
    usage: dict[str, Any],
    num_logprobs: int | None,
    token_text: TokenText,
    text_prefixes: dict[int, str] | None = None,
) -> dict[str, Any]:
    """A ``text_completion``; ``text_prefixes`` holds the echoed prompt per choice index."""
    out_choices = []
    for choice in choices:
        prefix = (text_prefixes or {}).get(choice.index, "")
        logprobs = None
        if num_logprobs is not None:
            logprobs, _ = completion_logprobs(
                choice.logprobs or [], num_logprobs, token_text, len(prefix)
            )
        out_choices.append({
            "index": choice.index,
            "text": prefix + choice.text,
            "logprobs": logprobs,
            "finish_reason": choice.finish_reason,
        })
    return {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": out_choices,
        "usage": usage,
    }


def completion_chunk(
    response_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    include_usage: bool,
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One streamed ``text_completion`` chunk (same usage rule as chat)."""
    return _chunk("text_completion", response_id, created, model, choices, include_usage, usage)


def _chunk(
    object_name: str,
    response_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    include_usage: bool,
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": response_id,
        "object": object_name,
        "created": created,
        "model": model,
        "choices": choices,
    }
    if include_usage:
        chunk["usage"] = usage
    return chunk


def completion_chunk_choice(
    index: int,
    text: str,
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def model_list(names: Sequence[str], created: int, max_model_len: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(n, created, max_model_len) for n in names]}


def model_card(name: str, created: int, max_model_len: int) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "tokenmill",
        "max_model_len": max_model_len,
    }
