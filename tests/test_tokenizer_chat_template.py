"""Chat messages validation and Jinja template rendering (no model needed)."""

from __future__ import annotations

import datetime

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from tokenmill.tokenizer import CHATML_TEMPLATE, ChatTemplate, Tokenizer, normalize_messages

SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": None, "unk_token": None}


def render(template: str, messages=None, **kwargs) -> str:
    messages = messages if messages is not None else [{"role": "user", "content": "hi"}]
    return ChatTemplate(template, SPECIALS).render(messages, **kwargs)


# ------------------------------------------------------------------ messages


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ("hello", "messages must be a list"),
        ({"role": "user", "content": "hi"}, "messages must be a list"),
        ([], "at least one message"),
        ([{"role": "user", "content": "a"}, "b"], r"messages\[1\] must be an object"),
        ([{"content": "hi"}], r"messages\[0\]\.role must be a non-empty string"),
        ([{"role": 3, "content": "hi"}], r"messages\[0\]\.role"),
        ([{"role": "", "content": "hi"}], r"messages\[0\]\.role"),
        ([{"role": "user"}], r"messages\[0\]\.content is missing"),
        ([{"role": "user", "content": None}], r"messages\[0\]\.content is missing"),
        ([{"role": "user", "content": 42}], r"messages\[0\]\.content must be a string"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            r"messages\[0\]\.content\[0\] has unsupported type 'image_url'",
        ),
        ([{"role": "user", "content": [{"type": "text", "text": 1}]}], r"content\[0\]\.text"),
        ([{"role": "user", "content": ["plain"]}], r"content\[0\] must be an object"),
        ([{"role": "assistant", "content": None, "tool_calls": "x"}], "tool_calls must be a list"),
    ],
)
def test_malformed_messages_raise_value_error(messages, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        normalize_messages(messages)
    with pytest.raises(ValueError, match=problem):
        render(CHATML_TEMPLATE, messages)


def test_text_parts_are_joined() -> None:
    content = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    (message,) = normalize_messages([{"role": "user", "content": content}])
    assert message["content"] == "first\nsecond"


def test_tool_call_message_and_arguments() -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'},
    }
    messages = [
        {"role": "user", "content": "1+2?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
    ]
    checked = normalize_messages(messages)
    assert checked[1]["content"] == ""
    assert checked[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1, "b": 2}
    assert checked[2]["tool_call_id"] == "call_1"
    assert call["function"]["arguments"] == '{"a": 1, "b": 2}'  # caller's data untouched


# ------------------------------------------------------------------ templates


def test_chatml_fallback() -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    expected = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
    tokenizer = Tokenizer(HFTokenizer(BPE()))
    assert not tokenizer.has_chat_template
    assert tokenizer.chat_template == CHATML_TEMPLATE
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=False) == expected
    assert tokenizer.apply_chat_template(messages) == expected + "<|im_start|>assistant\n"


def test_special_token_variables_and_kwargs() -> None:
    template = (
        "{{ bos_token }}{{ messages[0]['content'] }}{% if think %}!{% endif %}{{ eos_token }}"
    )
    assert render(template) == "<s>hi</s>"
    assert render(template, think=True) == "<s>hi!</s>"


def test_trim_blocks_and_lstrip_blocks_like_transformers() -> None:
    template = (
        "{% for m in messages %}\n    {% if true %}\n[{{ m.content }}]\n    {% endif %}\n"
        "{% endfor %}"
    )
    assert render(template) == "[hi]\n"


def test_tojson_does_not_escape_html_or_unicode() -> None:
    tools = [{"type": "function", "function": {"name": "f<x>", "description": "日本 & 'q'"}}]
    out = render("{{ tools | tojson }}", tools=tools)
    assert out == (
        '[{"type": "function", "function": {"name": "f<x>", "description": "日本 & \'q\'"}}]'
    )
    assert render("{{ {'b': 1, 'a': 2} | tojson(indent=2, sort_keys=true) }}") == (
        '{\n  "a": 2,\n  "b": 1\n}'
    )


def test_raise_exception_becomes_value_error() -> None:
    template = (
        "{% if messages[0]['role'] != 'system' %}"
        "{{ raise_exception('need a system turn') }}{% endif %}"
    )
    with pytest.raises(ValueError, match="need a system turn"):
        render(template)


def test_strftime_now_namespace_loopcontrols_and_generation_block() -> None:
    assert render("{{ strftime_now('%Y') }}") == str(datetime.datetime.now().year)
    counted = render(
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
        "{% endfor %}{{ ns.n }}",
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    )
    assert counted == "2"
    loop = "{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}"
    assert render(loop) == "01"
    assert render("{% generation %}kept{% endgeneration %}") == "kept"


def test_sandbox_blocks_escapes() -> None:
    with pytest.raises(ValueError):
        render("{{ messages.__class__.__mro__ }}")
    with pytest.raises(ValueError):
        render("{{ ''.__class__.__subclasses__() }}")
    with pytest.raises(ValueError, match="underscore"):
        render("{% set ns = namespace() %}{% set ns.__init__ = 1 %}")
    with pytest.raises(ValueError):  # the immutable sandbox forbids mutating inputs
        render("{% set _ = messages.append({'role': 'x'}) %}")


def test_template_type_errors_become_value_errors() -> None:
    with pytest.raises(ValueError, match="chat template failed"):
        render("{{ messages[0]['content'] + 1 }}")


def test_syntax_error_is_reported_at_load() -> None:
    with pytest.raises(ValueError, match="does not parse"):
        ChatTemplate("{% for m in messages %}")


def test_named_templates_pick_tool_use_when_tools_given() -> None:
    template = ChatTemplate({"default": "plain", "tool_use": "tools:{{ tools | length }}"})
    messages = [{"role": "user", "content": "hi"}]
    assert template.render(messages) == "plain"
    assert template.render(messages, tools=[{"type": "function"}]) == "tools:1"
    assert template.source(with_tools=True) == "tools:{{ tools | length }}"
    with pytest.raises(ValueError, match="tools must be a list"):
        template.render(messages, tools="nope")  # type: ignore[arg-type]
