"""From the core's token deltas to what users see: text, stop strings, logprobs.

The engine core emits token ids; this processor, on the front end's side
(in the API server process, or beside the core in the offline engine), owns
everything about the output text: one incremental detokenizer per sample,
stop-string detection with the hold-back of text that could start a stop
string, and the request's timestamps. When a stop string ends a sample, the
processor finishes it here and asks the caller to abort it in the core (which
may have computed a token or two more by then; they are dropped).

Work per step is proportional to the new tokens: nothing is copied whole.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenmill.engine.messages import AbortRequest, EngineCoreOutput, SeqDelta
from tokenmill.outputs import CompletionOutput, RequestMetrics, RequestOutput
from tokenmill.sampling import SamplingParams


@dataclass(eq=False)
class _SampleState:
    index: int
    detokenizer: Any  # IncrementalDetokenizer, or None for a model without a tokenizer
    held: str = ""  # text withheld because it could be the start of a stop string
    num_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass(eq=False)
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[_SampleState]
    metrics: RequestMetrics
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        samples = self.samples
        if len(samples) == 1:  # the common case, without a generator per call
            return samples[0].finish_reason is not None
        return all(s.finish_reason is not None for s in samples)


@dataclass
class ProcessedOutputs:
    """A step's results for the front end: deltas to deliver, samples to stop in the core."""

    request_outputs: list[RequestOutput] = field(default_factory=list)
    aborts: list[AbortRequest] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # request id -> engine error


class OutputProcessor:
    """Per-request output state of every request in flight."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._requests: dict[str, _RequestState] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._requests

    def __len__(self) -> int:
        return len(self._requests)

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
    ) -> None:
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        samples = [_SampleState(i, self._detokenizer(prompt_token_ids, params))
                   for i in range(params.n)]
        self._requests[request_id] = _RequestState(
            request_id, prompt, prompt_token_ids, params, samples,
            RequestMetrics(arrival_time=arrival_time))

    def _detokenizer(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> Any:
        if self.tokenizer is None:
            return None
        from tokenmill.tokenizer import IncrementalDetokenizer

        return IncrementalDetokenizer(self.tokenizer, prompt_token_ids,
                                      skip_special_tokens=params.skip_special_tokens)

    def abort_request(self, request_id: str) -> None:
        """Forget a request (the caller aborts it in the core)."""
        self._requests.pop(request_id, None)

    def process(self, core_outputs: Sequence[EngineCoreOutput]) -> ProcessedOutputs:
        """Turn one step's core outputs into request deltas."""
        result = ProcessedOutputs()
        now = time.time()
        for core_out in core_outputs:
            state = self._requests.get(core_out.request_id)
            if state is None:
                continue  # finished here already (stop string) or aborted
            if core_out.error is not None:
                self._requests.pop(core_out.request_id, None)
                result.errors[core_out.request_id] = core_out.error
                continue
            metrics = state.metrics
            if core_out.scheduled_time is not None:
                metrics.scheduled_time = core_out.scheduled_time
            if core_out.first_token_time is not None:
                metrics.first_token_time = core_out.first_token_time
            state.num_cached_tokens = core_out.num_cached_tokens
            pieces: list[CompletionOutput] = []
            for delta in core_out.seqs:
                sample = state.samples[delta.index]
                if sample.finish_reason is not None:
                    continue  # tokens computed after a stop string: dropped
                piece = self._advance(state, sample, delta)
                pieces.append(piece)
                if piece.token_ids:
                    metrics.last_token_time = now
                if piece.finish_reason == "stop" and isinstance(piece.stop_reason, str):
                    result.aborts.append(AbortRequest(state.request_id, sample.index))
            if core_out.finished:
                # Every sample ended in the core; one aborted there ends as "abort" here too.
                for sample in state.samples:
                    if sample.finish_reason is None:
                        sample.finish_reason = "abort"
            finished = state.finished
            if finished:
                metrics.finished_time = now
                metrics.num_preemptions = core_out.num_preemptions
                del self._requests[state.request_id]
            result.request_outputs.append(RequestOutput(
                request_id=state.request_id, prompt=state.prompt,
                prompt_token_ids=state.prompt_token_ids, outputs=pieces, finished=finished,
                num_cached_tokens=state.num_cached_tokens,
                prompt_logprobs=core_out.prompt_logprobs, metrics=metrics,
            ))
        return result

    def _advance(self, state: _RequestState, sample: _SampleState,
                 delta: SeqDelta) -> CompletionOutput:
        """Detokenize one sample's new tokens, apply stop strings, build its delta."""
        params = state.params
        tokens = delta.new_token_ids
        logprobs = delta.new_logprobs
        finish_reason, stop_reason = delta.finish_reason, delta.stop_reason
        # EOS and stop token ids end the text without appearing in it
        # (a stop token shows only with include_stop_str_in_output).
        text_tokens = len(tokens)
        if finish_reason == "stop" and (stop_reason is None
                                        or not params.include_stop_str_in_output):
            text_tokens -= 1
        text = sample.held
        kept = len(tokens)
        detok = sample.detokenizer
        for j, token in enumerate(tokens):
            sample.num_tokens += 1
            if j >= text_tokens or detok is None:
                continue
            new = detok.add_tokens([token])
            if params.stop and sample.num_tokens >= params.min_tokens and new:
                cut = _find_stop(text, new, params.stop, params.include_stop_str_in_output)
                if cut is not None:
                    end, stop = cut
                    text = (text + new)[:end]
                    kept = j + 1
                    finish_reason, stop_reason = "stop", stop
                    break
            text += new
        if finish_reason is not None and not isinstance(stop_reason, str) and detok is not None:
            text += detok.flush()  # a character cut off at the end
        sample.held = ""
        if finish_reason is None and params.stop:
            split = max(0, len(text) - (max(len(s) for s in params.stop) - 1))
            sample.held, text = text[split:], text[:split]
        sample.finish_reason, sample.stop_reason = finish_reason, stop_reason
        return CompletionOutput(
            index=sample.index, text=text, token_ids=list(tokens[:kept]),
            logprobs=list(logprobs[:kept]) if logprobs is not None else None,
            finish_reason=finish_reason, stop_reason=stop_reason,
        )


def _find_stop(
    before: str, new: str, stops: Sequence[str], include: bool
) -> tuple[int, str] | None:
    """The earliest stop string ending inside ``new`` (text ``before`` precedes it).

    Returns where the visible text ends (before the stop string, or after it
    with ``include``) and which stop string matched.
    """
    buf = before + new
    best: tuple[int, str] | None = None
    for stop in stops:
        i = buf.find(stop, max(0, len(before) - len(stop) + 1))
        if i != -1 and (best is None or i < best[0]):
            best = (i, stop)
    if best is None:
        return None
    i, stop = best
    return (i + len(stop) if include else i), stop

