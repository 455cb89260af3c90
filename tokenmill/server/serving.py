"""The OpenAI-compatible endpoints: from an HTTP request to a job and its answer.

For chat and text completions:

1. read the body (413 past ``--max-request-body-size``) and validate it strictly
   (400 naming the parameter);
2. resolve the model (404); render the chat template and tokenize off the event
   loop, after a cheap length check that refuses hopeless prompts first;
3. hand the prompts to :class:`~tokenmill.server.jobs.JobRunner` (admission, rate
   limit, engine) and the job to :class:`~tokenmill.server.streaming.Responder`
   (one JSON body or Server-Sent Events).
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from tokenmill.server.accesslog import RequestRecord, get_record
from tokenmill.server.body import read_json_body
from tokenmill.server.chat_output import (
    ChatOutputSpec,
    ToolPlan,
    choose_parser,
    prepare_messages,
    template_renders_tools,
)
from tokenmill.server.config import ServerConfig
from tokenmill.server.errors import invalid_param, model_not_found
from tokenmill.server.jobs import JobRunner
from tokenmill.server.lifecycle import EngineHost
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.prompts import PromptBuilder
from tokenmill.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
    parse_request,
)
from tokenmill.server.ratelimit import RateLimiter
from tokenmill.server.streaming import Responder
from tokenmill.server.structured import check_constraint_async, resolve_constraint
from tokenmill.tokenizer.reasoning import get_reasoning_format

logger = logging.getLogger("tokenmill.server")


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
        self.jobs = JobRunner(config, host, metrics, limiter)
        self.responder = Responder(self.jobs, self.token_text, config.request_timeout)
        self._prompts: PromptBuilder | None = None
        self._token_texts: dict[int, str] = {}

    async def engine_ready(self, engine: Any) -> None:
        """Prepare what needs the engine's tokenizer (off the event loop)."""
        import asyncio

        if engine.tokenizer is None:
            return
        prompts = PromptBuilder(engine.tokenizer, int(engine.max_model_len))
        await asyncio.get_running_loop().run_in_executor(None, prompts.prepare)
        self._prompts = prompts

    def close(self) -> None:
        if self._prompts is not None:
            self._prompts.close()

    # ----- models and tokens --------------------------------------------------------------

    @property
    def engine(self) -> Any:
        self.host.require_ready()
        return self.host.engine

    @property
    def prompts(self) -> PromptBuilder:
        self.host.require_ready()
        if self._prompts is None:
            raise invalid_param("This model has no tokenizer: send token ids.", "prompt")
        return self._prompts

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

    async def _body(self, request: Request) -> dict[str, Any]:
        return await read_json_body(request, self.config.max_request_body_size)

    # ----- /tokenize, /detokenize --------------------------------------------------------

    async def tokenize(self, request: Request) -> dict[str, Any]:
        req = parse_request(TokenizeRequest, await self._body(request))
        self.resolve_model(req.model)
        prompts = self.prompts
        if (req.prompt is None) == (req.messages is None):
            raise invalid_param("Give exactly one of 'prompt' or 'messages'.", "prompt")
        if req.messages is not None:
            messages = [m.to_template_dict(i) for i, m in enumerate(req.messages)]
            _, tokens = await prompts.encode_chat(messages, req.add_generation_prompt)
        else:
            tokens = await prompts.encode(req.prompt, req.add_special_tokens, "prompt")
        return {"count": len(tokens), "max_model_len": self.engine.max_model_len,
                "tokens": tokens}

    async def detokenize(self, request: Request) -> dict[str, Any]:
        req = parse_request(DetokenizeRequest, await self._body(request))
        self.resolve_model(req.model)
        self.prompts.check_token_ids(req.tokens, "tokens")
        return {"prompt": self.engine.tokenizer.decode(req.tokens, skip_special_tokens=False)}

    # ----- render (vLLM's shape) --------------------------------------------------------------

    async def render_chat(self, request: Request) -> dict[str, Any]:
        """The chat request's prompt token ids, as vLLM's ``/v1/chat/completions/render``."""
        req = parse_request(ChatCompletionRequest, await self._body(request))
        model = self.resolve_model(req.model)
        token_ids = (await self._chat_prompt(req))[4]  # rendered exactly as the real request
        return _generate_request(f"chatcmpl-{get_record(request).request_id}", model,
                                 token_ids)

    async def render_completion(self, request: Request) -> list[dict[str, Any]]:
        """One entry per prompt, as vLLM's ``/v1/completions/render``."""
        req = parse_request(CompletionRequest, await self._body(request))
        model = self.resolve_model(req.model)
        req.check_supported(self.config.max_n, self.config.max_prompts_per_request)
        rid = f"cmpl-{get_record(request).request_id}"
        out = []
        for i, prompt in enumerate(req.prompts()):
            ids = (await self.prompts.encode(prompt, True, "prompt")
                   if isinstance(prompt, str) else prompt)
            out.append(_generate_request(f"{rid}-{i}", model, ids))
        return out

    # ----- completions ----------------------------------------------------------------------

    async def _chat_prompt(self, req: ChatCompletionRequest) -> tuple[Any, Any, list[Any], str,
                                                                      list[int]]:
        """Tools plan, grammar constraint, final messages, prompt text and token ids."""
        prompts = self.prompts
        messages = req.template_messages()
        plan = self._tool_plan(req)
        template = self.engine.tokenizer.chat_template_source(with_tools=bool(req.tools))
        template_has_tools = template_renders_tools(template)
        if plan.mode != "none" or _has_tool_history(messages):
            messages = prepare_messages(messages, plan, template_has_tools)
        constraint = resolve_constraint(req, plan)
        if constraint is not None:
            await check_constraint_async(constraint)
        kwargs = _template_kwargs(req.chat_template_kwargs)
        if template_has_tools and plan.template_tools():
            kwargs["tools"] = plan.template_tools()
        prompt_text, token_ids = await prompts.encode_chat(
            messages, req.add_generation_prompt, **kwargs)
        return plan, constraint, messages, prompt_text, token_ids

    async def chat_completions(self, request: Request, identity: str) -> Response:
        record = get_record(request)
        req = parse_request(ChatCompletionRequest, await self._body(request))
        _note_request(record, req)
        model = record.model = self.resolve_model(req.model)
        req.check_supported(self.config.max_n)
        plan, constraint, messages, prompt_text, token_ids = await self._chat_prompt(req)
        if self.config.log_prompts:
            record.prompt = messages
        reasoning = self.config.reasoning_parser
        output = ChatOutputSpec(plan, get_reasoning_format(reasoning) if reasoning else None,
                                prompt_text)
        job = await self.jobs.submit("chat", req, model, [token_ids], [prompt_text], identity,
                                     record, constraint=constraint, output=output)
        if req.stream:
            return self.responder.stream(job)
        return await self.responder.respond(request, job)

    def _tool_plan(self, req: ChatCompletionRequest) -> ToolPlan:
        tokenizer = self.engine.tokenizer
        parser = choose_parser(self.config.tool_call_parser,
                               tokenizer.chat_template_source(with_tools=True))
        return ToolPlan.from_request(req.tool_dicts(), req.tool_choice_value(),
                                     req.parallel_tool_calls, parser)

    async def completions(self, request: Request, identity: str) -> Response:
        record = get_record(request)
        req = parse_request(CompletionRequest, await self._body(request))
        _note_request(record, req)
        model = record.model = self.resolve_model(req.model)
        req.check_supported(self.config.max_n, self.config.max_prompts_per_request)
        prompt_ids: list[list[int]] = []
        prompt_texts: list[str] = []
        engine_texts: list[str | None] = []
        for prompt in req.prompts():
            if isinstance(prompt, str):
                prompt_texts.append(prompt)
                engine_texts.append(prompt)
                prompt_ids.append(await self.prompts.encode(prompt, True, "prompt"))
            else:
                prompt_ids.append(prompt)
                engine_texts.append(None)
                prompt_texts.append(
                    self.engine.tokenizer.decode(prompt, skip_special_tokens=False)
                    if req.echo else "")
        if self.config.log_prompts:
            record.prompt = req.prompt
        constraint = resolve_constraint(req)
        if constraint is not None:
            await check_constraint_async(constraint)
        job = await self.jobs.submit("completion", req, model, prompt_ids, prompt_texts,
                                     identity, record, engine_texts, constraint=constraint)
        if req.stream:
            return self.responder.stream(job)
        return await self.responder.respond(request, job)


def _generate_request(request_id: str, model: str, token_ids: list[int]) -> dict[str, Any]:
    return {"request_id": request_id, "model": model, "token_ids": token_ids, "features": None}


def _has_tool_history(messages: list[dict[str, Any]]) -> bool:
    return any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)


_RESERVED_TEMPLATE_KWARGS = ("messages", "tools", "add_generation_prompt")


def _template_kwargs(given: dict[str, Any] | None) -> dict[str, Any]:
    """``chat_template_kwargs`` (e.g. enable_thinking), minus what the server sets itself."""
    kwargs = dict(given or {})
    for name in _RESERVED_TEMPLATE_KWARGS:
        if name in kwargs:
            raise invalid_param(f"chat_template_kwargs may not set {name!r}.",
                                "chat_template_kwargs")
    return kwargs


def _note_request(record: RequestRecord, req: SamplingFields) -> None:
    record.model = req.model
    record.user = req.user
    record.stream = req.stream
    record.n = req.n
