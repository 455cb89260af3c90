"""Request bodies of the OpenAI-compatible API and their validation.

Pydantic models check types (strictly: ``"10"`` is not an integer, ``"yes"`` not a
boolean) and the ranges OpenAI documents; unknown fields are ignored (as OpenAI
does). ``parse_request`` turns any validation failure into a 400 ``APIError``
that names the offending parameter. The models also know how to
express themselves as ``SamplingParams`` keyword arguments, so the serving code
never has to know which API field maps to which engine field.
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tokenmill.server.errors import APIError, invalid_param

# OpenAI documents these bounds; the engine may accept wider ones.
MAX_TOP_LOGPROBS = 20
MAX_STOP_SEQUENCES = 16
# OpenAI's default completion length for /v1/completions (also when null is sent).
DEFAULT_COMPLETION_MAX_TOKENS = 16


class _Body(BaseModel):
    # strict: no coercion of "10" to 10 or "yes" to True (an int still fills a float).
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class ContentPart(_Body):
    type: str
    text: str | None = None


class ToolCallFunction(_Body):
    name: str
    arguments: str | dict[str, Any] = "{}"


class MessageToolCall(_Body):
    """A tool call in an assistant message of the conversation so far."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages: the call this answers
    reasoning_content: str | None = None  # assistant messages of reasoning models

    def to_template_dict(self, index: int) -> dict[str, Any]:
        """The ``{"role", "content", ...}`` dict a chat template consumes."""
        message = self._content_dict(index)
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name,
                              "arguments": c.function.arguments
                              if isinstance(c.function.arguments, str)
                              else json.dumps(c.function.arguments, ensure_ascii=False)}}
                for c in self.tool_calls]
        if self.role == "tool":
            if self.content is None:
                raise invalid_param("A tool message needs content (the tool's result).",
                                    f"messages[{index}].content")
            if self.tool_call_id is not None:
                message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        if self.reasoning_content is not None:
            message["reasoning_content"] = self.reasoning_content
        return message

    def _content_dict(self, index: int) -> dict[str, Any]:
        role = "system" if self.role == "developer" else self.role
        if self.content is None:
            text = ""
        elif isinstance(self.content, str):
            text = self.content
        else:
            texts = []
            for part_index, part in enumerate(self.content):
                if part.type != "text" or part.text is None:
                    raise invalid_param(
                        f"Content parts of type {part.type!r} are not supported; "
                        "this model accepts text only.",
                        f"messages[{index}].content[{part_index}].type",
                    )
                texts.append(part.text)
            text = "\n".join(texts)
        return {"role": role, "content": text}


