"""Reasoning blocks (``<think>...</think>``): which models write them, and splitting them off.

A reasoning model writes its chain of thought between two markers before the
answer. ``--reasoning-parser NAME`` tells tokenmill the model does so:

- the front end splits each output into ``reasoning_content`` and ``content``
  (:class:`ReasoningParser`, incremental, so streamed deltas are split too);
- the engine core applies a request's grammar to the answer only
  (:class:`tokenmill.sampling.grammar.ReasoningMarkers`, built from the same
  :class:`ReasoningFormat`).

Formats differ in where the output starts: DeepSeek-R1 always thinks first
(its template may or may not write ``<think>`` itself); Qwen3 may skip
thinking (then there is no block at all, or the template closed an empty one).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReasoningFormat:
    """The markers of a family's reasoning block and where its output starts."""

    name: str
    start: str
    end: str
    # True: the output is reasoning until the end marker even without a start marker.
    starts_in_reasoning: bool


REASONING_FORMATS: dict[str, ReasoningFormat] = {
    "deepseek_r1": ReasoningFormat("deepseek_r1", "<think>", "</think>", True),
    "qwen3": ReasoningFormat("qwen3", "<think>", "</think>", False),
}


def get_reasoning_format(name: str) -> ReasoningFormat:
    """The format called ``name``; ValueError listing the known ones otherwise."""
    try:
        return REASONING_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown reasoning parser {name!r}; choose one of "
                         f"{', '.join(sorted(REASONING_FORMATS))}") from None


def prompt_opens_reasoning(fmt: ReasoningFormat, prompt: str) -> bool | None:
    """Whether the prompt leaves the model inside a reasoning block.

    True when the prompt's last marker is the start marker (the template
    opened the block), False when it is the end marker (the template closed
    it: thinking disabled), None when the prompt has neither.
    """
    start, end = prompt.rfind(fmt.start), prompt.rfind(fmt.end)
    if start == end == -1:
        return None
    return start > end


class ReasoningParser:
    """Splits one output's text into (reasoning, content), fed piece by piece.

    Whatever way the text is cut into pieces, the concatenated results are the
    same: text that could be the beginning of a marker is held back until it
    is decided. Markers are removed; newlines right after the end marker are
    dropped (templates put a blank line between the block and the answer).
    """

    _START, _REASONING, _CONTENT = "start", "reasoning", "content"

    def __init__(self, fmt: ReasoningFormat, prompt: str | None = None) -> None:
        self.fmt = fmt
        opened = prompt_opens_reasoning(fmt, prompt or "")
        if opened is True or (opened is None and fmt.starts_in_reasoning):
            self._state = self._REASONING
        elif opened is False:
            self._state = self._CONTENT
        else:
            self._state = self._START
        self._held = ""
        self._strip_newlines = False
        # Reasoning from the start: the model may still write the start marker itself.
        self._skip_start = self._state == self._REASONING
        self.saw_block = self._state == self._REASONING  # the output had a reasoning part

    @property
    def in_reasoning(self) -> bool:
        return self._state == self._REASONING

    def feed(self, text: str) -> tuple[str, str]:
        """The reasoning and content that ``text`` (the next piece) makes certain."""
        reasoning, content = [], []
        buf = self._held + text
        self._held = ""
        while buf:
            if self._state == self._START:
                stripped = buf.lstrip()
                if stripped.startswith(self.fmt.start):
                    buf = stripped[len(self.fmt.start):]
                    self._state = self._REASONING
                    self.saw_block = True
                elif self.fmt.start.startswith(stripped):
                    self._held = buf  # whitespace or a partial start marker: undecided
                    buf = ""
                else:
                    self._state = self._CONTENT
            elif self._state == self._REASONING:
                if self._skip_start:
                    stripped = buf.lstrip()
                    if self.fmt.start.startswith(stripped):
                        self._held = buf  # may still become the start marker
                        break
                    self._skip_start = False
                    if stripped.startswith(self.fmt.start):
                        buf = stripped[len(self.fmt.start):]
                        continue
                i = buf.find(self.fmt.end)
                if i >= 0:
                    reasoning.append(buf[:i])
                    buf = buf[i + len(self.fmt.end):]
                    self._state = self._CONTENT
                    self._strip_newlines = True
                else:
                    keep = _partial_suffix(buf, self.fmt.end)
                    reasoning.append(buf[:len(buf) - keep])
                    self._held = buf[len(buf) - keep:]
                    buf = ""
            else:
                if self._strip_newlines:
                    buf = buf.lstrip("\n")
                    if not buf:
                        break
                    self._strip_newlines = False
                content.append(buf)
                buf = ""
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """Release what was held back at the end of the output."""
        held, self._held = self._held, ""
        if self._state == self._REASONING:
            return held, ""
        if self._state == self._START:
            return "", held
        return "", held.lstrip("\n") if self._strip_newlines else held

    def split(self, text: str) -> tuple[str | None, str]:
        """A whole output as ``(reasoning or None, content)``."""
        reasoning, content = self.feed(text)
        more_reasoning, more_content = self.finish()
        reasoning += more_reasoning
        return (reasoning if self.saw_block else None), content + more_content


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
