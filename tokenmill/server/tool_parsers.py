"""Tool calls in model output: per-family formats, parsed incrementally.

Every parser is a stream: :meth:`ToolCallStream.feed` takes the next piece of
the output text and returns the content that is now certain plus tool-call
deltas in OpenAI's streaming shape (a call's index, id and name first, then
pieces of its arguments); :meth:`ToolCallStream.finish` releases what was held
back. A non-streamed answer feeds the whole text at once, so both paths give
the same content and the same arguments by construction.

Arguments are passed on as the model wrote them (the exact JSON text of the
arguments value), so the concatenated argument pieces are valid JSON whenever
the model's call was.

Formats (``--tool-call-parser``):

- ``hermes`` (Qwen2.5, Hermes, many others): ``<tool_call>{"name": ..,
  "arguments": {..}}</tool_call>``, any number, text around them is content;
- ``llama3_json`` (Llama 3.1+): the output is ``{"name": .., "parameters":
  {..}}`` (optionally after ``<|python_tag|>``), several separated by ``;``;
- ``mistral``: ``[TOOL_CALLS][{"name": .., "arguments": {..}}, ..]`` or the
  newer ``[TOOL_CALLS]name[ARGS]{..}``.

With ``tool_choice`` ``required`` or a named function the output is forced by a
grammar instead (see :mod:`tokenmill.server.tools`): :class:`JsonArrayCalls`
and :class:`NamedCall` read those.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field

_ALPHANUMERIC = string.ascii_letters + string.digits


def new_call_id() -> str:
    """An OpenAI-style tool call id (``call_`` + 24 random characters)."""
    return "call_" + "".join(secrets.choice(_ALPHANUMERIC) for _ in range(24))


@dataclass
class ToolCallDelta:
    """A piece of one tool call: its start (id and name) and/or more of its arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_dict(self) -> dict[str, object]:
        """The ``delta.tool_calls[]`` entry of a chat completion chunk."""
        function: dict[str, object] = {"arguments": self.arguments}
        out: dict[str, object] = {"index": self.index}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = "function"
        if self.name is not None:
            function = {"name": self.name, **function}
        out["function"] = function
        return out


@dataclass
class ToolCall:
    """A whole tool call (non-streamed answers)."""

    id: str
    name: str
    arguments: str

    def to_dict(self) -> dict[str, object]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedPiece:
    """What a piece of output text turned out to be."""

    content: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)

    def extend(self, other: ParsedPiece) -> None:
        self.content += other.content
        self.calls += other.calls


def merge_calls(deltas: list[ToolCallDelta]) -> list[ToolCall]:
    """Fold streamed deltas into whole calls, in index order."""
    calls: dict[int, ToolCall] = {}
    for delta in deltas:
        call = calls.get(delta.index)
        if call is None:
            call = calls[delta.index] = ToolCall(delta.id or new_call_id(), delta.name or "", "")
        if delta.name is not None:
            call.name = delta.name
        call.arguments += delta.arguments
    return [calls[i] for i in sorted(calls)]


# ------------------------------------------------------------- JSON scanner

_WS = " \t\r\n"


