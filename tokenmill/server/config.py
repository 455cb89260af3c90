"""Settings of the HTTP layer, separate from the engine's own arguments."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenmill.server.ratelimit import RateLimits


@dataclass(frozen=True)
class ServerConfig:
    """Everything the HTTP server needs besides the engine.

    ``engine_args`` are passed unchanged to ``EngineArgs`` (for the engine core process); keys
    left out keep the engine's defaults.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    engine_args: dict[str, Any] = field(default_factory=dict)
    served_model_names: tuple[str, ...] = ()  # empty: use the engine's model name
    api_keys: tuple[str, ...] = ()
    protect_metrics: bool = False
    rate_limits: RateLimits = field(default_factory=RateLimits)
    rate_limit_storage: str | None = None  # None/"memory" or redis://host:port
    max_queued_requests: int = 256
    request_timeout: float | None = None  # seconds; None disables
    shutdown_timeout: float = 30.0
    max_n: int = 16
    max_prompts_per_request: int = 64  # /v1/completions prompt lists
    max_request_body_size: int = 4 << 20  # bytes
    header_timeout: float = 10.0  # seconds for a request's headers to arrive
    forwarded_allow_ips: tuple[str, ...] = ()  # proxies trusted for X-Forwarded-For
    replica_name: str = ""  # x-tokenmill-replica header; default host:port
    log_prompts: bool = False
    log_level: str = "info"
    # Tool calls in model output: hermes | llama3_json | mistral, or auto (from the
    # chat template). The reasoning parser is an engine argument (reasoning_parser).
    tool_call_parser: str = "auto"

    def __post_init__(self) -> None:
        if self.max_queued_requests < 0:
            raise ValueError("max_queued_requests must be >= 0")
        if self.max_prompts_per_request < 1:
            raise ValueError("max_prompts_per_request must be >= 1")
        if self.max_request_body_size < 1024:
            raise ValueError("max_request_body_size must be at least 1 KiB")
        if self.header_timeout <= 0:
            raise ValueError("header_timeout must be positive")
        if self.protect_metrics and not self.api_keys:
            raise ValueError("--protect-metrics needs API keys (--api-key or --api-key-file)")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError("request_timeout must be positive")
        if self.shutdown_timeout < 0:
            raise ValueError("shutdown_timeout must be >= 0")
        from tokenmill.server.tool_parsers import TOOL_CALL_PARSERS

        if self.tool_call_parser != "auto" and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"unknown tool call parser {self.tool_call_parser!r}; choose auto "
                             f"or one of {', '.join(sorted(TOOL_CALL_PARSERS))}")

    @property
    def reasoning_parser(self) -> str | None:
        """The engine's reasoning format name (None: outputs have no reasoning block)."""
        return self.engine_args.get("reasoning_parser")
