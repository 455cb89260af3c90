"""Chat and text completions: from an HTTP request to engine outputs to OpenAI responses.

The path of a completion request:

1. parse and validate the body (400 naming the parameter);
2. resolve the model (404), tokenize the prompt, check the context length (400);
3. take a place in the server (503 when loading, draining or the queue is full);
4. charge the client's rate limit (429 with Retry-After);
5. submit to the engine and either collect the outputs into one JSON body or stream
   them as Server-Sent Events;
6. whatever happens - success, timeout, client disconnect, error - ``_finish`` aborts
   what still runs, releases the place, charges the completion tokens and fills in the
   access-log record. It never awaits, so it is safe while a task is being cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from tokenmill.engine.async_engine import EngineDeadError
from tokenmill.sampling import SamplingParams
from tokenmill.server import responses
from tokenmill.server.accesslog import RequestRecord, get_record
from tokenmill.server.config import ServerConfig
from tokenmill.server.errors import (
    APIError,
    context_length_exceeded,
    internal_error,
    invalid_param,
    model_not_found,
    rate_limited,
    request_timeout,
    unavailable,
)
from tokenmill.server.generation import GenerationRun
from tokenmill.server.lifecycle import Admission, EngineHost, ServerState
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
    parse_json,
    parse_request,
)
from tokenmill.server.ratelimit import RateLimiter
from tokenmill.server.sse import SSE_DONE, SSE_HEADERS, SSE_MEDIA_TYPE, sse_event

logger = logging.getLogger("tokenmill.server")

T = TypeVar("T")

# Status logged for a request whose client went away before the answer (nginx's).
CLIENT_CLOSED_REQUEST = 499


@dataclass
class Job:
    """One admitted completion request and everything needed to answer and clean it up."""

    kind: str  # "chat" | "completion"
    request: ChatCompletionRequest | CompletionRequest
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

    @property
    def num_logprobs(self) -> int | None:
        return self.request.num_logprobs


class OpenAIServing:
    """Handles the OpenAI-compatible endpoints on top of an ``EngineHost``."""

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
        self._token_texts: dict[int, str] = {}
        self._background: set[asyncio.Task[Any]] = set()

    # ----- models and tokens --------------------------------------------------------------

    @property
    def engine(self) -> Any:
        self.host.require_ready()
        return self.host.engine

    def model_names(self) -> list[str]:
        if self.config.served_model_names:
            return list(self.config.served_model_names)
        return [str(self.engine.model_name)]

    def resolve_model(self, requested: str | None) -> str:
        names = self.model_names()
        if requested is None or requested == "":
            return names[0]
        if requested not in names:
            raise model_not_found(requested)
        return requested

    def token_text(self, token_id: int) -> str:
        """The text of one token, as shown in logprob entries (cached)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self.engine.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_texts[token_id] = text
        return text

    def _check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = int(self.engine.tokenizer.vocab_size)
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise invalid_param(f"Token id {bad} is out of the vocabulary range [0, {vocab}).",
                                param)

    # ----- /tokenize, /detokenize --------------------------------------------------------

    async def tokenize(self, request: Request) -> dict[str, Any]:
        req = parse_request(TokenizeRequest, parse_json(await request.body()))
        engine = self.engine
        self.resolve_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise invalid_param("Give exactly one of 'prompt' or 'messages'.", "prompt")
        if req.messages is not None:
            messages = [m.to_template_dict(i) for i, m in enumerate(req.messages)]
            text = self._apply_chat_template(messages, req.add_generation_prompt)
            tokens = engine.tokenizer.encode(text, add_special_tokens=False)
        else:
            tokens = engine.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return {"count": len(tokens), "max_model_len": engine.max_model_len, "tokens": tokens}

    async def detokenize(self, request: Request) -> dict[str, Any]:
        req = parse_request(DetokenizeRequest, parse_json(await request.body()))
        engine = self.engine
        self.resolve_model(req.model)
        self._check_token_ids(req.tokens, "tokens")
        return {"prompt": engine.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    def _apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool
    ) -> str:
        try:
            return self.engine.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt
            )
        except ValueError as exc:
            raise invalid_param(f"Invalid messages: {exc}", "messages") from None

    # ----- completions ----------------------------------------------------------------------

    async def chat_completions(self, request: Request, identity: str) -> Response:
        record = get_record(request)
        req = parse_request(ChatCompletionRequest, parse_json(await request.body()))
        _note_request(record, req)
        engine = self.engine
        model = record.model = self.resolve_model(req.model)
        req.check_supported(self.config.max_n)
        messages = req.template_messages()
        prompt_text = self._apply_chat_template(messages, req.add_generation_prompt)
        token_ids = engine.tokenizer.encode(prompt_text, add_special_tokens=False)
        if self.config.log_prompts:
            record.prompt = messages
        job = await self._submit("chat", req, model, [token_ids], [prompt_text], identity, record)
        if req.stream:
            return self._stream(job, self._chat_events(job))
        return await self._respond(request, job, self._chat_body)

    async def completions(self, request: Request, identity: str) -> Response:
        record = get_record(request)
        req = parse_request(CompletionRequest, parse_json(await request.body()))
        _note_request(record, req)
        engine = self.engine
        model = record.model = self.resolve_model(req.model)
        req.check_supported(self.config.max_n)
        prompt_ids: list[list[int]] = []
        prompt_texts: list[str] = []
        for prompt in req.prompts():
            if isinstance(prompt, str):
                prompt_texts.append(prompt)
                prompt_ids.append(engine.tokenizer.encode(prompt, add_special_tokens=True))
            else:
                self._check_token_ids(prompt, "prompt")
                prompt_ids.append(prompt)
                prompt_texts.append(
                    engine.tokenizer.decode(prompt, skip_special_tokens=False) if req.echo else ""
                )
        if self.config.log_prompts:
            record.prompt = req.prompt
        job = await self._submit(
            "completion", req, model, prompt_ids, prompt_texts, identity, record
        )
        if req.stream:
            return self._stream(job, self._completion_events(job))
        return await self._respond(request, job, self._completion_body)

    async def _submit(
        self,
        kind: str,
        req: ChatCompletionRequest | CompletionRequest,
        model: str,
        prompt_ids: list[list[int]],
        prompt_texts: list[str],
        identity: str,
        record: RequestRecord,
    ) -> Job:
        """Validate against the engine's limits, admit, rate-limit and start generation."""
        engine = self.engine
        prompt_param = "messages" if kind == "chat" else "prompt"
        max_tokens = _max_tokens(req, prompt_ids, int(engine.max_model_len), prompt_param)
        params = self._sampling_params(req, max_tokens)
        if req.priority != 0 and self.config.engine_args.get("scheduling_policy") != "priority":
            raise invalid_param(
                "priority is only accepted when the server runs with "
                "--scheduling-policy priority.", "priority")
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
            headers = await self._charge_admission(identity, record.prompt_tokens)
        except BaseException:
            admission.release()
            raise
        self.metrics.in_flight.inc()
        deadline = None
        if self.config.request_timeout is not None:
            deadline = asyncio.get_running_loop().time() + self.config.request_timeout
        run = GenerationRun(
            engine, prompt_ids, params, engine_ids, req.priority, self.metrics, deadline
        )
        job = Job(kind, req, response_id, int(time.time()), model, prompt_texts, run,
                  admission, identity, record, headers)
        admission.interrupt = lambda: run.interrupt(self._abort_error())
        try:
            await run.start()
        except Exception as exc:
            error = _engine_error(exc)
            job.outcome = "error"
            job.record.error_code = error.code
            self._finish(job, "error")
            raise error from None
        except BaseException:
            self._finish(job, "abort")
            raise
        return job

    def _sampling_params(
        self, req: ChatCompletionRequest | CompletionRequest, max_tokens: int
    ) -> SamplingParams:
        """Build the engine's parameters; its validation errors become 400s naming the field."""
        kwargs = req.sampling_kwargs(max_tokens)
        if req.num_logprobs is not None:
            kwargs["logprobs"] = req.num_logprobs
        try:
            return SamplingParams(**kwargs)
        except (ValueError, TypeError) as exc:
            param = getattr(exc, "param", None)
            if param == "max_tokens":
                param = req.max_tokens_param
            elif param == "logprobs" and isinstance(req, ChatCompletionRequest):
                param = "top_logprobs"
            raise invalid_param(str(exc), param) from None

    async def _charge_admission(self, identity: str, prompt_tokens: int) -> dict[str, str]:
        """Apply the rate limit; return the x-ratelimit headers for the response."""
        if self.limiter is None:
            return {}
        decision = await self.limiter.acquire(identity, prompt_tokens)
        headers = decision.headers(self.limiter.limits)
        if not decision.allowed:
            self.metrics.rate_limited.labels(limit=decision.limited_by or "unknown").inc()
            raise rate_limited(decision.message(self.limiter.limits), decision.retry_after,
                               headers)
        return headers

    def _finish(self, job: Job, reason: str) -> None:
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

    def _abort_error(self) -> APIError:
        if self.host.state is ServerState.DRAINING:
            return unavailable("The request was aborted because the server is shutting down.",
                               "server_draining")
        return internal_error("The request was aborted by the engine.")

    def _finish_reason(self, reason: str | None) -> str | None:
        if reason == "abort":
            raise self._abort_error()
        return reason

    def _usage(self, job: Job) -> dict[str, Any]:
        run = job.run
        return responses.usage_dict(run.prompt_tokens, run.completion_tokens,
                                    run.total_cached_tokens)

    # ----- non-streamed answers -------------------------------------------------------------

    async def _respond(
        self, request: Request, job: Job, build: Callable[[Job], Awaitable[dict[str, Any]]]
    ) -> Response:
        try:
            body = await run_until_disconnect(request.receive, build(job))
            job.outcome = "ok" if body is not None else None
        except asyncio.TimeoutError:
            job.outcome = "timeout"
            self._finish(job, "timeout")
            raise request_timeout(self.config.request_timeout or 0) from None
        except Exception as exc:
            error = _engine_error(exc)
            job.outcome = "error"
            self._finish(job, _reason_for(error))
            raise error from None
        finally:
            self._finish(job, "abort")
        if body is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return JSONResponse(body, headers=job.headers)

    async def _collect(self, job: Job) -> list[responses.ChoiceResult]:
        n = job.request.n
        choices: dict[int, responses.ChoiceResult] = {}
        async for prompt_index, output in job.run.outputs():
            for out in output.outputs:
                index = prompt_index * n + out.index
                choice = choices.setdefault(index, responses.ChoiceResult(index, "", [], []))
                choice.text += out.delta_text
                choice.token_ids.extend(out.delta_token_ids)
                if out.delta_logprobs:
                    choice.logprobs.extend(out.delta_logprobs)  # type: ignore[union-attr]
                if out.finish_reason is not None:
                    choice.finish_reason = self._finish_reason(out.finish_reason)
        return [choices[i] for i in sorted(choices)]

    async def _chat_body(self, job: Job) -> dict[str, Any]:
        choices = await self._collect(job)
        return responses.chat_completion(
            job.response_id, job.created, job.model, choices, self._usage(job),
            job.num_logprobs, self.token_text,
        )

    async def _completion_body(self, job: Job) -> dict[str, Any]:
        choices = await self._collect(job)
        n = job.request.n
        prefixes = None
        if getattr(job.request, "echo", False):
            prefixes = {c.index: job.prompt_texts[c.index // n] for c in choices}
        return responses.text_completion(
            job.response_id, job.created, job.model, choices, self._usage(job),
            job.num_logprobs, self.token_text, prefixes,
        )

    # ----- streamed answers -------------------------------------------------------------------

    def _stream(self, job: Job, events: AsyncIterator[bytes]) -> Response:
        headers = {**SSE_HEADERS, **job.headers}
        return _SSEResponse(events, on_close=lambda: self._finish(job, "abort"),
                            media_type=SSE_MEDIA_TYPE, headers=headers)

    async def _guarded_events(
        self, job: Job, events: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        """Turn failures during a stream into an error event, then always end with [DONE]."""
        try:
            async for event in events:
                yield event
            job.outcome = "ok"
        except asyncio.TimeoutError:
            job.outcome = "timeout"
            self._finish(job, "timeout")
            error = request_timeout(self.config.request_timeout or 0)
            job.record.error_code = error.code
            yield sse_event(error.to_dict())
        except Exception as exc:
            error = _engine_error(exc)
            job.outcome = "error"
            self._finish(job, _reason_for(error))
            job.record.error_code = error.code
            yield sse_event(error.to_dict())
        self._finish(job, "abort")
        yield SSE_DONE

    def _chat_events(self, job: Job) -> AsyncIterator[bytes]:
        return self._guarded_events(job, self._chat_chunks(job))

    async def _chat_chunks(self, job: Job) -> AsyncIterator[bytes]:
        req = job.request
        include_usage = req.include_usage

        def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
            return sse_event(responses.chat_chunk(
                job.response_id, job.created, job.model, choices, include_usage, usage))

        for index in range(req.n):
            role = {"role": "assistant", "content": ""}
            yield chunk([responses.chat_chunk_choice(index, role)])
        done: set[int] = set()
        async for _, output in job.run.outputs():
            for out in output.outputs:
                if out.index in done:
                    continue
                finish = self._finish_reason(out.finish_reason)
                if not out.delta_text and finish is None and not out.delta_logprobs:
                    continue
                logprobs = None
                if job.num_logprobs is not None:
                    logprobs = responses.chat_logprobs(
                        out.delta_logprobs or [], job.num_logprobs, self.token_text)
                delta = {"content": out.delta_text} if out.delta_text else {}
                yield chunk([responses.chat_chunk_choice(out.index, delta, finish, logprobs)])
                if finish is not None:
                    done.add(out.index)
        if include_usage:
            yield chunk([], self._usage(job))

    def _completion_events(self, job: Job) -> AsyncIterator[bytes]:
        return self._guarded_events(job, self._completion_chunks(job))

    async def _completion_chunks(self, job: Job) -> AsyncIterator[bytes]:
        req = job.request
        assert isinstance(req, CompletionRequest)
        include_usage = req.include_usage
        n = req.n

        def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
            return sse_event(responses.completion_chunk(
                job.response_id, job.created, job.model, choices, include_usage, usage))

        offsets: dict[int, int] = {}
        if req.echo:
            for prompt_index, text in enumerate(job.prompt_texts):
                for choice in range(n):
                    index = prompt_index * n + choice
                    offsets[index] = len(text)
                    yield chunk([responses.completion_chunk_choice(index, text)])
        done: set[int] = set()
        async for prompt_index, output in job.run.outputs():
            for out in output.outputs:
                index = prompt_index * n + out.index
                if index in done:
                    continue
                finish = self._finish_reason(out.finish_reason)
                if not out.delta_text and finish is None and not out.delta_logprobs:
                    continue
                logprobs = None
                if job.num_logprobs is not None:
                    logprobs, offsets[index] = responses.completion_logprobs(
                        out.delta_logprobs or [], job.num_logprobs, self.token_text,
                        offsets.get(index, 0))
                yield chunk([responses.completion_chunk_choice(
                    index, out.delta_text, finish, logprobs)])
                if finish is not None:
                    done.add(index)
        if include_usage:
            yield chunk([], self._usage(job))


class _SSEResponse(StreamingResponse):
    """A streaming response that runs ``on_close`` however the stream ends.

    Starlette cancels the stream when the client disconnects, possibly before the body
    iterator ever started; ``on_close`` (synchronous) releases what the request holds.
    """

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None],
                 **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def run_until_disconnect(receive: Receive, work: Coroutine[Any, Any, T]) -> T | None:
    """Run ``work`` unless the client disconnects first; then cancel it and return None.

    Only for handlers that have read the whole body: after that, the next ASGI message
    is ``http.disconnect`` when the client goes away.
    """
    task: asyncio.Task[T] = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        listener.cancel()
        raise
    if task.done():
        listener.cancel()
        return task.result()
    task.cancel()
    try:
        await task
    except BaseException:  # noqa: BLE001 - the client is gone; nothing to report to
        pass
    return None


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _note_request(record: RequestRecord, req: SamplingFields) -> None:
    record.model = req.model
    record.user = req.user
    record.stream = req.stream
    record.n = req.n


def _max_tokens(
    req: ChatCompletionRequest | CompletionRequest,
    prompts: list[list[int]],
    max_model_len: int,
    prompt_param: str,
) -> int:
    """The completion budget: as requested, or what is left of the context."""
    if any(len(p) == 0 for p in prompts):
        raise invalid_param("The prompt is empty.", prompt_param)
    longest = max(len(p) for p in prompts)
    requested = req.requested_max_tokens
    if longest >= max_model_len:
        raise context_length_exceeded(max_model_len, longest, requested or 1, prompt_param)
    if requested is None:
        return max_model_len - longest
    if longest + requested > max_model_len:
        raise context_length_exceeded(max_model_len, longest, requested, req.max_tokens_param)
    return requested


def _reason_for(error: APIError) -> str:
    """The finish reason that metrics record for a request that ended with ``error``."""
    return "abort" if error.code == "server_draining" else "error"


def _engine_error(exc: BaseException) -> APIError:
    """Map an exception from the engine to the error the client sees."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineDeadError):
        return unavailable("The engine is not running.", "engine_dead", 30)
    if isinstance(exc, ValueError):
        # RequestRejected: the request can never be served (context, KV capacity, bad ids).
        code = getattr(exc, "code", None) or "invalid_value"
        return APIError(400, str(exc), code=code)
    logger.error("engine error: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return internal_error()