class _ObjectScanner:
    """Scans one JSON object incrementally, reporting its top-level members.

    :meth:`feed` consumes characters of ``text`` from ``pos`` and returns how
    far it got; events land in ``events``: ``("key", name)``,
    ``("chunk", key, text)`` (raw text of a member's value, in pieces) and
    ``("end", key, raw_value)``. ``done`` is set after the closing brace,
    ``error`` on text that is not a JSON object.
    """

    def __init__(self) -> None:
        self.state = "open"
        self.done = False
        self.error = False
        self.events: list[tuple[str, ...]] = []
        self._key_raw = ""
        self._key = ""
        self._value = ""
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._scalar = False

    def feed(self, text: str, pos: int) -> int:
        n = len(text)
        while pos < n and not (self.done or self.error):
            ch = text[pos]
            state = self.state
            if state == "open":
                if ch in _WS:
                    pos += 1
                elif ch == "{":
                    self.state = "key_or_end"
                    pos += 1
                else:
                    self.error = True
            elif state in ("key_or_end", "key"):
                if ch in _WS:
                    pos += 1
                elif ch == '"':
                    self.state, self._key_raw, self._escape = "in_key", "", False
                    pos += 1
                elif ch == "}" and state == "key_or_end":
                    self.done = True
                    pos += 1
                else:
                    self.error = True
            elif state == "in_key":
                pos += 1
                if self._escape:
                    self._key_raw += ch
                    self._escape = False
                elif ch == "\\":
                    self._key_raw += ch
                    self._escape = True
                elif ch == '"':
                    try:
                        self._key = json.loads('"' + self._key_raw + '"')
                    except ValueError:
                        self.error = True
                        break
                    self.events.append(("key", self._key))
                    self.state = "colon"
                else:
                    self._key_raw += ch
            elif state == "colon":
                if ch in _WS:
                    pos += 1
                elif ch == ":":
                    self.state = "value_start"
                    pos += 1
                else:
                    self.error = True
            elif state == "value_start":
                if ch in _WS:
                    pos += 1
                    continue
                self.state, self._value = "value", ""
                self._depth, self._in_string, self._escape = 0, False, False
                self._scalar = ch not in '{["'
            elif state == "value":
                pos = self._scan_value(text, pos)
            elif state == "after_value":
                if ch in _WS:
                    pos += 1
                elif ch == ",":
                    self.state = "key"
                    pos += 1
                elif ch == "}":
                    self.done = True
                    pos += 1
                else:
                    self.error = True
        return pos

    def _scan_value(self, text: str, pos: int) -> int:
        """Consume value characters; emit them as one chunk; end the value if it ends."""
        start = pos
        n = len(text)
        ended = False
        while pos < n:
            ch = text[pos]
            if self._scalar:
                if ch in _WS or ch in ",}":
                    ended = True
                    break
                pos += 1
                continue
            pos += 1
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif ch == "\\":
                    self._escape = True
                elif ch == '"':
                    self._in_string = False
                    if self._depth == 0:
                        ended = True
                        break
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    ended = True
                    break
        piece = text[start:pos]
        if piece:
            self._value += piece
            self.events.append(("chunk", self._key, piece))
        if ended:
            self.events.append(("end", self._key, self._value))
            self.state = "after_value"
        return pos

    def finish(self) -> None:
        """The text ended: a scalar value running to the end is complete."""
        if self.state == "value" and self._scalar and self._value:
            self.events.append(("end", self._key, self._value))
            self.state = "after_value"


class _CallReader:
    """Turns one call object's members into tool-call deltas.

    The name comes from ``name_key``; the arguments from the first of
    ``args_keys`` present (streamed as written; a JSON string holding JSON is
    unwrapped once complete). Arguments seen before the name are held until it
    arrives. A call without arguments gets ``{}``.
    """

    def __init__(self, index: int, args_keys: tuple[str, ...], name: str | None = None,
                 name_key: str = "name") -> None:
        self.index = index
        self.args_keys = args_keys
        self.name_key = name_key
        self.name = name
        self.started = False
        self._args_key: str | None = None
        self._pending_args = ""
        self._args_is_string = False
        self._string_done = False
        self._args_sent = False

    def handle(self, events: list[tuple[str, ...]]) -> list[ToolCallDelta]:
        out: list[ToolCallDelta] = []
        for event in events:
            kind, key = event[0], event[1]
            if kind == "end" and key == self.name_key and self.name is None:
                try:
                    name = json.loads(event[2])
                except ValueError:
                    name = None
                if isinstance(name, str) and name:
                    self.name = name
                    out += self.start()
            elif key in self.args_keys and (self._args_key in (None, key)):
                self._args_key = key
                if kind == "chunk":
                    if not self._pending_args and not self._args_sent:
                        self._args_is_string = event[2].lstrip().startswith('"')
                    if self._args_is_string:
                        self._pending_args += event[2]
                    elif self.started:
                        out.append(ToolCallDelta(self.index, arguments=event[2]))
                        self._args_sent = True
                    else:
                        self._pending_args += event[2]
                elif kind == "end" and self._args_is_string:
                    try:
                        value = json.loads(self._pending_args)
                    except ValueError:
                        value = self._pending_args
                    self._pending_args = value if isinstance(value, str) else json.dumps(value)
                    self._string_done = True
                    out += self._flush_args()
        return out

    def start(self) -> list[ToolCallDelta]:
        """Announce the call (its id and name), then any arguments held back."""
        self.started = True
        out = [ToolCallDelta(self.index, id=new_call_id(), name=self.name)]
        if not self._args_is_string or self._string_done:
            out += self._flush_args()
        return out

    def raw_arguments(self, text: str) -> list[ToolCallDelta]:
        """More argument text, passed on as it is (formats whose whole object is the
        arguments)."""
        self._args_sent = True
        return [ToolCallDelta(self.index, arguments=text)]

    def _flush_args(self) -> list[ToolCallDelta]:
        if not self.started or not self._pending_args:
            return []
        text, self._pending_args = self._pending_args, ""
        self._args_sent = True
        return [ToolCallDelta(self.index, arguments=text)]

    def close(self) -> list[ToolCallDelta]:
        """The call object ended: make sure it was announced and has arguments."""
        out: list[ToolCallDelta] = []
        if not self.started and self.name is not None:
            out += self.start()
        out += self._flush_args()
        if self.started and not self._args_sent:
            out.append(ToolCallDelta(self.index, arguments="{}"))
            self._args_sent = True
        return out


