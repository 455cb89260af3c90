"""Exceptions the engine raises to its callers; the server maps each type to an HTTP status."""

from __future__ import annotations


class RequestRejected(ValueError):
    """A request that can never be served (empty, too long, out-of-vocabulary ids...).

    ``code`` is a stable machine-readable reason (``context_length_exceeded``,
    ``kv_cache_capacity_exceeded``, ``invalid_prompt``, ``invalid_value``);
    ``param`` names the request field at fault when one is.
    """

    def __init__(self, message: str, code: str = "invalid_request", param: str | None = None,
                 **details: int):
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.details = details


class EngineDeadError(RuntimeError):
    """The engine core stopped (crashed, was killed, or shut down); nothing can be served."""


class RequestFailed(RuntimeError):
    """The engine failed while running this request (a step raised); others keep running."""
