"""Turning a running job's output deltas into OpenAI responses: one JSON body, or SSE.

Deltas arrive per engine request (prompt) and per choice; a non-streamed answer
appends them into one :class:`~tokenmill.server.responses.ChoiceResult` per
choice, a streamed one sends each delta as a chunk. Either way the job is
finished (its resources released) however the answer ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tokenmill.server import responses
from tokenmill.server.asgi import CLIENT_CLOSED_REQUEST, SSEResponse, run_until_disconnect
from tokenmill.server.chat_output import ChoiceDelta, finish_reason_with_tools
from tokenmill.server.errors import engine_error, request_timeout
from tokenmill.server.jobs import Job, JobRunner
from tokenmill.server.protocol import CompletionRequest
from tokenmill.server.sse import SSE_DONE, SSE_HEADERS, SSE_MEDIA_TYPE, sse_event
from tokenmill.server.tool_parsers import merge_calls

TokenText = Callable[[int], str]


class Responder:
    """Writes the answer of a job, in one body or as a stream."""

    def __init__(self, jobs: JobRunner, token_text: TokenText,
                 request_timeout: float | None) -> None:
        self.jobs = jobs
        self.token_text = token_text
        self.request_timeout = request_timeout

    # ----- non-streamed answers -------------------------------------------------------------

    async def respond(self, request: Request, job: Job) -> Response:
        build = self._chat_body if job.kind == "chat" else self._completion_body
        return await self._respond(request, job, build)

    async def _respond(
        self, request: Request, job: Job, build: Callable[[Job], Awaitable[dict[str, Any]]]
    ) -> Response:
        try:
            body = await run_until_disconnect(request.receive, build(job))
            job.outcome = "ok" if body is not None else None
        except asyncio.TimeoutError:
            job.outcome = "timeout"
            self.jobs.finish(job, "timeout")
            raise request_timeout(self.request_timeout or 0) from None
        except Exception as exc:
            error = engine_error(exc, job.param_names)
            job.outcome = "error"
            self.jobs.finish(job, self.jobs.reason_for(error))
            raise error from None
        finally:
            self.jobs.finish(job, "abort")
        if body is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return JSONResponse(body, headers=job.headers)

    async def _collect(self, job: Job) -> list[responses.ChoiceResult]:
        n = job.request.n
        choices: dict[int, responses.ChoiceResult] = {}
        text_parts: dict[int, list[str]] = {}
        async for prompt_index, output in job.run.outputs():
            for out in output.outputs:
                index = prompt_index * n + out.index
                choice = choices.setdefault(index, responses.ChoiceResult(index, "", [], []))
                text_parts.setdefault(index, []).append(out.text)
                choice.token_ids.extend(out.token_ids)
                if out.logprobs:
                    choice.logprobs.extend(out.logprobs)  # type: ignore[union-attr]
                if out.finish_reason is not None:
                    choice.finish_reason = self.jobs.finish_reason(out.finish_reason)
        for index, parts in text_parts.items():
            choices[index].text = "".join(parts)
        return [choices[i] for i in sorted(choices)]

    async def _chat_body(self, job: Job) -> dict[str, Any]:
        choices = await self._collect(job)
        spec = job.output
        if spec is not None and spec.active:
            for choice in choices:
                parser = spec.new_choice()
                parsed = parser.feed(choice.text)
                rest = parser.finish()
                choice.text = parsed.content + rest.content
                if parser.reasoning is not None and parser.reasoning.saw_block:
                    choice.reasoning_content = parsed.reasoning + rest.reasoning
                calls = merge_calls(parsed.tool_calls + rest.tool_calls)
                if calls:
                    choice.tool_calls = [c.to_dict() for c in calls]
                choice.finish_reason = finish_reason_with_tools(choice.finish_reason,
                                                                len(calls))
        return responses.chat_completion(
            job.response_id, job.created, job.model, choices, self.jobs.usage(job),
            job.num_logprobs, self.token_text,
            with_reasoning=spec is not None and spec.reasoning is not None,
        )

    async def _completion_body(self, job: Job) -> dict[str, Any]:
        choices = await self._collect(job)
        n = job.request.n
        prefixes = None
        if getattr(job.request, "echo", False):
            prefixes = {c.index: job.prompt_texts[c.index // n] for c in choices}
        return responses.text_completion(
            job.response_id, job.created, job.model, choices, self.jobs.usage(job),
            job.num_logprobs, self.token_text, prefixes,
        )

    # ----- streamed answers -------------------------------------------------------------------

    def stream(self, job: Job) -> Response:
        chunks = self._chat_chunks(job) if job.kind == "chat" else self._completion_chunks(job)
        headers = {**SSE_HEADERS, **job.headers}
        return SSEResponse(self._guarded_events(job, chunks),
                           on_close=lambda: self.jobs.finish(job, "abort"),
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
            self.jobs.finish(job, "timeout")
            error = request_timeout(self.request_timeout or 0)
            job.record.error_code = error.code
            yield sse_event(error.to_dict())
        except Exception as exc:
            error = engine_error(exc, job.param_names)
            job.outcome = "error"
            self.jobs.finish(job, self.jobs.reason_for(error))
            job.record.error_code = error.code
            yield sse_event(error.to_dict())
        self.jobs.finish(job, "abort")
        yield SSE_DONE

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
        spec = job.output if job.output is not None and job.output.active else None
        parsers = {index: spec.new_choice() for index in range(req.n)} if spec else {}
        async for _, output in job.run.outputs():
            for out in output.outputs:
                if out.index in done:
                    continue
                finish = self.jobs.finish_reason(out.finish_reason)
                if not out.text and finish is None and not out.logprobs:
                    continue
                logprobs = None
                if job.num_logprobs is not None:
                    logprobs = responses.chat_logprobs(
                        out.logprobs or [], job.num_logprobs, self.token_text)
                if spec is None:
                    delta: dict[str, Any] = {"content": out.text} if out.text else {}
                else:
                    parser = parsers[out.index]
                    parsed = parser.feed(out.text)
                    if finish is not None:
                        rest = parser.finish()
                        parsed.reasoning += rest.reasoning
                        parsed.content += rest.content
                        parsed.tool_calls += rest.tool_calls
                        finish = finish_reason_with_tools(finish, parser.num_calls)
                    if not parsed and finish is None and logprobs is None:
                        continue  # held back (a marker may be starting)
                    delta = _chat_delta(parsed)
                yield chunk([responses.chat_chunk_choice(out.index, delta, finish, logprobs)])
                if finish is not None:
                    done.add(out.index)
        if include_usage:
            yield chunk([], self.jobs.usage(job))

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
                finish = self.jobs.finish_reason(out.finish_reason)
                if not out.text and finish is None and not out.logprobs:
                    continue
                logprobs = None
                if job.num_logprobs is not None:
                    logprobs, offsets[index] = responses.completion_logprobs(
                        out.logprobs or [], job.num_logprobs, self.token_text,
                        offsets.get(index, 0))
                yield chunk([responses.completion_chunk_choice(
                    index, out.text, finish, logprobs)])
                if finish is not None:
                    done.add(index)
        if include_usage:
            yield chunk([], self.jobs.usage(job))


def _chat_delta(parsed: ChoiceDelta) -> dict[str, Any]:
    """A chunk's ``delta`` from a parsed piece: reasoning, content and tool-call deltas."""
    delta: dict[str, Any] = {}
    if parsed.reasoning:
        delta["reasoning_content"] = parsed.reasoning
    if parsed.content:
        delta["content"] = parsed.content
    if parsed.tool_calls:
        delta["tool_calls"] = [d.to_dict() for d in parsed.tool_calls]
    return delta