# ------------------------------------------------------------------ streams


class ToolCallStream:
    """Base class: feed output text, get content and tool-call deltas."""

    #: The format needs special tokens kept in the text (e.g. ``[TOOL_CALLS]``).
    needs_special_tokens = False

    def __init__(self) -> None:
        self.num_calls = 0

    def feed(self, text: str) -> ParsedPiece:
        raise NotImplementedError

    def finish(self) -> ParsedPiece:
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """A whole output: its content and its tool calls."""
        piece = self.feed(text)
        piece.extend(self.finish())
        return piece.content, merge_calls(piece.calls)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _split_at(buf: str, marker: str, final: bool) -> tuple[str, str, bool]:
    """Split ``buf`` at ``marker``: (text before it, text after it, found).

    When the marker is absent, a tail that could be its start is held back (unless
    ``final``) and returned as the remainder, so a marker split across feeds is found.
    """
    i = buf.find(marker)
    if i >= 0:
        return buf[:i], buf[i + len(marker):], True
    keep = 0 if final else _partial_suffix(buf, marker)
    return buf[: len(buf) - keep], buf[len(buf) - keep:], False


class _TaggedCalls(ToolCallStream):
    """Content with calls between an opening and an optional closing tag (Hermes)."""

    open_tag = "<tool_call>"
    close_tag = "</tool_call>"
    args_keys: tuple[str, ...] = ("arguments", "parameters")

    def __init__(self) -> None:
        super().__init__()
        self._buf = ""
        self._state = "text"
        self._scanner: _ObjectScanner | None = None
        self._reader: _CallReader | None = None
        self._raw = ""  # text of the current call so far (released if it is not a call)

    def feed(self, text: str) -> ParsedPiece:
        self._buf += text
        return self._advance(final=False)

    def finish(self) -> ParsedPiece:
        out = self._advance(final=True)
        if self._state == "call":
            out.extend(self._end_call(complete=False))
        elif self._state == "text":
            out.content += self._buf
        self._buf = ""
        return out

    def _advance(self, final: bool) -> ParsedPiece:
        out = ParsedPiece()
        while self._buf:
            if self._state == "text":
                before, self._buf, found = _split_at(self._buf, self.open_tag, final)
                out.content += before
                if not found:
                    break
                self._begin_call()
            elif self._state == "call":
                assert self._scanner is not None
                used = self._scanner.feed(self._buf, 0)
                self._raw += self._buf[:used]
                self._buf = self._buf[used:]
                out.extend(self._drain())
                if self._scanner.error:
                    out.extend(self._end_call(complete=False))
                elif self._scanner.done:
                    out.extend(self._end_call(complete=True))
                    self._state = "after"
                else:
                    break
            else:  # after a call: skip whitespace and the closing tag
                stripped = self._buf.lstrip()
                if not stripped:
                    self._buf = self._buf if not final else ""
                    break
                if stripped.startswith(self.close_tag):
                    self._buf = stripped[len(self.close_tag):]
                    self._state = "gap"
                elif self.close_tag.startswith(stripped) and not final:
                    break
                else:
                    self._buf = stripped
                    self._state = "gap"
            if self._state == "gap":
                stripped = self._buf.lstrip()
                if not stripped and not final:
                    break  # whitespace between calls: wait to see what follows
                self._buf = stripped
                self._state = "text"
        return out

    def _begin_call(self) -> None:
        self._state = "call"
        self._scanner = _ObjectScanner()
        self._reader = _CallReader(self.num_calls, self.args_keys)
        self._raw = ""

    def _drain(self) -> ParsedPiece:
        assert self._scanner is not None and self._reader is not None
        events, self._scanner.events = self._scanner.events, []
        return ParsedPiece(calls=self._reader.handle(events))

    def _end_call(self, complete: bool) -> ParsedPiece:
        assert self._scanner is not None and self._reader is not None
        out = ParsedPiece()
        if not complete:
            self._scanner.finish()
            out.extend(self._drain())
        if self._reader.started or (complete and self._reader.name is not None):
            out.calls += self._reader.close()
            self.num_calls += 1
            self._state = "after" if complete else "text"
        else:
            # Not a call after all: the tag and what followed are content.
            out.content += self.open_tag + self._raw
            self._state = "text"
        self._scanner = self._reader = None
        return out


