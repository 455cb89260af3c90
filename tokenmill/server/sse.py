"""Server-Sent Events framing for streamed completions."""

from __future__ import annotations

import json
from typing import Any

SSE_MEDIA_TYPE = "text/event-stream"
SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(payload: dict[str, Any]) -> bytes:
    """One ``data: {json}`` event; compact JSON on one line, as OpenAI sends it."""
    return b"data: " + json_bytes(payload) + b"\n\n"


def json_bytes(payload: dict[str, Any]) -> bytes:
    # allow_nan=False: a NaN or inf would produce invalid JSON; callers clamp first.
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
