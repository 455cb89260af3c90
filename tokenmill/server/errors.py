"""OpenAI-style API errors: one exception type that carries everything the response needs.

Every failure the server reports, from a bad parameter to an overloaded queue, is an
``APIError``; the app's exception handlers turn it into the JSON body OpenAI clients
expect: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error to send to the client with an HTTP status and an OpenAI error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def to_dict(self) -> dict[str, Any]:
        """The body OpenAI clients parse: ``{"error": {...}}``."""
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None  # noqa: A002
) -> dict[str, Any]:
    """Build an OpenAI error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid_param(message: str, param: str | None, code: str = "invalid_value") -> APIError:
    """400 for a request parameter the server cannot accept."""
    return APIError(400, message, param=param, code=code)


def context_length_exceeded(
    max_model_len: int, prompt_tokens: int, completion_tokens: int, param: str
) -> APIError:
    """400 when prompt plus requested completion do not fit in the model's context."""
    total = prompt_tokens + completion_tokens
    return APIError(
        400,
        f"This model's maximum context length is {max_model_len} tokens. However, you "
        f"requested {total} tokens ({prompt_tokens} in the prompt, {completion_tokens} for "
        f"the completion). Please reduce the prompt or the completion length.",
        param=param,
        code="context_length_exceeded",
    )


def unauthorized(message: str) -> APIError:
    """401 for a missing or wrong API key (the shape OpenAI uses)."""
    return APIError(
        401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
    )


def model_not_found(model: str) -> APIError:
    return APIError(
        404, f"The model '{model}' does not exist.", param="model", code="model_not_found"
    )


def rate_limited(message: str, retry_after: float, headers: dict[str, str]) -> APIError:
    """429 with a Retry-After header in whole seconds (at least 1)."""
    return APIError(
        429,
        message,
        type="rate_limit_error",
        code="rate_limit_exceeded",
        headers={**headers, "Retry-After": retry_after_header(retry_after)},
    )


def unavailable(message: str, code: str, retry_after: float = 1.0) -> APIError:
    """503 for a server that cannot take the request now (loading, overloaded, draining)."""
    return APIError(
        503,
        message,
        type="server_error",
        code=code,
        headers={"Retry-After": retry_after_header(retry_after)},
    )


def request_timeout(seconds: float) -> APIError:
    return APIError(
        408,
        f"The request did not finish within the server's request timeout of {seconds:g}s.",
        type="timeout_error",
        code="request_timeout",
    )


def internal_error(message: str = "The server had an error while processing the request.") -> (
    APIError
):
    return APIError(500, message, type="server_error", code="internal_error")


def retry_after_header(seconds: float) -> str:
    """Retry-After takes whole seconds; round up so the client never comes back too early."""
    whole = int(seconds) if float(seconds).is_integer() else int(seconds) + 1
    return str(max(1, whole))


def payload_too_large(limit: int) -> APIError:
    """413 for a request body over ``--max-request-body-size``."""
    return APIError(
        413,
        f"The request body is larger than the server's limit of {limit:,} bytes.",
        param="body",
        code="request_too_large",
    )


def engine_error(exc: BaseException, params: dict[str, str] | None = None) -> APIError:
    """The one map from what the engine raises to what the client sees, by type.

    ``params`` renames the engine's parameter names to the endpoint's (the prompt
    is "messages" in chat; the length "max_completion_tokens" when that was sent).
    """
    from tokenmill.engine.errors import EngineDeadError, RequestFailed, RequestRejected
    from tokenmill.sampling.params import InvalidParameterError

    rename = params or {}
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestRejected):
        param = rename.get(exc.param or "", exc.param)
        return APIError(400, exc.message, param=param, code=exc.code)
    if isinstance(exc, InvalidParameterError):
        return invalid_param(str(exc), rename.get(exc.param, exc.param))
    if isinstance(exc, EngineDeadError):
        return unavailable("The engine is not running.", "engine_dead", 30)
    if isinstance(exc, RequestFailed):
        return internal_error(f"The engine failed while running the request: {exc}")
    return internal_error()
