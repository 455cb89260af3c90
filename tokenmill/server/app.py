"""The FastAPI application: routes, authentication, error handlers, lifespan.

``build_app`` wires the pieces together and owns nothing global: two apps built in
one process (as tests do) share no state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import metadata
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from tokenmill.server import responses
from tokenmill.server.accesslog import AccessLogMiddleware, get_record
from tokenmill.server.auth import ApiKeyAuth
from tokenmill.server.config import ServerConfig
from tokenmill.server.errors import APIError, error_body, model_not_found
from tokenmill.server.lifecycle import EngineHost
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.ratelimit import create_rate_limiter
from tokenmill.server.serving import OpenAIServing

logger = logging.getLogger("tokenmill.server")

EngineFactory = Callable[[EngineHost], Awaitable[Any]]
"""Starts the engine client for a host (``MPEngineClient`` by default; a fake in tests)."""


def tokenmill_version() -> str:
    try:
        return metadata.version("tokenmill")
    except metadata.PackageNotFoundError:
        import tokenmill

        return str(getattr(tokenmill, "__version__", "0.0.0+unknown"))


def default_engine_factory(config: ServerConfig) -> EngineFactory:
    """The real engine: an engine core process behind an ``MPEngineClient``."""

    async def start(host: EngineHost) -> Any:
        from tokenmill.engine.args import EngineArgs
        from tokenmill.engine.client import MPEngineClient

        client = MPEngineClient(EngineArgs.from_kwargs(**config.engine_args),
                                log_level=config.log_level, on_dead=host.engine_dead)
        await client.start()
        return client

    return start


def build_app(config: ServerConfig, engine_factory: EngineFactory | None = None) -> FastAPI:
    """Create the app; the engine starts loading when the app's lifespan starts."""
    serving: OpenAIServing | None = None

    async def on_ready(engine: Any) -> None:
        assert serving is not None
        await serving.engine_ready(engine)

    host = EngineHost(engine_factory or default_engine_factory(config), on_ready)
    metrics = ServerMetrics(host.stats)
    auth = ApiKeyAuth(config.api_keys)
    limiter = create_rate_limiter(config.rate_limits, config.rate_limit_storage)
    serving = OpenAIServing(config, host, metrics, limiter)
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        load = asyncio.get_running_loop().create_task(host.load())
        ping = getattr(limiter, "ping", None)
        if ping is not None:
            try:
                await ping()
            except Exception as exc:  # noqa: BLE001 - the limiter fails open; say so early
                logger.warning("rate-limit storage %s unreachable (%s); requests will not be "
                               "limited until it is back", config.rate_limit_storage, exc)
        try:
            yield
        finally:
            load.cancel()
            try:
                await load
            except BaseException:  # noqa: BLE001 - cancelled or failed: it is over either way
                pass
            await host.shutdown()
            serving.close()
            if limiter is not None:
                await limiter.close()

    app = FastAPI(
        title="tokenmill", version=tokenmill_version(), lifespan=lifespan,
        docs_url=None, redoc_url=None, openapi_url=None,
    )
    app.state.host = host
    app.state.metrics = metrics
    app.state.serving = serving
    app.state.config = config
    app.add_middleware(AccessLogMiddleware, metrics=metrics,
                       replica=config.replica_name or f"{config.host}:{config.port}")
    _add_error_handlers(app)

    def authenticate(request: Request) -> str:
        """Check the key; return the rate-limit identity (key id, or client IP)."""
        record = get_record(request)
        key = auth.authenticate(request.headers)
        record.key_id = key
        return key if key is not None else f"ip:{record.client or 'unknown'}"

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> Response:
        """200 when requests are accepted; 503 while loading, draining or broken."""
        try:
            host.require_ready()
        except APIError as exc:
            metrics.server_ready.set(0)
            body = {"status": exc.code, **exc.to_dict()}
            return JSONResponse(body, status_code=exc.status, headers=exc.headers)
        metrics.server_ready.set(1)
        return JSONResponse({"status": "ok"})

    @app.api_route("/live", methods=["GET", "HEAD"])
    async def live() -> Response:
        """Liveness: 200 while the process serves HTTP, draining included (restart only
        a server that cannot answer at all; /health says whether it takes requests)."""
        return JSONResponse({"status": "alive", "state": host.state.value})

    @app.get("/metrics")
    async def prometheus_metrics(request: Request) -> Response:
        if config.protect_metrics:
            authenticate(request)
        metrics.server_ready.set(1 if host.ready else 0)
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": tokenmill_version()}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        authenticate(request)
        names = serving.model_names()
        return responses.model_list(names, started, int(serving.engine.max_model_len))

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
        authenticate(request)
        if model_id not in serving.model_names():
            raise model_not_found(model_id)
        return responses.model_card(model_id, started, int(serving.engine.max_model_len))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await serving.chat_completions(request, authenticate(request))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serving.completions(request, authenticate(request))

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        authenticate(request)
        return await serving.tokenize(request)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        authenticate(request)
        return await serving.detokenize(request)

    # vLLM's render endpoints: the prompt token ids a request would run with, and nothing
    # run. Routers (vllm-router's cache-aware policy) call them to see prefixes in tokens.
    @app.post("/v1/chat/completions/render")
    async def render_chat(request: Request) -> dict[str, Any]:
        authenticate(request)
        return await serving.render_chat(request)

    @app.post("/v1/completions/render")
    async def render_completion(request: Request) -> list[dict[str, Any]]:
        authenticate(request)
        return await serving.render_completion(request)

    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as an OpenAI error object, whatever raised it."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        get_record(request).error_code = exc.code
        return JSONResponse(exc.to_dict(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        get_record(request).error_code = code
        if exc.status_code == 404:
            message = f"Unknown route: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed for {request.url.path}"
        else:
            message = str(exc.detail)
        error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(message, error_type, None, code),
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        # Only path/query parameters reach FastAPI's validation; bodies are parsed by us.
        get_record(request).error_code = "invalid_value"
        return JSONResponse(error_body(f"Invalid request: {exc.errors()[0].get('msg')}",
                                       "invalid_request_error", None, "invalid_value"),
                            status_code=400)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> Response:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(
            error_body("The server had an error while processing the request.",
                       "server_error", None, "internal_error"),
            status_code=500,
        )
