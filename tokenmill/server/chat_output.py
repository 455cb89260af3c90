"""Tools in, tool calls and reasoning out: the chat-specific parts of a request's life.

Before generation, :class:`ToolPlan` decides what ``tools``/``tool_choice`` mean for
this request: which tools the chat template sees, which output parser reads the
answer, and (for ``required`` or a named function) the JSON schema a grammar forces
the answer into. Chat templates that know nothing of tools (SmolLM2's, plain ChatML)
get the tools described in a system message and past calls and results written into
the conversation in the parser's format, so the model sees them either way.

After generation, :class:`ChoiceParser` turns one choice's text, piece by piece, into
``reasoning_content``, ``content`` and tool-call deltas (:mod:`tool_parsers`); the
non-streamed answer is the same parser fed the whole text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tokenmill.server.errors import invalid_param
from tokenmill.server.tool_parsers import (
    TOOL_CALL_PARSERS,
    JsonArrayCalls,
    NamedCall,
    ToolCallDelta,
    ToolCallStream,
    parser_from_template,
)
from tokenmill.tokenizer.reasoning import ReasoningFormat, ReasoningParser

TOOL_CHOICES = ("none", "auto", "required")


@dataclass
class ToolPlan:
    """What a chat request's tools mean for prompt, grammar and output parsing."""

    mode: str  # "none" (no tools or tool_choice none) | "auto" | "required" | "named"
    tools: list[dict[str, Any]] = field(default_factory=list)  # OpenAI tool objects
    parser: str = "hermes"
    named: str | None = None  # the function a named tool_choice forces
    parallel: bool = True

    @classmethod
    def from_request(cls, tools: list[dict[str, Any]] | None, tool_choice: Any,
                     parallel: bool, parser: str) -> ToolPlan:
        """Check ``tool_choice`` against ``tools`` (400 naming the param) and plan."""
        tools = list(tools or [])
        names = [t["function"]["name"] for t in tools]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate is not None:
            raise invalid_param(f"Tool names must be unique; {duplicate!r} appears twice.",
                                "tools")
        if isinstance(tool_choice, dict):
            name = tool_choice["function"]["name"]
            if name not in names:
                raise invalid_param(
                    f"tool_choice names the function {name!r}, which is not among the "
                    f"tools ({', '.join(names) or 'none given'}).", "tool_choice")
            return cls("named", tools, parser, name, parallel)
        choice = tool_choice or ("auto" if tools else "none")
        if choice == "required" and not tools:
            raise invalid_param("tool_choice 'required' needs tools.", "tool_choice")
        if choice == "none" or not tools:
            return cls("none", tools, parser, None, parallel)
        return cls(choice, tools, parser, None, parallel)

    @property
    def enforced(self) -> bool:
        """The answer is forced into tool calls by a grammar."""
        return self.mode in ("required", "named")

    def function(self, name: str) -> dict[str, Any]:
        return next(t["function"] for t in self.tools if t["function"]["name"] == name)

    def grammar_schema(self) -> dict[str, Any] | None:
        """The JSON schema the answer must follow (required / named), else None."""
        if self.mode == "named":
            assert self.named is not None
            return _parameters(self.function(self.named))
        if self.mode == "required":
            variants = [{
                "type": "object",
                "properties": {"name": {"const": t["function"]["name"]},
                               "parameters": _parameters(t["function"])},
                "required": ["name", "parameters"],
            } for t in self.tools]
            items = variants[0] if len(variants) == 1 else {"anyOf": variants}
            schema: dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
            if not self.parallel:
                schema["maxItems"] = 1
            return schema
        return None

    def new_stream(self) -> ToolCallStream | None:
        """A parser for one choice's answer (None when tool calls are not parsed)."""
        if self.mode == "named":
            assert self.named is not None
            return NamedCall(self.named)
        if self.mode == "required":
            return JsonArrayCalls()
        if self.mode == "auto":
            return TOOL_CALL_PARSERS[self.parser]()
        return None

    @property
    def needs_special_tokens(self) -> bool:
        stream = TOOL_CALL_PARSERS.get(self.parser)
        return self.mode == "auto" and stream is not None and stream.needs_special_tokens

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools the chat template renders (none with tool_choice none)."""
        return self.tools if self.mode != "none" and self.tools else None


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    params = function.get("parameters")
    return params if params else {"type": "object", "properties": {}}


def choose_parser(configured: str, template_source: str) -> str:
    """``--tool-call-parser``, or the one the template's own tool format calls for."""
    if configured != "auto":
        return configured
    return parser_from_template(template_source)


def template_renders_tools(template_source: str) -> bool:
    """Whether a chat template uses its ``tools`` variable."""
    return "tools" in template_source


# ----- prompts for templates that do not know tools ---------------------------------------


