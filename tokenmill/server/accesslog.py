"""One structured (JSON) log line and one status-code count per HTTP request.

A pure ASGI middleware wraps every request: it creates a ``RequestRecord`` that the
route handlers fill in (key id, token counts, time to first token, finish reasons),
watches the status code the app sends, and when the response is complete - for a
stream that is after its last event - logs the record and counts the status.
The prompt text is logged only when the server runs with ``--log-prompts``.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenmill.server.metrics import ServerMetrics

access_logger = logging.getLogger("tokenmill.access")

RECORD_KEY = "tokenmill_record"
# Probes and scrapes arrive every few seconds; they are logged at DEBUG only.
QUIET_PATHS = frozenset({"/health", "/live", "/metrics"})
# Client-chosen strings are cut to this many characters in the log line, and a
# logged prompt (--log-prompts) to PROMPT_LIMIT, so every line stays bounded.
FIELD_LIMIT = 256
PROMPT_LIMIT = 4096


@dataclass
class RequestRecord:
    """What the access log line says about one request; filled as the request runs."""

    request_id: str
    method: str
    path: str
    client: str | None
    started: float = field(default_factory=time.monotonic)
    status: int | None = None
    key_id: str | None = None
    model: str | None = None
    user: str | None = None
    stream: bool | None = None
    n: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    ttft: float | None = None
    finish_reasons: list[str] = field(default_factory=list)
    error_code: str | None = None
    disconnected: bool = False
    prompt: Any = None  # only set with --log-prompts

    def to_log_dict(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {
            "event": "request",
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "client": self.client,
            "key_id": self.key_id,
            "total_s": round(now - self.started, 4),
        }
        optional = {
            "model": _bounded(self.model, FIELD_LIMIT),
            "user": _bounded(self.user, FIELD_LIMIT),
            "stream": self.stream,
            "n": self.n,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "ttft_s": None if self.ttft is None else round(self.ttft, 4),
            "finish_reason": ",".join(self.finish_reasons) if self.finish_reasons else None,
            "error_code": self.error_code,
            "disconnected": self.disconnected or None,
            "prompt": _bounded_prompt(self.prompt),
        }
        out.update({k: v for k, v in optional.items() if v is not None})
        return out


def _bounded(value: Any, limit: int) -> Any:
    """A client-supplied string cut to ``limit`` characters (others unchanged)."""
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + f"...[{len(value) - limit} more]"
    return value


def _bounded_prompt(prompt: Any) -> Any:
    """The prompt as sent, or its JSON text cut to PROMPT_LIMIT when longer."""
    if prompt is None or isinstance(prompt, str):
        return _bounded(prompt, PROMPT_LIMIT)
    text = json.dumps(prompt, ensure_ascii=False, default=str)
    return prompt if len(text) <= PROMPT_LIMIT else _bounded(text, PROMPT_LIMIT)


def format_line(record: RequestRecord, now: float) -> str:
    """The JSON log line; never raises on odd text (lone surrogates are escaped)."""
    line = json.dumps(record.to_log_dict(now), ensure_ascii=False, default=str)
    return line.encode("utf-8", "backslashreplace").decode("utf-8")


def get_record(request: Request) -> RequestRecord:
    """The record of the current request (set by ``AccessLogMiddleware``)."""
    return request.scope[RECORD_KEY]


class AccessLogMiddleware:
    """Creates the per-request record, adds ``x-request-id``, logs and counts at the end."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, replica: str = "") -> None:
        self.app = app
        self.metrics = metrics
        # Which server answered, for load testers behind a router (x-tokenmill-replica).
        self.replica = replica.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        record = RequestRecord(
            request_id=uuid.uuid4().hex,
            method=scope.get("method", ""),
            path=scope.get("path", ""),
            client=client[0] if client else None,
        )
        scope[RECORD_KEY] = record

        async def send_with_record(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", record.request_id.encode()))
                if self.replica:
                    headers.append((b"x-tokenmill-replica", self.replica))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_record)
        except BaseException:
            if record.status is None:
                record.status = 500
            raise
        finally:
            route = scope.get("route")
            self.metrics.count_http(getattr(route, "path", "unmatched"), record.status or 500)
            level = logging.DEBUG if record.path in QUIET_PATHS else logging.INFO
            if access_logger.isEnabledFor(level):
                access_logger.log(level, format_line(record, time.monotonic()))
