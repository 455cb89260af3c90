"""Settings of the HTTP layer, separate from the engine's own arguments."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenmill.server.ratelimit import RateLimits


@dataclass(frozen=True)
class ServerConfig:
    """Everything the HTTP server needs besides the engine.

    ``engine_args`` are passed unchanged to ``AsyncLLMEngine.from_engine_args``; keys
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
    log_prompts: bool = False
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.max_queued_requests < 0:
            raise ValueError("max_queued_requests must be >= 0")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError("request_timeout must be positive")
        if self.shutdown_timeout < 0:
            raise ValueError("shutdown_timeout must be >= 0")