class HermesToolCalls(_TaggedCalls):
    """``<tool_call>{"name": .., "arguments": {..}}</tool_call>`` (Qwen2.5, Hermes)."""


class MistralToolCalls(ToolCallStream):
    """``[TOOL_CALLS][{"name": .., "arguments": {..}}, ..]`` or ``[TOOL_CALLS]name[ARGS]{..}``."""

    needs_special_tokens = True
    tag = "[TOOL_CALLS]"
    args_tag = "[ARGS]"

    def __init__(self) -> None:
        super().__init__()
        self._buf = ""
        self._state = "text"
        self._array: _ArrayReader | None = None
        self._name = ""
        self._scanner: _ObjectScanner | None = None
        self._reader: _CallReader | None = None

    def feed(self, text: str) -> ParsedPiece:
        self._buf += text
        return self._advance(final=False)

    def finish(self) -> ParsedPiece:
        out = self._advance(final=True)
        if self._state == "array" and self._array is not None:
            out.extend(self._array.finish())
            self.num_calls = self._array.num_calls
        elif self._state == "args" and self._reader is not None:
            out.calls += self._reader.close()
            self.num_calls += 1
        elif self._state == "name":
            out.content += self.tag + self._name + self._buf
        elif self._state == "text":
            out.content += self._buf
        self._buf = ""
        return out

    def _advance(self, final: bool) -> ParsedPiece:
        out = ParsedPiece()
        while self._buf:
            if self._state == "text":
                before, self._buf, found = _split_at(self._buf, self.tag, final)
                out.content += before
                if not found:
                    break
                self._buf = self._buf.lstrip()
                self._state = "which"
            elif self._state == "which":
                self._buf = self._buf.lstrip()
                if not self._buf:
                    break
                if self._buf.startswith("["):
                    self._state = "array"
                    self._array = _ArrayReader(("arguments", "parameters"), self.num_calls)
                else:
                    self._state, self._name = "name", ""
            elif self._state == "array":
                assert self._array is not None
                piece, used = self._array.feed(self._buf)
                out.extend(piece)
                self._buf = self._buf[used:]
                if self._array.done or self._array.error:
                    self.num_calls = self._array.num_calls
                    self._state = "text"
                    self._buf = self._buf.lstrip()
                else:
                    break
            elif self._state == "name":
                before, self._buf, found = _split_at(self._buf, self.args_tag, False)
                self._name += before
                if not found:
                    break
                self._state = "args"
                # The whole object is the arguments: stream it as it comes.
                self._scanner = _ObjectScanner()
                self._reader = _CallReader(self.num_calls, (), name=self._name.strip())
                out.calls += self._reader.start()
            elif self._state == "args":
                assert self._scanner is not None and self._reader is not None
                used = self._scanner.feed(self._buf, 0)
                if used:
                    out.calls += self._reader.raw_arguments(self._buf[:used])
                self._buf = self._buf[used:]
                if self._scanner.done or self._scanner.error:
                    out.calls += self._reader.close()
                    self.num_calls += 1
                    self._state = "text"
                    self._buf = self._buf.lstrip()
                else:
                    break
        return out