class JsonSchemaFormat(_Body):
    """``response_format.json_schema``: OpenAI's structured outputs."""

    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)

    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsField(_Body):
    """vLLM's ``structured_outputs`` request field: exactly one constraint."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_fallback: bool | None = None  # accepted: there is no other backend to fall to
    disable_additional_properties: bool | None = None  # accepted: strict schemas are used


class FunctionDefinition(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class SamplingFields(_Body):
    """Fields shared by chat and text completions."""

    model: str | None = None
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None
    # Extra sampling fields (vLLM names) that the engine supports.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = 0
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs and its
    # older guided_* names (see docs/structured-output.md). At most one of them.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # accepted; xgrammar is always used
    guided_whitespace_pattern: str | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if len(stops) > MAX_STOP_SEQUENCES:
            raise invalid_param(f"At most {MAX_STOP_SEQUENCES} stop sequences are allowed.", "stop")
        if any(s == "" for s in stops):
            raise invalid_param("Stop sequences must not be empty.", "stop")
        return stops

    def check_supported(self, max_n: int, max_prompts: int = 1) -> None:
        """Reject fields we parse but cannot honour, instead of silently ignoring them."""
        if self.n > max_n:
            raise invalid_param(f"n must be at most {max_n}, got {self.n}.", "n")
        if self.best_of is not None and self.best_of != self.n:
            raise invalid_param("best_of is not supported (it must equal n).", "best_of")

    def sampling_kwargs(self, max_tokens: int) -> dict[str, Any]:
        """Keyword arguments for ``SamplingParams``; unset optional fields keep its defaults."""
        kwargs: dict[str, Any] = {
            "n": self.n,
            "max_tokens": max_tokens,
            "min_tokens": self.min_tokens,
            "stop": self.stop_list(),
            "ignore_eos": self.ignore_eos,
            "skip_special_tokens": self.skip_special_tokens,
            "include_stop_str_in_output": self.include_stop_str_in_output,
        }
        optional = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "seed": self.seed,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "stop_token_ids": self.stop_token_ids,
            "logit_bias": self.logit_bias or None,
        }
        kwargs.update({k: v for k, v in optional.items() if v is not None})
        return kwargs


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: bool = True
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = None  # e.g. {"enable_thinking": false}

    @property
    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` is the newer name and wins when both are given."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def num_logprobs(self) -> int | None:
        """How many alternatives per token to return, or None for no logprobs."""
        if not self.logprobs:
            return None
        return self.top_logprobs or 0

    def check_supported(self, max_n: int, max_prompts: int = 1) -> None:
        super().check_supported(max_n)
        if self.top_logprobs and not self.logprobs:
            raise invalid_param("top_logprobs requires logprobs to be true.", "top_logprobs")

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.to_template_dict(i) for i, m in enumerate(self.messages)]

    def tool_dicts(self) -> list[dict[str, Any]]:
        """The tools as plain OpenAI tool objects (what chat templates render)."""
        return [t.model_dump(exclude_none=True, by_alias=True) for t in self.tools or []]

    def tool_choice_value(self) -> Any:
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.model_dump()
        return self.tool_choice


class CompletionRequest(SamplingFields):
    prompt: Any
    max_tokens: int | None = Field(DEFAULT_COMPLETION_MAX_TOKENS, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        # null means OpenAI's default here, not "to the end of the context".
        return DEFAULT_COMPLETION_MAX_TOKENS if self.max_tokens is None else self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        return "max_tokens"

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    def check_supported(self, max_n: int, max_prompts: int = 1) -> None:
        super().check_supported(max_n)
        count = len(self.prompts())
        if count > max_prompts:
            raise invalid_param(
                f"At most {max_prompts} prompts are accepted per request, got {count}; send "
                "them as separate requests.", "prompt")
        if self.suffix:
            raise invalid_param("suffix is not supported.", "suffix")
        if self.echo and self.logprobs is not None:
            raise invalid_param("echo together with logprobs is not supported.", "echo")

    def prompts(self) -> list[str | list[int]]:
        """Normalise ``prompt`` (string, strings, token ids, lists of token ids) to a list."""
        return normalize_prompt(self.prompt)


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def normalize_prompt(prompt: Any) -> list[str | list[int]]:
    """Accept every prompt form OpenAI's completions endpoint accepts."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(_is_token_id(t) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, list) and p and all(_is_token_id(t) for t in p) for p in prompt):
            return [list(p) for p in prompt]
    raise invalid_param(
        "prompt must be a string, a list of strings, a list of token ids or a list of "
        "lists of token ids, and must not be empty.",
        "prompt",
    )


Body = TypeVar("Body", bound=BaseModel)


def parse_request(model_type: type[Body], data: dict[str, Any]) -> Body:
    """Validate a decoded body; the first problem becomes a 400 naming its parameter."""
    try:
        return model_type.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def validation_error(exc: ValidationError) -> APIError:
    first = exc.errors(include_url=False)[0]
    param = loc_to_param(first.get("loc", ()))
    message = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        return invalid_param(f"Missing required parameter: '{param}'.", param,
                             code="missing_required_parameter")
    got = first.get("input")
    shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
    return invalid_param(f"Invalid value for '{param}': {message}{shown}.", param)


def loc_to_param(loc: tuple[Any, ...] | list[Any]) -> str:
    """('messages', 0, 'role') -> 'messages[0].role'; union branch names are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and ("[" in part or part in _UNION_TAGS):
            continue  # pydantic names union branches like 'list[ContentPart]' or 'str'
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after",
               "NamedToolChoice"}
