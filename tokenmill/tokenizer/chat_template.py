"""Chat templates: check OpenAI-style messages and render them with Jinja.

Chat templates ship with model files and are untrusted code, so they run in
Jinja's immutable sandbox. The environment mirrors what Hugging Face
`transformers` gives templates (trim_blocks/lstrip_blocks, loop controls, a
`tojson` that does not HTML-escape, `raise_exception`, `strftime_now`, and the
`{% generation %}` block some templates use) so that a template renders the
same text here as there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Used when a model ships no template. ChatML is what most small instruct models
# (SmolLM2, Qwen2) were tuned on, and is the common choice of other servers.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training
    masks in transformers; for serving it renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(
            lineno
        )

    def _render_body(self, caller: Any) -> str:
        return caller()


class _SafeNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, so a template cannot shadow
    dunder attributes through it."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Namespace's own signature
        self, args = args[0], args[1:]
        for name in dict(*args, **kwargs):
            _SafeNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, *args, **kwargs)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates may not set underscore attributes on a namespace ({name!r})"
            )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's built-in tojson HTML-escapes (<, >, &, '), which would change the
    # prompt text; templates expect plain json.dumps.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format_string: str) -> str:
    return datetime.now().strftime(format_string)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a template in the sandboxed environment; ValueError if it does not parse."""
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    environment.globals["namespace"] = _SafeNamespace
    try:
        return environment.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise ValueError(f"chat template does not parse: {error}") from error


def _content_text(content: Any, where: str) -> str:
    """A message's content as one string (OpenAI allows a list of text parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        texts = []
        for part_index, part in enumerate(content):
            part_where = f"{where}.content[{part_index}]"
            if not isinstance(part, Mapping):
                raise ValueError(f"{part_where} must be an object, got {type(part).__name__}")
            part_type = part.get("type")
            if part_type != "text":
                raise ValueError(
                    f"{part_where} has unsupported type {part_type!r}; only 'text' parts are "
                    "supported"
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise ValueError(f"{part_where}.text must be a string")
            texts.append(text)
        # Separate parts by a newline, as other OpenAI-compatible servers do.
        return "\n".join(texts)
    raise ValueError(
        f"{where}.content must be a string or a list of text parts, got {type(content).__name__}"
    )


def _tool_calls(tool_calls: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(tool_calls, Sequence) or isinstance(tool_calls, (str, bytes)):
        raise ValueError(f"{where}.tool_calls must be a list")
    calls = []
    for call_index, call in enumerate(tool_calls):
        if not isinstance(call, Mapping):
            raise ValueError(f"{where}.tool_calls[{call_index}] must be an object")
        call = dict(call)
        function = call.get("function")
        if isinstance(function, Mapping):
            function = dict(function)
            arguments = function.get("arguments")
            # OpenAI sends arguments as a JSON string; templates written for
            # transformers iterate over them as a mapping.
            if isinstance(arguments, str):
                try:
                    parsed = json.loads(arguments)
                except json.JSONDecodeError:
                    parsed = None
                if isinstance(parsed, dict):
                    function["arguments"] = parsed
            call["function"] = function
        calls.append(call)
    return calls


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Check chat messages and return copies that templates can render.

    Each message must be a mapping with a non-empty string `role` and a `content`
    that is a string or a list of `{"type": "text", "text": ...}` parts (joined
    with newlines). An assistant message that makes tool calls may leave content
    out or null (it becomes ""). Other keys (name, tool_calls, tool_call_id,
    reasoning_content...) are passed through. Raises ValueError naming the first
    problem, e.g. ``messages[1].content must be a string or a list of text parts``.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes, bytearray)):
        raise ValueError(
            f"messages must be a list of message objects, got {type(messages).__name__}"
        )
    if len(messages) == 0:
        raise ValueError("messages must contain at least one message")
    normalized = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise ValueError(
                f"{where} must be an object with 'role' and 'content', got {type(message).__name__}"
            )
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"{where}.role must be a non-empty string, got {role!r}")
        out = dict(message)
        content = message.get("content")
        if content is None:
            if role != "assistant" or not message.get("tool_calls"):
                raise ValueError(f"{where}.content is missing (role {role!r})")
            out["content"] = ""
        else:
            out["content"] = _content_text(content, where)
        if message.get("tool_calls") is not None:
            out["tool_calls"] = _tool_calls(message["tool_calls"], where)
        normalized.append(out)
    return normalized


class ChatTemplate:
    """A compiled chat template plus the special-token strings templates expect.

    `source` is one template, or a mapping of named templates as Hugging Face
    `tokenizer_config.json` allows (the "tool_use" one is used when tools are
    given, "default" otherwise). None selects `CHATML_TEMPLATE`.
    """

    def __init__(
        self,
        source: str | Mapping[str, str] | None,
        special_tokens: Mapping[str, str | None] | None = None,
    ) -> None:
        self.is_fallback = source is None
        if source is None:
            source = CHATML_TEMPLATE
        self._sources: dict[str, str] = (
            {"default": source} if isinstance(source, str) else dict(source)
        )
        if not self._sources:
            raise ValueError("empty set of chat templates")
        self._compiled = {name: compile_chat_template(text) for name, text in self._sources.items()}
        self._special_tokens = dict(special_tokens or {})

    def source(self, with_tools: bool = False) -> str:
        """The template text used for a request (with or without tools)."""
        return self._sources[self._pick(with_tools)]

    def _pick(self, with_tools: bool) -> str:
        if with_tools and "tool_use" in self._sources:
            return "tool_use"
        if "default" in self._sources:
            return "default"
        return next(iter(self._sources))

    def render(
        self,
        messages: Any,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render checked messages to prompt text. Template errors (including a
        template's own `raise_exception`, e.g. "roles must alternate") raise
        ValueError, since they mean the request cannot be served as written."""
        checked = normalize_messages(messages)
        if tools is not None and not (
            isinstance(tools, Sequence) and all(isinstance(tool, Mapping) for tool in tools)
        ):
            raise ValueError("tools must be a list of objects")
        template = self._compiled[self._pick(bool(tools))]
        variables: dict[str, Any] = dict(self._special_tokens)
        variables.update(kwargs)
        variables.update(
            messages=checked,
            tools=None if tools is None else [dict(tool) for tool in tools],
            add_generation_prompt=add_generation_prompt,
        )
        try:
            return template.render(**variables)
        except (jinja2.TemplateError, TypeError, KeyError, IndexError) as error:
            raise ValueError(f"chat template failed: {error}") from error
