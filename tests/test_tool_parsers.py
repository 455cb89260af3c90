"""Tool-call parsers and the reasoning parser: whole outputs, and streamed in random
pieces (the streamed result must equal the whole one, whatever the cut)."""

from __future__ import annotations

import json
import random

import pytest

from tokenmill.server.tool_parsers import (
    HermesToolCalls,
    JsonArrayCalls,
    Llama3JsonToolCalls,
    MistralToolCalls,
    NamedCall,
    ParsedPiece,
    ToolCallStream,
    merge_calls,
    parser_from_template,
)
from tokenmill.tokenizer.reasoning import REASONING_FORMATS, ReasoningParser


def streamed(parser: ToolCallStream, text: str, seed: int) -> tuple[str, list, list]:
    """Feed ``text`` in random pieces; (content, merged calls, raw deltas)."""
    rng = random.Random(seed)
    out = ParsedPiece()
    i = 0
    while i < len(text):
        j = min(len(text), i + rng.randint(1, 7))
        out.extend(parser.feed(text[i:j]))
        i = j
    out.extend(parser.finish())
    return out.content, merge_calls(out.calls), out.calls


def calls_of(calls) -> list[tuple[str, object]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


CASES = [
    # (parser, text, content, calls)
    (HermesToolCalls, 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
                      '{"city": "Paris", "unit": "c"}}\n</tool_call>',
     "Let me check.\n", [("get_weather", {"city": "Paris", "unit": "c"})]),
    (HermesToolCalls, '<tool_call>{"name": "a", "arguments": {"x": [1, {"y": "}"}]}}</tool_call>'
                      '\n<tool_call>{"arguments": {}, "name": "b"}</tool_call>',
     "", [("a", {"x": [1, {"y": "}"}]}), ("b", {})]),
    (HermesToolCalls, 'No tools needed: 1 < 2 and <tool_calls are fun.',
     "No tools needed: 1 < 2 and <tool_calls are fun.", []),
    (HermesToolCalls, '<tool_call> not json at all', "<tool_call> not json at all", []),
    (HermesToolCalls, '<tool_call>{"name": "f", "arguments": "{\\"q\\": 1}"}</tool_call>',
     "", [("f", {"q": 1})]),
    (HermesToolCalls, '<tool_call>{"name": "noargs"}</tool_call> done', "done",
     [("noargs", {})]),
    (Llama3JsonToolCalls, '{"name": "search", "parameters": {"query": "tokenmill"}}', "",
     [("search", {"query": "tokenmill"})]),
    (Llama3JsonToolCalls, '<|python_tag|>{"type": "function", "name": "a", "parameters": '
                          '{"n": 1}}; {"name": "b", "parameters": {}}',
     "", [("a", {"n": 1}), ("b", {})]),
    (Llama3JsonToolCalls, '{"answer": 42}', '{"answer": 42}', []),
    (Llama3JsonToolCalls, 'The answer is {"x": 1}', 'The answer is {"x": 1}', []),
    (MistralToolCalls, '[TOOL_CALLS] [{"name": "f", "arguments": {"a": "b"}}, '
                       '{"name": "g", "arguments": {"c": 3}}]',
     "", [("f", {"a": "b"}), ("g", {"c": 3})]),
    (MistralToolCalls, 'Sure.[TOOL_CALLS]lookup[ARGS]{"id": 7}', "Sure.", [("lookup", {"id": 7})]),
    (MistralToolCalls, 'Plain text [TOOL', 'Plain text [TOOL', []),
    (JsonArrayCalls, '[{"name": "f", "parameters": {"a": 1}}, {"name": "g", "parameters": {}}]',
     "", [("f", {"a": 1}), ("g", {})]),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_parsers_whole_and_streamed(case):
    cls, text, content, calls = CASES[case]
    whole_content, whole_calls = cls().parse(text)
    assert whole_content == content
    assert calls_of(whole_calls) == calls
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in whole_calls)
    for seed in range(25):
        got_content, got_calls, deltas = streamed(cls(), text, seed)
        assert got_content == content, (seed, got_content)
        # Same arguments text as the whole parse, not only the same JSON.
        assert [(c.name, c.arguments) for c in got_calls] == \
            [(c.name, c.arguments) for c in whole_calls]
        # OpenAI's stream shape: the first delta of a call has its id and name.
        first = {}
        for d in deltas:
            first.setdefault(d.index, d)
        assert all(d.id is not None and d.name is not None for d in first.values())


def test_arguments_stream_before_the_call_ends():
    parser = HermesToolCalls()
    piece = parser.feed('<tool_call>{"name": "f", "arguments": {"text": "hello')
    assert [d.name for d in piece.calls if d.name] == ["f"]
    assert "".join(d.arguments for d in piece.calls) == '{"text": "hello'
    piece = parser.feed(' world"}}</tool_call>')
    assert "".join(d.arguments for d in piece.calls) == ' world"}'


def test_named_call():
    parser = NamedCall("f")
    content, calls = parser.parse('{"a": 1}')
    assert content == "" and calls_of(calls) == [("f", {"a": 1})]
    content, calls = NamedCall("g").parse("")
    assert calls_of(calls) == [("g", {})]


def test_parser_from_template():
    assert parser_from_template("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert parser_from_template("<|python_tag|>") == "llama3_json"
    assert parser_from_template("<tool_call>") == "hermes"
    assert parser_from_template("plain chatml") == "hermes"


def test_tool_call_delta_shape():
    parser = HermesToolCalls()
    deltas = parser.feed('<tool_call>{"name": "f", "arguments": {}}</tool_call>').calls
    first = deltas[0].to_dict()
    assert first["index"] == 0 and first["type"] == "function"
    assert first["function"] == {"name": "f", "arguments": ""}
    assert deltas[1].to_dict() == {"index": 0, "function": {"arguments": "{}"}}


# ----- reasoning ------------------------------------------------------------------------------


REASONING_CASES = [
    # (format, prompt, output, reasoning, content)
    ("qwen3", "<|im_start|>assistant\n", "<think>\nStep 1.\n</think>\n\nThe answer.",
     "\nStep 1.\n", "The answer."),
    ("qwen3", "<|im_start|>assistant\n", "Direct answer.", None, "Direct answer."),
    ("qwen3", "<|im_start|>assistant\n<think>\n\n</think>\n\n", "No thinking.", None,
     "No thinking."),
    ("qwen3", "<|im_start|>assistant\n<think>\n", "hmm</think>ok", "hmm", "ok"),
    ("deepseek_r1", "<｜Assistant｜>", "I reason here</think>\n\nFinal.", "I reason here",
     "Final."),
    ("deepseek_r1", "<｜Assistant｜>", "<think>a < b</think>x", "a < b", "x"),
    ("deepseek_r1", "", "still thinking, cut off", "still thinking, cut off", ""),
]


@pytest.mark.parametrize("case", range(len(REASONING_CASES)))
def test_reasoning_parser(case):
    name, prompt, text, reasoning, content = REASONING_CASES[case]
    fmt = REASONING_FORMATS[name]
    assert ReasoningParser(fmt, prompt).split(text) == (reasoning, content)
    for seed in range(25):
        rng = random.Random(seed)
        parser = ReasoningParser(fmt, prompt)
        got_r, got_c, i = "", "", 0
        while i < len(text):
            j = min(len(text), i + rng.randint(1, 4))
            r, c = parser.feed(text[i:j])
            got_r, got_c, i = got_r + r, got_c + c, j
        r, c = parser.finish()
        assert (got_r + r, got_c + c) == (reasoning or "", content)
