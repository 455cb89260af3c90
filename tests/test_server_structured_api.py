"""Structured outputs, tool calling and logit_bias through a real server on the bundled
SmolLM2 model, with the official ``openai`` client, streamed and not.

SmolLM2-135M follows instructions poorly: the grammar is what makes its output valid,
so these tests check validity against the schema, never the answer's quality.
"""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
from pydantic import BaseModel
from server_utils import start_server

pytestmark = pytest.mark.slow

MODEL = "smollm2"
SERVER_ARGS = ["--max-model-len", "1024", "--kv-cache-memory", "256MiB",
               "--served-model-name", MODEL]
PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0, "maximum": 130},
                         "languages": {"type": "array", "items": {"type": "string",
                                                                  "maxLength": 12},
                                       "maxItems": 3}},
          "required": ["name", "age", "languages"], "additionalProperties": False}
ASK_PERSON = [{"role": "user", "content": "Describe a fictional programmer as JSON."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 30},
                                  "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
ASK_WEATHER = [{"role": "user", "content": "What's the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def server():
    proc = start_server(SERVER_ARGS)
    yield proc
    proc.cleanup()


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


def _stream_text(stream) -> tuple[str, str | None]:
    text, finish = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


def test_json_schema_streamed_and_not(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                  "strict": True}}
    for seed in range(3):
        resp = client.chat.completions.create(
            model=MODEL, messages=ASK_PERSON, response_format=fmt, max_tokens=120,
            temperature=0.8, seed=seed)
        choice = resp.choices[0]
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    text, finish = _stream_text(client.chat.completions.create(
        model=MODEL, messages=ASK_PERSON, response_format=fmt, max_tokens=120, stream=True,
        temperature=0))
    assert finish == "stop"
    jsonschema.validate(json.loads(text), PERSON)


def test_pydantic_parse(client):
    class Programmer(BaseModel):
        name: str
        age: int
        favourite_language: str

    resp = client.chat.completions.parse(model=MODEL, messages=ASK_PERSON,
                                         response_format=Programmer, max_tokens=120,
                                         temperature=0)
    assert resp.choices[0].finish_reason == "stop"
    assert isinstance(resp.choices[0].message.parsed, Programmer)


def test_json_object(client):
    resp = client.chat.completions.create(model=MODEL, messages=ASK_PERSON, max_tokens=120,
                                          response_format={"type": "json_object"},
                                          temperature=0)
    if resp.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(resp.choices[0].message.content), dict)


def test_structured_outputs_extra_body_on_both_endpoints(client):
    pattern = r"\d{3}-\d{3}-\d{4}"
    for extra in ({"structured_outputs": {"regex": pattern}}, {"guided_regex": pattern}):
        resp = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Give me a phone number."}],
            max_tokens=20, extra_body=extra)
        assert re.fullmatch(pattern, resp.choices[0].message.content)
        resp = client.completions.create(model=MODEL, prompt="Call us at", max_tokens=20,
                                         extra_body=extra)
        assert re.fullmatch(pattern, resp.choices[0].text)
    choices = ["positive", "negative", "neutral"]
    resp = client.completions.create(
        model=MODEL, prompt="Review: great film! Sentiment:", max_tokens=10,
        extra_body={"structured_outputs": {"choice": choices}}, stream=True)
    text = "".join(c.choices[0].text for c in resp if c.choices)
    assert text in choices
    ebnf = 'root ::= "The answer is " [0-9]+ "."'
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is 6 times 7?"}],
        max_tokens=20, extra_body={"guided_grammar": ebnf})
    assert re.fullmatch(r"The answer is \d+\.", resp.choices[0].message.content)
    resp = client.completions.create(
        model=MODEL, prompt="A person:", max_tokens=120,
        extra_body={"structured_outputs": {"json": PERSON}}, temperature=0)
    jsonschema.validate(json.loads(resp.choices[0].text), PERSON)


def test_tool_choice_required_and_named(client):
    # SmolLM2 would repeat the call until max_tokens if parallel calls were allowed.
    resp = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER],
                                          tool_choice="required", max_tokens=120,
                                          temperature=0, parallel_tool_calls=False)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments),
                            WEATHER["function"]["parameters"])

    named = {"type": "function", "function": {"name": "get_weather"}}
    stream = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER],
                                            tool_choice=named, max_tokens=120, stream=True,
                                            temperature=0)
    name, arguments, finish = None, "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        for tc in chunk.choices[0].delta.tool_calls or []:
            assert tc.index == 0
            if tc.function.name:
                assert name is None and tc.id.startswith("call_")
                name = tc.function.name
            arguments += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert name == "get_weather" and finish == "tool_calls"
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])


def test_tool_round_trip(client):
    first = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER],
                                           tool_choice="required", max_tokens=120,
                                           temperature=0, parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    messages = ASK_WEATHER + [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id,
         "content": json.dumps({"temperature": 21, "unit": "celsius"})},
    ]
    final = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER],
                                           tool_choice="none", max_tokens=40, temperature=0)
    assert final.choices[0].message.tool_calls is None
    assert final.choices[0].message.content
    # auto lets the model answer in text or call again; both are well-formed.
    auto = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER],
                                          max_tokens=60, temperature=0)
    message = auto.choices[0].message
    assert message.content is not None or message.tool_calls


def test_logit_bias(client, server):
    plain = client.completions.create(model=MODEL, prompt="The capital of France is",
                                      max_tokens=3, temperature=0)
    assert plain.choices[0].text
    banned = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0,
        logprobs=1, logit_bias={str(t): -100 for t in _token_ids(server, plain.choices[0].text)})
    assert banned.choices[0].text != plain.choices[0].text
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="x", max_tokens=1,
                                  logit_bias={"49152": 1})
    assert err.value.body["param"] == "logit_bias"


def _token_ids(server, text: str) -> list[int]:
    import httpx

    return httpx.post(server.url + "/tokenize", json={"prompt": text,
                                                      "add_special_tokens": False}).json()["tokens"]


def test_errors_and_metrics(client, server):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL, messages=ASK_PERSON, max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {
                "name": "x", "schema": {"type": "object", "if": {"type": "object"}}}})
    assert err.value.body["param"] == "response_format.json_schema.schema"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER],
                                       tool_choice={"type": "function",
                                                    "function": {"name": "get_time"}})
    assert err.value.body["param"] == "tool_choice"
    metrics = server.wait_idle()
    assert metrics["tokenmill_grammar_compiles_total"] >= 1
    assert metrics["tokenmill_grammar_cache_hits_total"] >= 1
    assert metrics["tokenmill_grammar_compile_seconds_total"] > 0
