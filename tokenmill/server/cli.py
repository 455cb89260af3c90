"""``tokenmill serve``: flags, logging, and the process that runs the HTTP server.

The process handles SIGTERM/SIGINT itself instead of letting uvicorn stop at once:
the first signal starts a drain (new requests get 503, ``/health`` turns 503, running
requests may finish for up to ``--shutdown-timeout`` seconds, the rest are aborted),
then the HTTP server stops and the process exits 0. A second signal stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from types import FrameType
from typing import Any

import uvicorn

from tokenmill.config import parse_memory
from tokenmill.engine.args import EngineArgs
from tokenmill.engine.cpu_threads import limit_api_process_threads
from tokenmill.server.auth import load_api_keys
from tokenmill.server.config import ServerConfig
from tokenmill.server.http_protocol import protocol_with_header_timeout
from tokenmill.server.lifecycle import ABORT_GRACE_SECONDS, EngineHost, ServerState
from tokenmill.server.ratelimit import RateLimits

logger = logging.getLogger("tokenmill.server")

LOG_LEVELS = ("debug", "info", "warning", "error")


def add_cli(subparsers: Any) -> None:
    """Register the ``serve`` subcommand on the main ``tokenmill`` parser."""
    parser = subparsers.add_parser(
        "serve",
        help="Run the OpenAI-compatible HTTP server.",
        description="Serve a model over an OpenAI-compatible HTTP API (see docs/server.md).",
    )
    add_serve_arguments(parser)
    parser.set_defaults(func=serve_command)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """All flags of ``tokenmill serve``."""
    net = parser.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="Address to bind (default 127.0.0.1).")
    net.add_argument("--port", type=int, default=8000, help="Port to bind (default 8000).")

    # The engine flags are the same for every command that builds an engine.
    EngineArgs.add_cli_args(parser)
    parser.add_argument("--served-model-name", nargs="+", default=None,
                        help="Name(s) clients use in 'model'; default: the model's name.")

    tools = parser.add_argument_group("tool calling (see docs/structured-output.md)")
    tools.add_argument("--tool-call-parser", default="auto",
                       choices=["auto", "hermes", "llama3_json", "mistral"],
                       help="format of tool calls in the model's output: hermes "
                            "(<tool_call> JSON, Qwen2.5), llama3_json, mistral ([TOOL_CALLS]); "
                            "auto picks it from the chat template (default)")

    sec = parser.add_argument_group("access")
    sec.add_argument("--api-key", action="append", default=None,
                     help="Accepted API key (repeatable). Also read from $TOKENMILL_API_KEY.")
    sec.add_argument("--api-key-file", default=None,
                     help="File with one accepted API key per line.")
    sec.add_argument("--protect-metrics", action="store_true",
                     help="Require an API key for /metrics too.")
    sec.add_argument("--rate-limit-rpm", type=int, default=None,
                     help="Requests per minute per API key (per client IP without keys).")
    sec.add_argument("--rate-limit-tpm", type=int, default=None,
                     help="Prompt + completion tokens per minute per key (or client IP).")
    sec.add_argument("--rate-limit-storage", default="memory",
                     help="'memory' (default) or redis://host:port to share limits.")
    sec.add_argument("--forwarded-allow-ips", default=None,
                     help="Comma-separated proxy addresses (or *) whose X-Forwarded-For "
                          "header names the client for logs and per-IP limits (uvicorn's "
                          "convention). Default: none, the peer address is the client.")

    flow = parser.add_argument_group("flow control and lifecycle")
    flow.add_argument("--max-queued-requests", type=int, default=256,
                      help="Refuse new requests with 503 while this many wait (default 256).")
    flow.add_argument("--request-timeout", type=float, default=None,
                      help="Abort a request after this many seconds (default: no limit).")
    flow.add_argument("--shutdown-timeout", type=float, default=30.0,
                      help="On SIGTERM, let running requests finish for this long (default 30).")
    flow.add_argument("--max-request-body-size", default="4MiB",
                      help="Refuse larger request bodies with 413 (default 4MiB).")
    flow.add_argument("--max-prompts-per-request", type=int, default=64,
                      help="Most prompts in one /v1/completions request (default 64); each "
                           "counts against the queue bound and rate limits.")
    flow.add_argument("--header-timeout", type=float, default=10.0,
                      help="Close connections whose request headers take longer (default 10s).")

    log = parser.add_argument_group("logging")
    # SUPPRESS: `tokenmill --log-level X serve` sets the same dest; do not override it.
    log.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS,
                     default=argparse.SUPPRESS, help="debug, info (default), warning, error.")
    log.add_argument("--log-prompts", action="store_true",
                     help="Include prompts in the per-request log lines.")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Turn parsed flags into a ``ServerConfig`` (raises ValueError on bad combinations)."""
    keys = list(args.api_key or [])
    env_key = os.environ.get("TOKENMILL_API_KEY")
    if env_key:
        keys.append(env_key)
    api_keys = load_api_keys(keys, args.api_key_file)
    if args.api_key_file is not None and not api_keys:
        raise ValueError(f"--api-key-file {args.api_key_file} holds no keys")
    engine_args = {
        name: getattr(args, name) for name in sorted(EngineArgs.field_names())
        if hasattr(args, name)
    }
    for flag in ("rate_limit_rpm", "rate_limit_tpm"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0")
    allow_ips = tuple(ip.strip() for ip in (args.forwarded_allow_ips or "").split(",")
                      if ip.strip())
    return ServerConfig(
        host=args.host,
        port=args.port,
        engine_args=engine_args,
        served_model_names=tuple(args.served_model_name or ()),
        api_keys=tuple(api_keys),
        protect_metrics=args.protect_metrics,
        rate_limits=RateLimits(args.rate_limit_rpm or None, args.rate_limit_tpm or None),
        rate_limit_storage=None if args.rate_limit_storage == "memory" else args.rate_limit_storage,
        max_queued_requests=args.max_queued_requests,
        request_timeout=args.request_timeout,
        shutdown_timeout=args.shutdown_timeout,
        max_prompts_per_request=args.max_prompts_per_request,
        max_request_body_size=parse_memory(args.max_request_body_size),
        header_timeout=args.header_timeout,
        forwarded_allow_ips=allow_ips,
        log_prompts=args.log_prompts,
        log_level=str(getattr(args, "log_level", None) or "info").lower(),
        tool_call_parser=getattr(args, "tool_call_parser", "auto"),
    )


def configure_logging(level: str) -> None:
    """Plain lines for server events; access lines are JSON already, printed as they are."""
    root = logging.getLogger()
    root.setLevel(level.upper())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.handlers[:] = [handler]
    access = logging.getLogger("tokenmill.access")
    access_handler = logging.StreamHandler(sys.stdout)
    access_handler.setFormatter(logging.Formatter("%(message)s"))
    access.handlers[:] = [access_handler]
    access.propagate = False
    # uvicorn's own access log would duplicate ours.
    logging.getLogger("uvicorn.access").disabled = True


class _DrainingServer(uvicorn.Server):
    """uvicorn, with SIGTERM/SIGINT turned into a graceful drain of the engine."""

    def __init__(self, config: uvicorn.Config, host: EngineHost, shutdown_timeout: float) -> None:
        super().__init__(config)
        self._host = host
        self._shutdown_timeout = shutdown_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signals = 0

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs inside a signal handler: no logging (it takes locks), just hand over to
        # the event loop. Not calling super() also keeps uvicorn from re-raising the
        # signal after shutdown, which would turn our exit status 0 into a signal death.
        self._signals += 1
        if self._loop is None:
            self.should_exit = True
            return
        if self._signals == 1:
            self._loop.call_soon_threadsafe(self._begin_drain, sig)
        else:
            self._loop.call_soon_threadsafe(self._stop_now)

    def _begin_drain(self, sig: int) -> None:
        logger.info("received %s: draining (up to %gs)", signal.Signals(sig).name,
                    self._shutdown_timeout)
        self._host.start_drain(self._shutdown_timeout, self._stop)

    def _stop(self) -> None:
        self.should_exit = True

    def _stop_now(self) -> None:
        logger.warning("second signal: aborting all requests and stopping now")
        self._host.abort_all()
        self.should_exit = True
        self.force_exit = True


def uvicorn_config(app: Any, config: ServerConfig) -> uvicorn.Config:
    """uvicorn's settings for ``app`` under ``config`` (header deadline, trusted proxies)."""
    return uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        http=protocol_with_header_timeout(config.header_timeout),
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=int(ABORT_GRACE_SECONDS),
        timeout_keep_alive=5,
        # X-Forwarded-For is believed only from the proxies named on the command line.
        proxy_headers=bool(config.forwarded_allow_ips),
        forwarded_allow_ips=list(config.forwarded_allow_ips) or None,
    )