class _ArrayReader:
    """Calls in a JSON array of objects ``[{"name": .., <args key>: {..}}, ..]``."""

    def __init__(self, args_keys: tuple[str, ...], first_index: int = 0) -> None:
        self.args_keys = args_keys
        self.num_calls = first_index
        self.state = "open"
        self.done = False
        self.error = False
        self._scanner: _ObjectScanner | None = None
        self._reader: _CallReader | None = None

    def feed(self, text: str) -> tuple[ParsedPiece, int]:
        out = ParsedPiece()
        pos = 0
        while pos < len(text) and not (self.done or self.error):
            ch = text[pos]
            if self.state in ("open", "element", "after"):
                if ch in _WS:
                    pos += 1
                elif self.state == "open":
                    if ch != "[":
                        self.error = True
                        break
                    self.state = "first"
                    pos += 1
                elif self.state == "element" and ch == "{":
                    self._start_element()
                elif self.state == "after" and ch == ",":
                    self.state = "element"
                    pos += 1
                elif self.state == "after" and ch == "]":
                    self.done = True
                    pos += 1
                else:
                    self.error = True
            elif self.state == "first":
                if ch in _WS:
                    pos += 1
                elif ch == "]":
                    self.done = True
                    pos += 1
                elif ch == "{":
                    self._start_element()
                else:
                    self.error = True
            else:  # inside an element
                assert self._scanner is not None and self._reader is not None
                pos = self._scanner.feed(text, pos)
                events, self._scanner.events = self._scanner.events, []
                out.calls += self._reader.handle(events)
                if self._scanner.done or self._scanner.error:
                    out.calls += self._reader.close()
                    if self._reader.started:
                        self.num_calls += 1
                    self.state = "after"
                    if self._scanner.error:
                        self.error = True
        return out, pos

    def _start_element(self) -> None:
        self.state = "object"
        self._scanner = _ObjectScanner()
        self._reader = _CallReader(self.num_calls, self.args_keys)

    def finish(self) -> ParsedPiece:
        out = ParsedPiece()
        if self.state == "object" and self._reader is not None and self._scanner is not None:
            self._scanner.finish()
            events, self._scanner.events = self._scanner.events, []
            out.calls += self._reader.handle(events)
            out.calls += self._reader.close()
            if self._reader.started:
                self.num_calls += 1
        return out