def prepare_messages(messages: list[dict[str, Any]], plan: ToolPlan,
                     template_has_tools: bool) -> list[dict[str, Any]]:
    """Messages ready for the template: unchanged for tool-aware templates; otherwise
    tools described in a system message, past calls and results written as text."""
    if template_has_tools:
        return messages
    out: list[dict[str, Any]] = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            calls = "\n".join(_format_call(plan.parser, c) for c in message.pop("tool_calls"))
            text = message.get("content") or ""
            message["content"] = f"{text}\n{calls}" if text else calls
        if message.get("role") == "tool":
            message = {"role": "user",
                       "content": f"<tool_response>\n{message.get('content') or ''}\n"
                                  "</tool_response>"}
        out.append(message)
    tools = plan.template_tools()
    if tools:
        description = describe_tools(plan.parser, tools)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{description}"}
        else:
            out.insert(0, {"role": "system", "content": description})
    return out


def _format_call(parser: str, call: dict[str, Any]) -> str:
    function = call.get("function") or {}
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    name = function.get("name", "")
    if parser == "llama3_json":
        return json.dumps({"name": name, "parameters": arguments}, ensure_ascii=False)
    if parser == "mistral":
        return "[TOOL_CALLS]" + json.dumps([{"name": name, "arguments": arguments}],
                                           ensure_ascii=False)
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments},
                                        ensure_ascii=False) + "\n</tool_call>"


def describe_tools(parser: str, tools: list[dict[str, Any]]) -> str:
    """A system-prompt description of ``tools`` and of how to call them in ``parser``'s
    format (for chat templates that do not render tools themselves)."""
    listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    if parser == "llama3_json":
        how = ('To use a function, reply with only a JSON object giving its "name" and its '
               '"parameters", for example {"name": "function_name", "parameters": '
               '{"argument": "value"}}.')
    elif parser == "mistral":
        how = ('To use functions, reply with [TOOL_CALLS] followed by a JSON list of calls, '
               'each with a "name" and "arguments", for example [TOOL_CALLS][{"name": '
               '"function_name", "arguments": {"argument": "value"}}].')
    else:
        how = ('To use a function, write a JSON object with its "name" and its "arguments" '
               'between <tool_call> and </tool_call>, for example:\n<tool_call>\n'
               '{"name": "function_name", "arguments": {"argument": "value"}}\n</tool_call>\n'
               'You may call several functions. Their results come back between '
               '<tool_response> and </tool_response>.')
    return ("You can use these functions (JSON descriptions, one per line) when they help "
            f"answer:\n{listing}\n\n{how}")


# ----- one choice's output ------------------------------------------------------------------


@dataclass
class ChoiceDelta:
    """What a piece of one choice's output is, once parsed."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


class ChoiceParser:
    """Reasoning split first, then tool calls in the answer (either may be off)."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolCallStream | None) -> None:
        self.reasoning = reasoning
        self.tools = tools
        self.num_calls = 0

    def feed(self, text: str) -> ChoiceDelta:
        if self.reasoning is not None:
            reasoning, answer = self.reasoning.feed(text)
        else:
            reasoning, answer = "", text
        return self._answer(reasoning, answer, final=False)

    def finish(self) -> ChoiceDelta:
        reasoning, answer = self.reasoning.finish() if self.reasoning is not None else ("", "")
        return self._answer(reasoning, answer, final=True)

    def _answer(self, reasoning: str, answer: str, final: bool) -> ChoiceDelta:
        if self.tools is None:
            return ChoiceDelta(reasoning, answer)
        piece = self.tools.feed(answer) if answer else None
        delta = ChoiceDelta(reasoning, piece.content if piece else "",
                            list(piece.calls) if piece else [])
        if final:
            tail = self.tools.finish()
            delta.content += tail.content
            delta.tool_calls += tail.calls
        self.num_calls = self.tools.num_calls
        return delta


@dataclass
class ChatOutputSpec:
    """How to read a chat job's output: tool plan and reasoning format."""

    plan: ToolPlan | None = None
    reasoning: ReasoningFormat | None = None
    prompt: str | None = None  # the rendered prompt (tells whether it opened a block)

    @property
    def active(self) -> bool:
        return self.reasoning is not None or (self.plan is not None and self.plan.mode != "none")

    def new_choice(self) -> ChoiceParser:
        reasoning = (ReasoningParser(self.reasoning, self.prompt)
                     if self.reasoning is not None else None)
        tools = self.plan.new_stream() if self.plan is not None else None
        return ChoiceParser(reasoning, tools)


def finish_reason_with_tools(reason: str | None, num_calls: int) -> str | None:
    """``tool_calls`` when the model stopped after calling tools."""
    if reason == "stop" and num_calls:
        return "tool_calls"
    return reason


def check_tool_choice_value(value: Any) -> None:
    """400 for a tool_choice string outside none/auto/required."""
    if isinstance(value, str) and value not in TOOL_CHOICES:
        raise invalid_param(f"tool_choice must be one of {', '.join(TOOL_CHOICES)} or a named "
                            f"function, got {value!r}.", "tool_choice")
