"""Reading a request body safely: size limit, JSON depth, and valid Unicode.

Every POST body goes through :func:`read_json_body`:

- it is read chunk by chunk and refused with 413 as soon as it passes the
  limit (a ``Content-Length`` over the limit is refused before reading);
- JSON nested deeper than :data:`MAX_JSON_DEPTH` levels is a 400, not a
  ``RecursionError``;
- a string holding a lone UTF-16 surrogate (``"\\ud800"`` is valid JSON but not
  valid Unicode text) is a 400 naming the field, before it can reach the
  tokenizer, the engine or a log line.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.requests import Request

from tokenmill.server.errors import APIError, payload_too_large

# OpenAI request bodies nest a handful of levels (tools' JSON schemas a few more).
MAX_JSON_DEPTH = 64
_SURROGATE = re.compile("[\ud800-\udfff]")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, or 413 once it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise payload_too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise payload_too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json_body(request: Request, limit: int) -> dict[str, Any]:
    """A size-limited body parsed as a JSON object and checked by :func:`check_json`."""
    return parse_json(await read_body(request, limit))


def parse_json(raw: bytes) -> dict[str, Any]:
    """Decode a request body that must be a JSON object of valid text."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise _too_deep() from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(
            400, f"The request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    check_json(data)
    return data


def check_json(data: Any) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH and lone surrogates (iteratively)."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise _bad_text(path or "body")
        elif isinstance(value, dict):
            if depth >= MAX_JSON_DEPTH:
                raise _too_deep()
            for key, item in value.items():
                if _SURROGATE.search(key):
                    raise _bad_text(path or "body")
                stack.append((item, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(value, list):
            if depth >= MAX_JSON_DEPTH:
                raise _too_deep()
            for i, item in enumerate(value):
                stack.append((item, f"{path}[{i}]", depth + 1))


def _too_deep() -> APIError:
    return APIError(400, f"The request body is nested more than {MAX_JSON_DEPTH} levels deep.",
                    code="invalid_json")


def _bad_text(param: str) -> APIError:
    return APIError(400, f"Invalid value for '{param}': the string contains a lone UTF-16 "
                    "surrogate, which is not valid Unicode text.", param=param,
                    code="invalid_value")
