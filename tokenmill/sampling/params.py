"""Per-request sampling parameters and their validation.

Field names and defaults follow vLLM's ``SamplingParams`` so OpenAI-style
request bodies map onto them directly. Validation happens once, when the
object is built; an invalid value raises :class:`InvalidParameterError`, which
names the offending field so the HTTP server can answer 400 with ``param``.
"""

from __future__ import annotations

import dataclasses
import json as json_module
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

MAX_N = 128  # most samples one request may ask for
LOGIT_BIAS_RANGE = (-100.0, 100.0)  # OpenAI's range for logit_bias values
MAX_LOGIT_BIAS_ENTRIES = 1024  # OpenAI caps the map at 300 entries; we allow more
MAX_LOGPROBS = 20  # most alternatives per token (OpenAI's limit)
MAX_TEMPERATURE = 100.0  # OpenAI stops at 2; vLLM has no upper bound. We allow up to 100.
PENALTY_RANGE = (-2.0, 2.0)  # OpenAI's range for frequency/presence penalties
# Temperatures below this are treated as greedy: dividing by them would only
# amplify float noise (vLLM uses the same epsilon).
GREEDY_TEMPERATURE_EPS = 1e-5


class InvalidParameterError(ValueError):
    """A sampling parameter is out of range or of the wrong type.

    ``param`` is the field name (as in the request body), ``message`` the
    human-readable reason.
    """

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


