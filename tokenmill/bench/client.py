"""Talking to an OpenAI-compatible server: payloads, SSE parsing and per-request timing.

A streamed response is a series of server-sent events; each ``data:`` payload is a JSON
chunk, and ``data: [DONE]`` ends the stream. A chunk whose text is non-empty counts as a
token arrival: its arrival time feeds time to first token and inter-token latency.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


@dataclass(frozen=True)
class Target:
    """One server under test and how to ask it."""

    base_url: str
    endpoint: str = "/v1/completions"
    model: str = ""
    api_key: str | None = None
    label: str = ""
    extra_body: dict[str, Any] = field(default_factory=dict)
    ignore_eos: bool = True
    temperature: float = 0.0
    timeout_s: float = 3600.0

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + self.endpoint

    @property
    def is_chat(self) -> bool:
        return self.endpoint.rstrip("/").endswith("/chat/completions")

    @property
    def name(self) -> str:
        return self.label or self.base_url

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass
class RequestRecord:
    """What happened to one request. Times are seconds (``time.perf_counter`` based).

    ``send_time`` is relative to the start of the run; ``chunk_times`` are relative to
    ``send_time`` (one per chunk that carried text). Token counts are filled in after the
    run from the tokenizer or the server's usage (see ``count_source``).
    """

    index: int
    success: bool = False
    status: int | None = None  # HTTP status, None when no response came
    error: str | None = None  # short reason for a failure
    send_time: float = 0.0
    latency: float | None = None  # send to end of stream (or to the failure)
    chunk_times: list[float] = field(default_factory=list)
    generated_text: str = ""
    finish_reason: str | None = None
    usage_prompt_tokens: int | None = None
    usage_completion_tokens: int | None = None
    usage_cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens
    served_by: str | None = None  # the replica that answered (x-tokenmill-replica header)
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    count_source: str = ""  # "tokenizer" | "usage" | "chunks"
    conversation: int | None = None
    turn: int = 0


class SSEDecoder:
    """Incremental server-sent-events parser: feed lines, get complete ``data`` payloads.

    Multi-line data fields are joined with newlines as the SSE spec says; comments and
    other fields (``event:``, ``id:``, ``retry:``) are ignored.
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        """Consume one line (without its terminator); return a payload when an event ends."""
        if line == "":
            return self.flush()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        return None

    def flush(self) -> str | None:
        """End the current event (at a blank line or the end of the stream)."""
        if not self._data:
            return None
        payload = "\n".join(self._data)
        self._data = []
        return payload


def chunk_text(chunk: dict[str, Any]) -> str:
    """The generated text carried by one streamed chunk (completions or chat)."""
    parts = []
    for choice in chunk.get("choices") or []:
        if "text" in choice:
            parts.append(choice.get("text") or "")
        delta = choice.get("delta") or {}
        parts.append(delta.get("content") or "")
        parts.append(delta.get("reasoning_content") or "")
    return "".join(parts)


def chunk_finish_reason(chunk: dict[str, Any]) -> str | None:
    for choice in chunk.get("choices") or []:
        if choice.get("finish_reason"):
            return choice["finish_reason"]
    return None


def build_payload(target: Target, output_len: int, prompt: str | None = None,
                  messages: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """The JSON body of one streaming request; ``extra_body`` overrides the defaults."""
    body: dict[str, Any] = {
        "model": target.model,
        "max_tokens": output_len,
        "temperature": target.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.is_chat:
        body["messages"] = messages if messages is not None else [
            {"role": "user", "content": prompt or ""}]
    else:
        body["prompt"] = prompt if prompt is not None else render_transcript(messages or [])
    if target.ignore_eos:
        body["ignore_eos"] = True  # not OpenAI's API; vLLM, SGLang, llama.cpp honour it
    body.update(target.extra_body)
    return body


def render_transcript(messages: list[dict[str, str]]) -> str:
    """A chat history as plain text, for sending a conversation to /v1/completions."""
    lines = [f"{m.get('role', 'user').capitalize()}: {m.get('content', '')}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


async def send_request(client: httpx.AsyncClient, target: Target, payload: dict[str, Any],
                       record: RequestRecord, run_start: float) -> RequestRecord:
    """Send one streaming request and time it into ``record`` (returned for convenience).

    Never raises for server or network trouble: a failure is written into the record.
    """
    sse = SSEDecoder()
    texts: list[str] = []
    sent = time.perf_counter()
    record.send_time = sent - run_start
    try:
        async with client.stream("POST", target.url, json=payload,
                                 headers=target.headers()) as response:
            record.status = response.status_code
            record.served_by = response.headers.get("x-tokenmill-replica")
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", "replace")
                record.error = f"HTTP {response.status_code}: {_short(body)}"
                return record
            done = False
            async for line in response.aiter_lines():
                payload_text = sse.feed(line)
                if payload_text is None:
                    continue
                done = _consume(payload_text, record, texts, sent)
                if done or record.error:
                    break
            if not done and not record.error:
                tail = sse.flush()
                if tail is not None:
                    _consume(tail, record, texts, sent)
    except httpx.TimeoutException as exc:
        record.error = f"timeout: {type(exc).__name__}"
    except httpx.HTTPError as exc:
        record.error = f"{type(exc).__name__}: {_short(str(exc))}"
    finally:
        record.latency = time.perf_counter() - sent
        record.generated_text = "".join(texts)
    record.success = record.error is None
    return record


def _consume(payload_text: str, record: RequestRecord, texts: list[str], sent: float) -> bool:
    """Handle one SSE payload; return True at ``[DONE]``. Sets ``record.error`` on errors."""
    now = time.perf_counter()
    if payload_text.strip() == "[DONE]":
        return True
    try:
        chunk = json.loads(payload_text)
    except json.JSONDecodeError:
        record.error = f"bad stream chunk: {_short(payload_text)}"
        return False
    if not isinstance(chunk, dict):
        record.error = f"bad stream chunk: {_short(payload_text)}"
        return False
    if chunk.get("error"):
        record.error = f"stream error: {_short(json.dumps(chunk['error']))}"
        return False
    text = chunk_text(chunk)
    if text:
        record.chunk_times.append(now - sent)
        texts.append(text)
    reason = chunk_finish_reason(chunk)
    if reason:
        record.finish_reason = reason
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        record.usage_prompt_tokens = usage.get("prompt_tokens", record.usage_prompt_tokens)
        record.usage_completion_tokens = usage.get("completion_tokens",
                                                   record.usage_completion_tokens)
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and details.get("cached_tokens") is not None:
            record.usage_cached_tokens = details["cached_tokens"]
    return False


def error_key(record: RequestRecord) -> str:
    """A bucket for error counts: the HTTP status, or the kind of failure."""
    if record.status is not None and record.status != 200:
        return str(record.status)
    if record.error is None:
        return "ok"
    if record.error.startswith("timeout"):
        return "timeout"
    if record.error.startswith("stream error"):
        return "stream_error"
    if record.error.startswith("bad stream chunk"):
        return "bad_chunk"
    return "connection_error"


def fetch_model_ids(base_url: str, api_key: str | None, timeout_s: float = 30.0) -> list[str]:
    """Model ids served at ``base_url`` (``GET /v1/models``)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=timeout_s)
    response.raise_for_status()
    return [m["id"] for m in response.json().get("data", []) if "id" in m]
