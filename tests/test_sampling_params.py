"""Validation and normalisation of SamplingParams."""

from __future__ import annotations

import math

import pytest

from tokenmill.sampling import InvalidParameterError, SamplingParams


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.max_tokens, p.min_tokens) == (1, 16, 0)
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.frequency_penalty, p.presence_penalty) == (1.0, 0.0, 0.0)
    assert p.seed is None and p.logprobs is None and p.prompt_logprobs is None
    assert p.stop == () and p.stop_token_ids == ()
    assert p.skip_special_tokens and not p.ignore_eos and not p.include_stop_str_in_output
    assert not p.is_greedy


def test_normalisation() -> None:
    p = SamplingParams(top_k=-1, stop="###", stop_token_ids=[7, 9], temperature=1)
    assert p.top_k == 0
    assert p.stop == ("###",)
    assert p.stop_token_ids == (7, 9)
    assert isinstance(p.temperature, float)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(max_tokens=None, min_tokens=1000).max_tokens is None


def test_is_greedy() -> None:
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=0.7, top_k=1).is_greedy
    assert not SamplingParams(temperature=0.7, top_k=2).is_greedy


def test_clone_applies_changes_and_revalidates() -> None:
    p = SamplingParams(stop=["x"], stop_token_ids=[3], max_tokens=None)
    q = p.clone(max_tokens=100)
    assert q.max_tokens == 100 and p.max_tokens is None
    assert q.stop == ("x",) and q.stop_token_ids == (3,)
    with pytest.raises(InvalidParameterError) as err:
        p.clone(top_p=0.0)
    assert err.value.param == "top_p"


BAD_VALUES = [
    ("n", 0),
    ("n", 129),
    ("n", 1.5),
    ("max_tokens", 0),
    ("max_tokens", -3),
    ("max_tokens", "16"),
    ("min_tokens", -1),
    ("temperature", -0.1),
    ("temperature", 100.5),
    ("temperature", math.nan),
    ("temperature", "hot"),
    ("top_p", 0.0),
    ("top_p", 1.01),
    ("top_k", -2),
    ("top_k", 2.5),
    ("min_p", -0.01),
    ("min_p", 1.5),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.inf),
    ("frequency_penalty", 2.5),
    ("frequency_penalty", -2.01),
    ("presence_penalty", 3),
    ("presence_penalty", -2.5),
    ("seed", "42"),
    ("seed", 1.0),
    ("seed", True),
    ("stop", [""]),
    ("stop", ["ok", 5]),
    ("stop", 5),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", "12"),
    ("stop_token_ids", [1.0]),
    ("ignore_eos", "yes"),
    ("skip_special_tokens", 1),
    ("include_stop_str_in_output", None),
    ("logprobs", 21),
    ("logprobs", -1),
    ("logprobs", True),
    ("prompt_logprobs", 21),
    ("prompt_logprobs", -1),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_bad_value_names_its_field(field: str, value: object) -> None:
    with pytest.raises(InvalidParameterError) as err:
        SamplingParams(**{field: value})
    assert err.value.param == field
    assert isinstance(err.value, ValueError)
    assert field in str(err.value)
    assert err.value.message


def test_min_tokens_above_max_tokens() -> None:
    with pytest.raises(InvalidParameterError) as err:
        SamplingParams(max_tokens=4, min_tokens=5)
    assert err.value.param == "min_tokens"
    SamplingParams(max_tokens=5, min_tokens=5)


def test_edges_are_accepted() -> None:
    SamplingParams(n=128, temperature=100, top_p=1.0, min_p=1.0, logprobs=20, prompt_logprobs=0)
    SamplingParams(frequency_penalty=-2, presence_penalty=2, repetition_penalty=0.01)
    SamplingParams(seed=-5, stop_token_ids=(0,), logprobs=0)