@dataclass
class StructuredOutputsParams:
    """A constraint on what a request may generate, enforced with a grammar.

    Exactly one of the following is set:

    - ``json``: a JSON schema (a dict, or its JSON text); the output is one JSON
      value valid against it;
    - ``json_object``: any JSON object (OpenAI's ``{"type": "json_object"}``);
    - ``regex``: the whole output matches this regular expression;
    - ``choice``: the output is exactly one of these strings;
    - ``grammar``: an EBNF grammar (GBNF style, root rule ``root``).

    ``disable_any_whitespace`` makes JSON compact (one space after ``:`` and
    ``,``) instead of letting the model choose its whitespace (bounded per gap).
    The grammar is compiled by the engine (xgrammar) and applied as a token mask;
    see docs/structured-output.md. Normalised on construction: a ``json`` dict
    becomes its JSON text (key order kept: it is the order properties are
    generated in), ``choice`` a tuple.
    """

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: Iterable[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        if self.json is not None:
            if isinstance(self.json, dict):
                self.json = _json_text(self.json)
            elif isinstance(self.json, str):
                try:
                    parsed = json_module.loads(self.json)
                except ValueError as exc:
                    raise InvalidParameterError("json", f"is not valid JSON: {exc}") from None
                if not isinstance(parsed, (dict, bool)):
                    raise InvalidParameterError("json", "must be a JSON schema (an object)")
            else:
                raise InvalidParameterError(
                    "json", f"must be a JSON schema object, got {type(self.json).__name__}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidParameterError(name, "must be a non-empty string")
        if self.choice is not None:
            if isinstance(self.choice, (str, bytes)) or not isinstance(self.choice, Iterable):
                raise InvalidParameterError("choice", "must be a list of strings")
            self.choice = tuple(self.choice)
            if not self.choice:
                raise InvalidParameterError("choice", "must not be empty")
            for item in self.choice:
                if not isinstance(item, str) or not item:
                    raise InvalidParameterError(
                        "choice", f"must contain only non-empty strings, got {item!r}")
        for name in ("json_object", "disable_any_whitespace"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidParameterError(name, "must be a boolean")
        given = [name for name in ("json", "regex", "choice", "grammar")
                 if getattr(self, name) is not None]
        if self.json_object:
            given.append("json_object")
        if len(given) != 1:
            raise InvalidParameterError(
                "structured_outputs",
                "exactly one of json, json_object, regex, choice or grammar must be given"
                + (f" (got {', '.join(given)})" if given else ""))

    @property
    def kind(self) -> str:
        """Which constraint this is: json, json_object, regex, choice or grammar."""
        if self.json_object:
            return "json_object"
        for name in ("json", "regex", "choice", "grammar"):
            if getattr(self, name) is not None:
                return name
        raise AssertionError("validated in __post_init__")

    @property
    def key(self) -> tuple[Any, ...]:
        """Identifies the compiled grammar (the compile cache's key)."""
        value = {"json": self.json, "regex": self.regex, "grammar": self.grammar,
                 "choice": self.choice, "json_object": None}[self.kind]
        return (self.kind, value, self.disable_any_whitespace)


@dataclass
class SamplingParams:
    """How to pick tokens for one request and when to stop.

    Treat instances as immutable: use :meth:`clone` to derive a changed copy
    (it re-validates). Lists given for ``stop``/``stop_token_ids`` are
    normalised to tuples.

    - ``n``: number of independent samples (1..128).
    - ``max_tokens``: most tokens to generate; ``None`` means up to the model
      length (the engine fills in the concrete number).
    - ``min_tokens``: EOS and ``stop_token_ids`` are masked until this many
      tokens were generated.
    - ``temperature``: 0 means greedy; accepted range is [0, 100] (OpenAI
      documents [0, 2], vLLM accepts anything >= 0). Values below 1e-5 are
      treated as greedy.
    - ``top_p`` in (0, 1]; ``top_k`` 0 (or -1) disables it; ``min_p`` in [0, 1].
    - ``repetition_penalty`` > 0 (HF semantics, over prompt and output);
      ``frequency_penalty``/``presence_penalty`` in [-2, 2] (OpenAI semantics,
      over output tokens).
    - ``seed``: makes this request's sampling reproducible regardless of what
      else is in the batch.
    - ``stop``: strings that end generation; ``stop_token_ids``: token ids that
      end generation (besides EOS unless ``ignore_eos``).
    - ``logprobs``: number of top alternatives returned per generated token
      (0 returns only the sampled token's logprob); ``prompt_logprobs``
      likewise for prompt tokens. At most 20. They are computed after
      ``logit_bias`` and the grammar mask (a token the grammar forbids has
      logprob -inf), before penalties and temperature.
    - ``logit_bias``: token id -> value in [-100, 100] added to that token's
      logit before sampling (OpenAI semantics; -100 in effect bans a token).
    - ``structured_outputs``: a grammar the output must follow
      (:class:`StructuredOutputsParams`).
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: str | Iterable[str] | None = None
    stop_token_ids: Iterable[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        self.n = _int_in_range("n", self.n, 1, MAX_N)
        if self.max_tokens is not None:
            self.max_tokens = _int_in_range("max_tokens", self.max_tokens, 1, None)
        self.min_tokens = _int_in_range("min_tokens", self.min_tokens, 0, None)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidParameterError(
                "min_tokens",
                f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}",
            )

        self.temperature = _float_in_range("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        self.top_p = _float_in_range("top_p", self.top_p, 0.0, 1.0, low_open=True)
        self.top_k = _int_in_range("top_k", self.top_k, -1, None)
        if self.top_k == -1:
            self.top_k = 0
        self.min_p = _float_in_range("min_p", self.min_p, 0.0, 1.0)
        self.repetition_penalty = _float_in_range(
            "repetition_penalty", self.repetition_penalty, 0.0, None, low_open=True
        )
        self.frequency_penalty = _float_in_range(
            "frequency_penalty", self.frequency_penalty, *PENALTY_RANGE
        )
        self.presence_penalty = _float_in_range(
            "presence_penalty", self.presence_penalty, *PENALTY_RANGE
        )

        if self.seed is not None:
            self.seed = _int_in_range("seed", self.seed, None, None)
        self.stop = _normalise_stop(self.stop)
        self.stop_token_ids = _normalise_stop_token_ids(self.stop_token_ids)

        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidParameterError(
                    name, f"must be a boolean, got {getattr(self, name)!r}"
                )

        if self.logprobs is not None:
            self.logprobs = _int_in_range("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            self.prompt_logprobs = _int_in_range(
                "prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS
            )
        self.logit_bias = _normalise_logit_bias(self.logit_bias)
        if self.structured_outputs is not None and not isinstance(
                self.structured_outputs, StructuredOutputsParams):
            raise InvalidParameterError(
                "structured_outputs", "must be a StructuredOutputsParams")

    @property
    def is_greedy(self) -> bool:
        """True when sampling is deterministic argmax (temperature 0 or top_k 1)."""
        return self.temperature < GREEDY_TEMPERATURE_EPS or self.top_k == 1

    def clone(self, **changes: Any) -> SamplingParams:
        """A copy with ``changes`` applied, validated again."""
        return dataclasses.replace(self, **changes)


def _json_text(value: Any) -> str:
    try:
        return json_module.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError("json", f"is not JSON-serialisable: {exc}") from None


def _normalise_logit_bias(bias: Any) -> dict[int, float] | None:
    """``{token id: value}`` with integer ids (strings of digits accepted, as OpenAI sends
    them) and values in [-100, 100]; None or empty means no bias."""
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise InvalidParameterError("logit_bias", f"must be a map of token id to bias, got "
                                                  f"{type(bias).__name__}")
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise InvalidParameterError(
            "logit_bias", f"must have at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(bias)}")
    result: dict[int, float] = {}
    low, high = LOGIT_BIAS_RANGE
    for key, value in bias.items():
        token = key
        if isinstance(key, str):
            text = key.strip()
            if not text.lstrip("-").isdigit():
                raise InvalidParameterError(
                    "logit_bias", f"keys must be token ids (integers), got {key!r}")
            token = int(text)
        if not _is_int(token) or token < 0:
            raise InvalidParameterError(
                "logit_bias", f"keys must be non-negative token ids, got {key!r}")
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or math.isnan(value) \
                or not low <= value <= high:
            raise InvalidParameterError(
                "logit_bias", f"values must be numbers in [{low:g}, {high:g}], got {value!r} "
                              f"for token {key}")
        result[int(token)] = float(value)
    return result or None


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int_in_range(name: str, value: Any, low: int | None, high: int | None) -> int:
    if not _is_int(value):
        raise InvalidParameterError(name, f"must be an integer, got {value!r}")
    value = int(value)
    if low is not None and value < low:
        raise InvalidParameterError(name, _range_text(low, high, value))
    if high is not None and value > high:
        raise InvalidParameterError(name, _range_text(low, high, value))
    return value


def _range_text(low: int | None, high: int | None, value: int) -> str:
    if high is None:
        return f"must be >= {low}, got {value}"
    if low is None:
        return f"must be <= {high}, got {value}"
    return f"must be in [{low}, {high}], got {value}"


def _float_in_range(
    name: str,
    value: Any,
    low: float,
    high: float | None,
    *,
    low_open: bool = False,
) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise InvalidParameterError(name, f"must be a number, got {value!r}")
    value = float(value)
    upper = "inf)" if high is None else f"{high}]"
    interval = f"{'(' if low_open else '['}{low}, {upper}"
    too_low = value <= low if low_open else value < low
    too_high = high is not None and value > high
    if math.isnan(value) or math.isinf(value) or too_low or too_high:
        raise InvalidParameterError(name, f"must be in {interval}, got {value}")
    return value


def _normalise_stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, Iterable):
        raise InvalidParameterError("stop", f"must be a string or a list of strings, got {stop!r}")
    result = tuple(stop)
    for item in result:
        if not isinstance(item, str):
            raise InvalidParameterError("stop", f"must contain only strings, got {item!r}")
        if not item:
            raise InvalidParameterError("stop", "must not contain an empty string")
    return result


def _normalise_stop_token_ids(ids: Any) -> tuple[int, ...]:
    if ids is None:
        return ()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise InvalidParameterError(
            "stop_token_ids", f"must be a list of integers, got {ids!r}"
        )
    result = []
    for item in ids:
        if not _is_int(item) or item < 0:
            raise InvalidParameterError(
                "stop_token_ids", f"must contain only non-negative integers, got {item!r}"
            )
        result.append(int(item))
    return tuple(result)
