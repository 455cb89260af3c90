"""Structured outputs, tools, reasoning and logit_bias at the HTTP layer, against the
scripted engine (tests/fake_engine.py): request validation (400 naming the parameter),
what reaches the engine, and the response shapes, streamed and not, through the
official openai client. The grammar itself is tested in test_structured_engine.py and
against the real model in test_server_structured_api.py."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest
from fake_engine import FakeEngine, running_app

from tokenmill.server.config import ServerConfig

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


def run(scenario: Any, reply: str = "Hello.", config: ServerConfig | None = None,
        stop: bool = True) -> Any:
    """Run ``scenario(client, http, engine)``: openai.AsyncOpenAI and httpx against a server."""

    async def main() -> Any:
        engine = FakeEngine(reply=reply, stop_after_reply=stop, max_model_len=8192,
                            num_kv_blocks=2048)
        async with running_app(config or ServerConfig(), engine) as (url, _):
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                return await scenario(client, http, engine)

    return asyncio.run(main())


def body(**fields: Any) -> dict[str, Any]:
    return {"messages": USER, "max_tokens": 200, **fields}


BAD_REQUESTS = [
    (CHAT, {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}}},
     "response_format.json_schema.schema", "not a valid JSON schema"),
    (CHAT, {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "items": {}, "uniqueItems": True}}}},
     "response_format.json_schema.schema", "uniqueItems"),
    (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", "needs"),
    (CHAT, {"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
    (CHAT, {"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex",
     "parenthesis"),
    (CHAT, {"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs",
     "exactly one"),
    (CHAT, {"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag",
     "Extra inputs"),
    (CHAT, {"structured_outputs": {"choice": []}}, "structured_outputs.choice", "empty"),
    (CHAT, {"structured_outputs": {"grammar": "root ::= missing"}},
     "structured_outputs.grammar", "not defined"),
    (COMPLETIONS, {"guided_regex": "[a-"}, "guided_regex", "Unclosed"),
    (COMPLETIONS, {"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    (CHAT, {"guided_whitespace_pattern": "\\s*", "guided_json": {}},
     "guided_whitespace_pattern", "not supported"),
    (CHAT, {"guided_json": {"type": "object"}, "response_format": {"type": "json_object"}},
     "guided_json", "Only one"),
    (CHAT, {"tools": [WEATHER], "tool_choice": {"type": "function",
                                                "function": {"name": "nope"}}},
     "tool_choice", "not among the tools"),
    (CHAT, {"tool_choice": "required"}, "tool_choice", "needs tools"),
    (CHAT, {"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "Input should"),
    (CHAT, {"tools": [WEATHER, WEATHER]}, "tools", "unique"),
    (CHAT, {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
     "tools[0].function.name", "pattern"),
    (CHAT, {"tools": [WEATHER, {"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"not": {}}}}}}],
        "tool_choice": "required"}, "tools[1].function.parameters", "'not'"),
    (CHAT, {"tools": [WEATHER], "tool_choice": "required",
            "response_format": {"type": "json_object"}}, "tool_choice", "Only one"),
    (CHAT, {"logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
    (CHAT, {"logit_bias": {"5": 150}}, "logit_bias", "[-100, 100]"),
    (COMPLETIONS, {"logit_bias": {"999999": 1}}, "logit_bias", "outside the vocabulary"),
    (CHAT, {"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs", "may not set"),
]


def test_invalid_requests_are_refused_naming_the_parameter():
    async def scenario(client, http, engine):
        for path, fields, param, words in BAD_REQUESTS:
            payload = body(**fields) if path == CHAT else {"prompt": "hi", "max_tokens": 5,
                                                           **fields}
            resp = await http.post(path, json=payload)
            assert resp.status_code == 400, (fields, resp.text)
            error = resp.json()["error"]
            assert error["param"] == param, (fields, error)
            assert words in error["message"], (fields, error)
        assert engine.received == []  # nothing reached the engine
        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(
                model="fake-model", messages=USER, response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "strin"}}})
        assert err.value.body["param"] == "response_format.json_schema.schema"

    run(scenario)


def test_constraints_reach_the_engine():
    async def scenario(client, http, engine):
        schema = {"type": "object", "properties": {"b": {"type": "integer"},
                                                   "a": {"type": "string"}}}
        cases = [
            ({"response_format": {"type": "json_object"}}, "json_object", None),
            ({"response_format": {"type": "json_schema",
                                  "json_schema": {"name": "s", "schema": schema}}},
             "json", schema),
            ({"structured_outputs": {"json": schema}}, "json", schema),
            ({"structured_outputs": {"regex": "[0-9]+"}}, "regex", "[0-9]+"),
            ({"structured_outputs": {"choice": ["x", "y"]}}, "choice", ("x", "y")),
            ({"structured_outputs": {"grammar": 'root ::= "a"'}}, "grammar", 'root ::= "a"'),
            ({"guided_json": schema}, "json", schema),
            ({"guided_regex": "a+"}, "regex", "a+"),
            ({"guided_choice": ["p", "q"]}, "choice", ("p", "q")),
            ({"guided_grammar": 'root ::= "b"'}, "grammar", 'root ::= "b"'),
            ({"response_format": {"type": "text"}}, None, None),
        ]
        for fields, kind, value in cases:
            for path in (CHAT, COMPLETIONS):
                payload = body(**fields) if path == CHAT else {"prompt": "hi",
                                                               "max_tokens": 5, **fields}
                resp = await http.post(path, json=payload)
                assert resp.status_code == 200, resp.text
                so = engine.received[-1][1].structured_outputs
                if kind is None:
                    assert so is None
                    continue
                assert so.kind == kind
                got = json.loads(so.json) if kind == "json" else getattr(so, kind, None)
                if kind != "json_object":
                    assert got == value
                if kind == "json":  # property order is generation order: kept
                    assert list(json.loads(so.json)["properties"]) == ["b", "a"]
        await http.post(CHAT, json=body(logit_bias={"65": -100, "66": 5.5}))
        assert engine.received[-1][1].logit_bias == {65: -100.0, 66: 5.5}

    run(scenario)


def test_auto_tool_calls_whole_and_streamed():
    reply = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": '
             '{"city": "Paris", "unit": "c"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", '
             '"arguments": {"tz": "CET"}}\n</tool_call>')

    async def scenario(client, http, engine):
        resp = await client.chat.completions.create(model="fake-model", messages=USER,
                                                    tools=[WEATHER, TIME], max_tokens=400)
        choice = resp.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == "Let me look.\n"
        calls = choice.message.tool_calls
        assert [c.function.name for c in calls] == ["get_weather", "get_time"]
        assert json.loads(calls[0].function.arguments) == {"city": "Paris", "unit": "c"}
        assert all(c.id.startswith("call_") and c.type == "function" for c in calls)
        # The template knows no tools: they are described in a system message.
        prompt = engine.tokenizer.decode(engine.received[-1][0], skip_special_tokens=False)
        assert "get_weather" in prompt and "<tool_call>" in prompt

        stream = await client.chat.completions.create(
            model="fake-model", messages=USER, tools=[WEATHER, TIME], max_tokens=400,
            stream=True)
        content, calls_by_index, finish, first_seen = "", {}, None, {}
        async for chunk in stream:
            delta = chunk.choices[0].delta
            content += delta.content or ""
            for tc in delta.tool_calls or []:
                if tc.index not in calls_by_index:
                    first_seen[tc.index] = (tc.id, tc.function.name)
                    calls_by_index[tc.index] = ""
                calls_by_index[tc.index] += tc.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        assert content == "Let me look.\n" and finish == "tool_calls"
        assert [first_seen[i][1] for i in sorted(first_seen)] == ["get_weather", "get_time"]
        assert all(first_seen[i][0].startswith("call_") for i in first_seen)
        assert [calls_by_index[i] for i in sorted(calls_by_index)] == \
            [c.function.arguments for c in calls]

        # tool_choice none: no parsing, no tools in the prompt.
        resp = await client.chat.completions.create(
            model="fake-model", messages=USER, tools=[WEATHER], tool_choice="none",
            max_tokens=400)
        assert resp.choices[0].message.tool_calls is None
        assert "<tool_call>" in resp.choices[0].message.content
        assert resp.choices[0].finish_reason == "stop"
        prompt = engine.tokenizer.decode(engine.received[-1][0], skip_special_tokens=False)
        assert "get_weather" not in prompt

    run(scenario, reply=reply)


def test_named_and_required_tool_choice():
    async def scenario(client, http, engine):
        resp = await client.chat.completions.create(
            model="fake-model", messages=USER, tools=[WEATHER, TIME], max_tokens=400,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        so = engine.received[-1][1].structured_outputs
        assert json.loads(so.json) == WEATHER["function"]["parameters"]
        call = resp.choices[0].message.tool_calls[0]
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Oslo"}
        assert resp.choices[0].finish_reason == "tool_calls"
        assert resp.choices[0].message.content is None

        stream = await client.chat.completions.create(
            model="fake-model", messages=USER, tools=[WEATHER], max_tokens=400, stream=True,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        chunks = [c async for c in stream]
        deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
        assert deltas[0].function.name == "get_weather" and deltas[0].id.startswith("call_")
        assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {
            "city": "Oslo"}

        await client.chat.completions.create(
            model="fake-model", messages=USER, tools=[WEATHER, TIME], max_tokens=5,
            tool_choice="required", parallel_tool_calls=False)
        schema = json.loads(engine.received[-1][1].structured_outputs.json)
        assert schema["maxItems"] == 1 and schema["minItems"] == 1
        assert [v["properties"]["name"]["const"] for v in schema["items"]["anyOf"]] == \
            ["get_weather", "get_time"]

    run(scenario, reply='{"city": "Oslo"}')


def test_required_tool_choice_reads_the_json_array():
    reply = '[{"name": "get_time", "parameters": {"tz": "UTC"}}, ' \
            '{"name": "get_weather", "parameters": {"city": "Rome"}}]'

    async def scenario(client, http, engine):
        for stream in (False, True):
            kwargs = dict(model="fake-model", messages=USER, tools=[WEATHER, TIME],
                          tool_choice="required", max_tokens=400)
            if not stream:
                resp = await client.chat.completions.create(**kwargs)
                calls = [(c.function.name, json.loads(c.function.arguments))
                         for c in resp.choices[0].message.tool_calls]
                finish = resp.choices[0].finish_reason
            else:
                args: dict[int, list[str]] = {}
                finish = None
                async for chunk in await client.chat.completions.create(stream=True, **kwargs):
                    for tc in chunk.choices[0].delta.tool_calls or []:
                        entry = args.setdefault(tc.index, [tc.function.name, ""])
                        entry[1] += tc.function.arguments or ""
                    finish = chunk.choices[0].finish_reason or finish
                calls = [(n, json.loads(a)) for n, a in (args[i] for i in sorted(args))]
            assert calls == [("get_time", {"tz": "UTC"}), ("get_weather", {"city": "Rome"})]
            assert finish == "tool_calls"

    run(scenario, reply=reply)


def test_tool_round_trip_messages_are_rendered():
    async def scenario(client, http, engine):
        messages = USER + [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        ]
        resp = await client.chat.completions.create(model="fake-model", messages=messages,
                                                    tools=[WEATHER], max_tokens=400)
        assert resp.choices[0].message.content == "It is 21 degrees."
        assert resp.choices[0].finish_reason == "stop"
        prompt = engine.tokenizer.decode(engine.received[-1][0], skip_special_tokens=False)
        assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
        assert '<tool_response>\n{"temp": 21}\n</tool_response>' in prompt
        resp = await http.post(CHAT, json=body(messages=USER + [{"role": "tool"}]))
        assert resp.status_code == 400 and resp.json()["error"]["param"] == \
            "messages[1].content"

    run(scenario, reply="It is 21 degrees.")


def test_reasoning_content_whole_and_streamed():
    config = ServerConfig(engine_args={"reasoning_parser": "qwen3"})
    reply = "<think>\nThe user wants a number.\n</think>\n\n42"

    async def scenario(client, http, engine):
        resp = await http.post(CHAT, json=body())
        message = resp.json()["choices"][0]["message"]
        assert message["reasoning_content"] == "\nThe user wants a number.\n"
        assert message["content"] == "42"
        stream = await client.chat.completions.create(model="fake-model", messages=USER,
                                                      max_tokens=400, stream=True)
        reasoning, content = "", ""
        async for chunk in stream:
            delta = chunk.choices[0].delta
            reasoning += getattr(delta, "reasoning_content", None) or ""
            content += delta.content or ""
        assert (reasoning, content) == ("\nThe user wants a number.\n", "42")

    run(scenario, reply=reply, config=config)


def test_reasoning_then_tool_call():
    config = ServerConfig(engine_args={"reasoning_parser": "qwen3"})
    reply = ('<think>I should call the tool.</think>\n<tool_call>{"name": "get_weather", '
             '"arguments": {"city": "Paris"}}</tool_call>')

    async def scenario(client, http, engine):
        resp = await http.post(CHAT, json=body(tools=[WEATHER]))
        choice = resp.json()["choices"][0]
        assert choice["message"]["reasoning_content"] == "I should call the tool."
        assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
        assert choice["finish_reason"] == "tool_calls"

    run(scenario, reply=reply, config=config)


def test_pydantic_parse_goes_through():
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        population: int

    async def scenario(client, http, engine):
        resp = await client.chat.completions.parse(model="fake-model", messages=USER,
                                                   response_format=City, max_tokens=400)
        assert resp.choices[0].message.parsed == City(name="Paris", population=2100000)
        so = engine.received[-1][1].structured_outputs
        schema = json.loads(so.json)
        assert schema["title"] == "City" and schema["additionalProperties"] is False

    run(scenario, reply='{"name": "Paris", "population": 2100000}')


def test_grammar_metrics_are_exported():
    async def scenario(client, http, engine):
        text = (await http.get("/metrics")).text
        for name in ("tokenmill_grammar_compiles_total", "tokenmill_grammar_cache_hits_total",
                     "tokenmill_grammar_compile_seconds_total"):
            assert name in text

    run(scenario)