def run_server(config: ServerConfig, engine_factory: Any = None) -> int:
    """Run until drained after a signal; return the process exit status."""
    from tokenmill.server.app import build_app

    app = build_app(config, engine_factory)
    host: EngineHost = app.state.host
    server = _DrainingServer(uvicorn_config(app, config), host, config.shutdown_timeout)

    def on_fatal() -> None:
        server.should_exit = True

    host.on_fatal = on_fatal
    server.run()
    if host.state is ServerState.FAILED:
        logger.error("exiting: %s", "the engine process died" if host.engine_died
                     else "the engine failed to load")
        return 1
    return 0


def serve_command(args: argparse.Namespace) -> int:
    """Entry point for ``tokenmill serve``."""
    log_level = str(getattr(args, "log_level", None) or "info").lower()
    configure_logging(log_level)
    try:
        config = config_from_args(args)
        parallel = EngineArgs.from_kwargs(**config.engine_args).parallel_config()
    except (ValueError, OSError) as exc:
        print(f"tokenmill serve: error: {exc}", file=sys.stderr)
        return 2
    if parallel.node_rank > 0:
        # Another node of a multi-node tensor-parallel engine: only its ranks run here;
        # node 0 runs the engine core and the HTTP server.
        from tokenmill.engine.tensor_parallel import run_worker_node

        logger.info("node %d of %d: starting ranks %s", parallel.node_rank, parallel.nnodes,
                    list(parallel.node_ranks()))
        return run_worker_node(EngineArgs.from_kwargs(**config.engine_args), log_level)
    # The engine core (a child process) computes; this process only serves HTTP.
    limit_api_process_threads()
    return run_server(config)


def main(argv: list[str] | None = None) -> int:
    """``python -m tokenmill.server``: the same flags as ``tokenmill serve``."""
    parser = argparse.ArgumentParser(prog="python -m tokenmill.server",
                                     description="Run the tokenmill OpenAI-compatible server.")
    add_serve_arguments(parser)
    return serve_command(parser.parse_args(argv))