class Llama3JsonToolCalls(ToolCallStream):
    """``{"name": .., "parameters": {..}}`` as the whole output (``;``-separated),
    optionally after ``<|python_tag|>``; anything else is content."""

    python_tag = "<|python_tag|>"

    def __init__(self) -> None:
        super().__init__()
        self._buf = ""
        self._state = "start"
        self._raw = ""
        self._scanner: _ObjectScanner | None = None
        self._reader: _CallReader | None = None
        self._content_mode = False

    def feed(self, text: str) -> ParsedPiece:
        if self._content_mode:
            return ParsedPiece(content=text)
        self._buf += text
        return self._advance(final=False)

    def finish(self) -> ParsedPiece:
        out = self._advance(final=True)
        if self._state == "call" and self._reader is not None:
            assert self._scanner is not None
            self._scanner.finish()
            events, self._scanner.events = self._scanner.events, []
            out.calls += self._reader.handle(events)
            if self._reader.started or self._reader.name is not None:
                out.calls += self._reader.close()
                self.num_calls += 1
            else:
                out.content += self._raw
        elif self._state in ("start", "next") or self._content_mode:
            out.content += self._buf
        elif self._state == "between" and self._buf.strip():
            out.content += self._buf.strip()
        self._buf = ""
        return out

    def _advance(self, final: bool) -> ParsedPiece:
        out = ParsedPiece()
        while self._buf and not self._content_mode:
            if self._state in ("start", "between", "next"):
                stripped = self._buf.lstrip()
                if stripped.startswith(self.python_tag):
                    stripped = stripped[len(self.python_tag):].lstrip()
                if not stripped or (self.python_tag.startswith(stripped) and not final):
                    break
                if self._state == "between":
                    if not stripped.startswith(";"):
                        self._to_content(out, stripped)
                        break
                    self._buf = stripped[1:]
                    self._state = "next"  # another call must follow
                    continue
                if self._state == "next":
                    stripped = stripped.lstrip()
                if not stripped.startswith("{"):
                    self._to_content(out, self._buf if self._state == "start" else stripped)
                    break
                self._buf = stripped
                self._state = "call"
                self._raw = ""
                self._scanner = _ObjectScanner()
                self._reader = _CallReader(self.num_calls, ("parameters", "arguments"))
            else:
                assert self._scanner is not None and self._reader is not None
                used = self._scanner.feed(self._buf, 0)
                self._raw += self._buf[:used]
                self._buf = self._buf[used:]
                events, self._scanner.events = self._scanner.events, []
                # Only "name", "type" or the arguments may come first; anything else
                # means this JSON is an answer, not a call.
                if not self._reader.started and any(
                        e[0] == "key" and e[1] not in ("name", "type", "function")
                        + self._reader.args_keys for e in events):
                    self._scanner.error = True
                out.calls += self._reader.handle(events)
                if self._scanner.error and not self._reader.started:
                    self._to_content(out, self._raw + self._buf)
                    break
                if self._scanner.done or self._scanner.error:
                    out.calls += self._reader.close()
                    self.num_calls += 1
                    self._state = "between"
                else:
                    break
        return out

    def _to_content(self, out: ParsedPiece, text: str) -> None:
        out.content += text
        self._buf = ""
        self._content_mode = True
        self._state = "content"


class JsonArrayCalls(ToolCallStream):
    """``tool_choice: required``: the grammar forces ``[{"name": .., "parameters": {..}}]``."""

    def __init__(self) -> None:
        super().__init__()
        self._array = _ArrayReader(("parameters",))
        self._rest = ""

    def feed(self, text: str) -> ParsedPiece:
        if self._array.done or self._array.error:
            self._rest += text
            return ParsedPiece()
        piece, used = self._array.feed(text)
        self._rest += text[used:]
        self.num_calls = self._array.num_calls
        return piece

    def finish(self) -> ParsedPiece:
        out = self._array.finish()
        self.num_calls = self._array.num_calls
        return out


class NamedCall(ToolCallStream):
    """A named ``tool_choice``: the grammar forces the output to be the arguments."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self._started = False
        self._sent = False

    def feed(self, text: str) -> ParsedPiece:
        out = ParsedPiece()
        if not self._started:
            self._started = True
            self.num_calls = 1
            out.calls.append(ToolCallDelta(0, id=new_call_id(), name=self.name))
        if text:
            out.calls.append(ToolCallDelta(0, arguments=text))
            self._sent = True
        return out

    def finish(self) -> ParsedPiece:
        out = self.feed("") if not self._started else ParsedPiece()
        if not self._sent:
            out.calls.append(ToolCallDelta(0, arguments="{}"))
        return out


TOOL_CALL_PARSERS: dict[str, type[ToolCallStream]] = {
    "hermes": HermesToolCalls,
    "llama3_json": Llama3JsonToolCalls,
    "mistral": MistralToolCalls,
}


def parser_from_template(template: str) -> str:
    """The parser a chat template's own tool format calls for (``hermes`` by default)."""
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    return "hermes"
