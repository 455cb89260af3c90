"""The life of one admitted completion request: validate, admit, rate-limit, run, finish.

A completions request may carry several prompts; each becomes one engine request,
and each counts on its own against the queue bound and the per-key request limit
(so a request with 400 prompts is 400 requests, not one). ``JobRunner.submit``
does, in order:

1. build the sampling parameters and validate every prompt against the engine's
   limits (400 naming the parameter; nothing is charged for a bad request);
2. take places in the server (503 when loading, draining or the queue is full);
3. charge the client's rate limit (429 with Retry-After);
4. hand the prompts to the engine (a :class:`GenerationRun`).

Whatever happens next - success, timeout, client disconnect, error -
``JobRunner.finish`` aborts what still runs, releases the places, charges the
completion tokens and fills in the access-log record. It never awaits, so it is
safe while a task is being cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from tokenmill.sampling import SamplingParams
from tokenmill.server import responses
from tokenmill.server.accesslog import RequestRecord
from tokenmill.server.chat_output import ChatOutputSpec
from tokenmill.server.config import ServerConfig
from tokenmill.server.errors import (
    APIError,
    engine_error,
    internal_error,
    invalid_param,
    rate_limited,
    unavailable,
)
from tokenmill.server.generation import GenerationRun
from tokenmill.server.lifecycle import Admission, EngineHost, ServerState
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.protocol import ChatCompletionRequest, CompletionRequest
from tokenmill.server.ratelimit import RateLimiter
from tokenmill.server.structured import Constraint

logger = logging.getLogger("tokenmill.server")

CompletionBody = ChatCompletionRequest | CompletionRequest


@dataclass
class Job:
    """One admitted completion request and everything needed to answer and clean it up."""

    kind: str  # "chat" | "completion"
    request: CompletionBody
    response_id: str
    created: int
    model: str
    prompt_texts: list[str]
    run: GenerationRun
    admission: Admission
    identity: str
    record: RequestRecord
    headers: dict[str, str] = field(default_factory=dict)
    outcome: str | None = None  # "ok", "timeout", "error"; None while running
    finished: bool = False
    output: ChatOutputSpec | None = None  # chat: tool calls and reasoning to parse out

    @property
    def num_logprobs(self) -> int | None:
        return self.request.num_logprobs

    @property
    def param_names(self) -> dict[str, str]:
        return param_names(self.kind, self.request)


def param_names(kind: str, req: CompletionBody) -> dict[str, str]:
    """The endpoint's names for the engine's parameters (for error messages)."""
    return {"prompt": "messages" if kind == "chat" else "prompt",
            "max_tokens": req.max_tokens_param,
            "logprobs": "top_logprobs" if kind == "chat" else "logprobs"}


class JobRunner:
    """Starts and finishes jobs against the engine host, the rate limiter and metrics."""

    def __init__(
        self,
        config: ServerConfig,
        host: EngineHost,
        metrics: ServerMetrics,
        limiter: RateLimiter | None,
    ) -> None:
        self.config = config
        self.host = host
        self.metrics = metrics
        self.limiter = limiter
        self._background: set[asyncio.Task[Any]] = set()

    async def submit(
        self,
        kind: str,
        req: CompletionBody,
        model: str,
        prompt_ids: list[list[int]],
        prompt_texts: list[str],
        identity: str,
        record: RequestRecord,
        engine_prompt_texts: list[str | None] | None = None,
        constraint: Constraint | None = None,
        output: ChatOutputSpec | None = None,
    ) -> Job:
        """Validate, admit, rate-limit and start generation (see the module docstring).

        ``constraint`` is the request's (already checked) output constraint;
        ``output`` says how to parse a chat answer (tool calls, reasoning).
        """
        engine = self.host.engine
        names = param_names(kind, req)
        params = self._sampling_params(req, names, constraint, output)
        if req.priority != 0 and self.config.engine_args.get("scheduling_policy") != "priority":
            raise invalid_param(
                "priority is only accepted when the server runs with "
                "--scheduling-policy priority.", "priority")
        try:
            for ids in prompt_ids:
                engine.validate(ids, params)
        except Exception as exc:  # noqa: BLE001 - mapped by type in one place
            raise engine_error(exc, names) from None
        record.prompt_tokens = sum(len(p) for p in prompt_ids)

        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        response_id = f"{prefix}-{record.request_id}"
        engine_ids = (
            [response_id] if len(prompt_ids) == 1
            else [f"{response_id}-{i}" for i in range(len(prompt_ids))]
        )
        try:
            admission = self.host.admit(engine_ids, self.config.max_queued_requests)
        except APIError as exc:
            self.metrics.rejected.labels(reason=exc.code or "unavailable").inc()
            raise
        try:
            headers = await self._charge_admission(identity, record.prompt_tokens,
                                                   len(engine_ids))
        except BaseException:
            admission.release()
            raise
        self.metrics.in_flight.inc()
        deadline = None
        if self.config.request_timeout is not None:
            deadline = asyncio.get_running_loop().time() + self.config.request_timeout
        run = GenerationRun(
            engine, prompt_ids, params, engine_ids, req.priority, self.metrics, deadline,
            engine_prompt_texts,
        )
        job = Job(kind, req, response_id, int(time.time()), model, prompt_texts, run,
                  admission, identity, record, headers, output=output)
        admission.interrupt = lambda: run.interrupt(self.abort_error())
        try:
            run.start()
        except Exception as exc:  # noqa: BLE001 - mapped by type in one place
            error = engine_error(exc, names)
            job.outcome = "error"
            job.record.error_code = error.code
            self.finish(job, "error")
            raise error from None
        admission.submitted()
        return job

    def _sampling_params(self, req: CompletionBody, names: dict[str, str],
                         constraint: Constraint | None = None,
                         output: ChatOutputSpec | None = None) -> SamplingParams:
        """Build the engine's parameters; its validation errors become 400s naming the field."""
        kwargs = req.sampling_kwargs(req.requested_max_tokens)
        if req.num_logprobs is not None:
            kwargs["logprobs"] = req.num_logprobs
        if constraint is not None:
            kwargs["structured_outputs"] = constraint.params
        if output is not None and output.plan is not None and output.plan.needs_special_tokens:
            kwargs["skip_special_tokens"] = False  # the parser reads e.g. [TOOL_CALLS]
        try:
            return SamplingParams(**kwargs)
        except ValueError as exc:  # InvalidParameterError names the field
            raise engine_error(exc, names) from None

    async def _charge_admission(self, identity: str, prompt_tokens: int,
                                num_requests: int) -> dict[str, str]:
        """Apply the rate limit; return the x-ratelimit headers for the response."""
        if self.limiter is None:
            return {}
        decision = await self.limiter.acquire(identity, prompt_tokens, num_requests)
        headers = decision.headers(self.limiter.limits)
        if not decision.allowed:
            self.metrics.rate_limited.labels(limit=decision.limited_by or "unknown").inc()
            raise rate_limited(decision.message(self.limiter.limits), decision.retry_after,
                               headers)
        return headers

    def finish(self, job: Job, reason: str) -> None:
        """Release everything a job holds (idempotent, never awaits)."""
        if job.finished:
            return
        job.finished = True
        job.run.close(reason)
        job.admission.release()
        self.metrics.in_flight.dec()
        record = job.record
        record.completion_tokens = job.run.completion_tokens
        record.cached_tokens = job.run.total_cached_tokens
        record.ttft = job.run.ttft
        record.finish_reasons = [job.run.finish_reasons[k] for k in sorted(job.run.finish_reasons)]
        if job.outcome is None:
            record.disconnected = True
        if self.limiter is not None and job.run.completion_tokens:
            self._spawn(self.limiter.charge(job.identity, job.run.completion_tokens))

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def abort_error(self) -> APIError:
        """Why an aborted request ended: the server is draining, or the engine failed."""
        if self.host.state is ServerState.DRAINING:
            return unavailable("The request was aborted because the server is shutting down.",
                               "server_draining")
        if self.host.engine_died:
            return unavailable("The engine process died.", "engine_dead", 30)
        return internal_error("The request was aborted by the engine.")

    def finish_reason(self, reason: str | None) -> str | None:
        """The reason to show; an engine-side abort becomes the error it stands for."""
        if reason == "abort":
            raise self.abort_error()
        return reason

    def usage(self, job: Job) -> dict[str, Any]:
        run = job.run
        return responses.usage_dict(run.prompt_tokens, run.completion_tokens,
                                    run.total_cached_tokens)

    @staticmethod
    def reason_for(error: APIError) -> str:
        """The finish reason that metrics record for a request that ended with ``error``."""
        return "abort" if error.code == "server_draining" else "error"
