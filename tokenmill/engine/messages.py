"""Typed messages between a front end and the engine core, and their wire format.

The front end (API server process, or the offline engine in-process) sends
:class:`EngineCoreRequest`, :class:`AbortRequest` and :class:`Shutdown`; the
core answers with :class:`EngineReady` (or :class:`EngineLoadFailed`) once,
then :class:`EngineCoreOutputs` after each step: per request, only the tokens
that are new (a delta), plus a statistics snapshot.

On the wire a message is msgpack: each dataclass below becomes an extension
record (its registry index and its field values in order), so nested messages
(a SamplingParams inside a request, TokenLogprobs inside a delta) round-trip
without hand-written converters.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from tokenmill.engine.validation import EngineLimits
from tokenmill.outputs import EngineStats, TokenLogprob
from tokenmill.sampling.params import SamplingParams, StructuredOutputsParams
from tokenmill.step_types import ScheduledSeq, SchedulerOutput

# ----------------------------------------------------------------- front end -> core


@dataclass
class EngineCoreRequest:
    """A tokenized, validated request to run."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    priority: int = 0


@dataclass
class AbortRequest:
    """Stop a request (``index`` None) or one of its samples (a stop string hit it)."""

    request_id: str
    index: int | None = None


@dataclass
class Shutdown:
    """Finish nothing more; the core process exits."""


# ----------------------------------------------------------------- core -> front end


@dataclass
class EngineInfo:
    """What a front end needs to know about the engine it talks to."""

    model_name: str
    limits: EngineLimits
    eos_token_ids: list[int]
    architecture: str
    pid: int = 0

    @property
    def max_model_len(self) -> int:
        return self.limits.max_model_len


@dataclass
class EngineReady:
    info: EngineInfo


@dataclass
class EngineLoadFailed:
    error: str


@dataclass
class SeqDelta:
    """What one sample gained in a step."""

    index: int
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | None = None  # the stop token id that ended it


@dataclass
class EngineCoreOutput:
    """One request's progress in a step (only what is new)."""

    request_id: str
    seqs: list[SeqDelta] = field(default_factory=list)
    finished: bool = False  # every sample finished in the core
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None  # new entries only
    scheduled_time: float | None = None  # set in the step that first scheduled it
    first_token_time: float | None = None  # set in the step of its first token
    num_preemptions: int = 0
    error: str | None = None  # the engine failed this request (a step raised)


@dataclass
class EngineCoreOutputs:
    """Everything a step produced, and the engine's state right after it.

    ``started`` lists requests scheduled for the first time (queue depth is
    counted from it); the core also sends one with no outputs right after
    scheduling, before the forward pass, so the front end's counts are live.
    """

    outputs: list[EngineCoreOutput]
    stats: EngineStats
    started: list[str] = field(default_factory=list)


# --------------------------------------------- rank 0 -> other tensor-parallel ranks


@dataclass
class ExecuteStep:
    """Run this step's forward pass (after applying its block copies)."""

    sched: SchedulerOutput


@dataclass
class ChannelSync:
    """Sent until every worker has seen one: the step channel is connected."""

    n: int = 0


@dataclass
class Heartbeat:
    """Rank 0 is alive (sent every second, from its own thread)."""


@dataclass
class StopWorker:
    """Exit: the engine is shutting down."""


# --------------------------------------------------------------------- wire format

_TYPES: tuple[type, ...] = (
    EngineCoreRequest, AbortRequest, Shutdown, EngineInfo, EngineReady, EngineLoadFailed,
    SeqDelta, EngineCoreOutput, EngineCoreOutputs, EngineLimits, EngineStats, TokenLogprob,
    SamplingParams, ScheduledSeq, SchedulerOutput, ExecuteStep, ChannelSync, Heartbeat,
    StopWorker, StructuredOutputsParams,
)
_CODES = {cls: code for code, cls in enumerate(_TYPES)}
_FIELDS = {cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in _TYPES}


def _msgpack() -> Any:
    """The msgpack module, imported on first use: in-process engines never need it."""
    import msgpack

    return msgpack


def _default(obj: Any) -> Any:
    code = _CODES.get(type(obj))
    if code is None:
        if isinstance(obj, tuple):
            return list(obj)
        raise TypeError(f"cannot encode {type(obj).__name__} in an engine message")
    values = [getattr(obj, name) for name in _FIELDS[type(obj)]]
    return _msgpack().ExtType(code, _msgpack().packb(values, default=_default, use_bin_type=True))


def _ext_hook(code: int, data: bytes) -> Any:
    if not 0 <= code < len(_TYPES):
        return _msgpack().ExtType(code, data)
    cls = _TYPES[code]
    values = _msgpack().unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    return cls(*values)  # every field is an __init__ parameter, in _FIELDS order


def encode(message: Any) -> bytes:
    """One message (or a list of them) as bytes."""
    return _msgpack().packb(message, default=_default, use_bin_type=True)


def decode(data: bytes) -> Any:
    """The inverse of :func:`encode`."""
    return _msgpack().unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
