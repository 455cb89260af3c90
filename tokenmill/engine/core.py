"""The engine core: one step is schedule -> execute -> sample -> ``Scheduler.update``.

The core knows token ids only: requests arrive tokenized and validated
(:class:`~tokenmill.engine.messages.EngineCoreRequest`), and each step returns
per-request deltas (:class:`~tokenmill.engine.messages.EngineCoreOutput`: new
token ids and logprobs, finish reasons). Text, stop strings and stream
cursors belong to the output processor on the front end's side, so the same
core serves the offline API in-process and the HTTP server from its own
process.

State has one owner each: the scheduler owns queues, progress and (through
the block manager) KV blocks; the executor owns the model runners and caches;
the core owns the request registry (which samples belong to which request)
and the step's sampling; the structured-output manager owns compiled grammars
(each sequence's matcher rides on the sequence and is advanced by the
scheduler as tokens are appended). A request with a grammar waits outside the
scheduler until its grammar is compiled (in the background).

With async scheduling one step stays in flight: ``execute`` launches the
planned step (its forward pass and sampling, queued on the device) and only
then waits for the previous step's tokens and updates the scheduler with them,
so on a GPU the host's planning, bookkeeping and output building overlap the
device's work. Steps run this way while every live request is plain
(``n == 1``; no logprobs, penalties, ``min_tokens``, grammar or speculative
decoding); otherwise the core finishes the step in flight and runs steps one
at a time.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from tokenmill.engine.errors import RequestRejected
from tokenmill.engine.executor import Executor
from tokenmill.engine.kv_offload import KVOffloadManager
from tokenmill.engine.messages import EngineCoreOutput, EngineCoreRequest, SeqDelta
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.sequence import Sequence
from tokenmill.engine.speculation import Speculator
from tokenmill.engine.structured import StructuredOutputManager
from tokenmill.engine.validation import EngineLimits, validate_request
from tokenmill.outputs import EngineStats, TokenLogprob
from tokenmill.sampling import Sampler, SamplingBatch, SamplingParams
from tokenmill.sampling.sampler import argmax_rows, compute_prompt_logprobs, device_tensor
from tokenmill.step_types import (
    PLACEHOLDER_TOKEN,
    ModelOutput,
    SampledTokens,
    ScheduledSeq,
    SchedulerOutput,
    TokenFill,
)

logger = logging.getLogger(__name__)

_NO_HISTORY: list[int] = []  # shared empty token history for rows that need none


@dataclass(eq=False)
class _CoreRequest:
    """A request's samples and request-level progress, as the core tracks them."""

    request_id: str
    params: SamplingParams
    seqs: list[Sequence]
    arrival_time: float
    # Prompt logprob entries sent so far (entry 0, for the first token, is None);
    # None when the request did not ask for prompt logprobs.
    prompt_logprobs_sent: int | None = None
    forked: bool = False
    scheduled_time: float | None = None  # when a step first scheduled it
    scheduled_time_sent: bool = False
    first_token_sent: bool = False

    @property
    def finished(self) -> bool:
        seqs = self.seqs
        if len(seqs) == 1:  # the common case, without a generator per call
            return seqs[0].is_finished and (self.forked or self.params.n == 1)
        return all(s.is_finished for s in seqs) and (self.forked or self.params.n == 1)


@dataclass(eq=False)
class _StepInFlight:
    """A launched step whose sampled tokens have not reached the host yet."""

    sched: SchedulerOutput
    sampled_ids: list[str]  # sequence of each sampled row, in row order
    tokens: torch.Tensor  # [rows] int64 on the device: the next step's placeholders
    host_tokens: torch.Tensor  # the same, copied (or being copied) to the host
    copied: Any = None  # a CUDA event recorded after the copy; None on CPU

    def token_ids(self) -> list[int]:
        """The sampled tokens on the host (waits for the copy)."""
        if self.copied is not None:
            self.copied.synchronize()
        return self.host_tokens.tolist()


class EngineCore:
    """Continuous batching over a paged KV cache, on token ids."""

    def __init__(
        self,
        scheduler: Scheduler,
        executor: Executor,
        sampler: Sampler,
        limits: EngineLimits,
        speculator: Speculator | None = None,
        structured: StructuredOutputManager | None = None,
        kv_offload: KVOffloadManager | None = None,
        async_scheduling: bool = False,
    ) -> None:
        self.scheduler = scheduler
        self.kv_offload = kv_offload  # the prefix cache's offload tiers, if any
        self.executor = executor
        self.sampler = sampler
        self.limits = limits
        self.speculator = speculator
        self.structured = structured
        self.device = executor.device
        self._requests: dict[str, _CoreRequest] = {}
        self._seqs: dict[str, Sequence] = {}
        # Requests whose grammar is compiling: (first sequence, compiled-grammar future).
        self._awaiting_grammar: dict[str, tuple[Sequence, Future[Any]]] = {}
        self._failed: list[EngineCoreOutput] = []  # grammar failures, sent with the next step
        self._arrivals = itertools.count()
        self._started: list[str] = []
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._steps = 0
        # Live requests whose sampling reads token history (penalties, min_tokens): when
        # there are none, a step builds no per-row history at all.
        self._num_history_readers = 0
        self._num_unstarted = 0  # live requests no step has scheduled yet
        # Live requests that use any sampling option beyond a plain argmax: when there
        # are none, a step's rows are sampled with one argmax and no per-row batch.
        self._num_not_plain = 0
        # Async scheduling (one step in flight), where the executor and options allow.
        self.async_scheduling = (async_scheduling and speculator is None
                                 and executor.supports_async_scheduling)
        self._num_not_async = 0  # live requests that need steps run one at a time
        self._in_flight: _StepInFlight | None = None
        self._planned_ahead = False  # the last schedule() planned an async step
        self._drained: list[EngineCoreOutput] = []  # outputs of a step finished early

    # ------------------------------------------------------------- accessors
    @property
    def block_manager(self):  # noqa: ANN201 - the scheduler's; exposed for tests and stats
        return self.scheduler.block_manager

    @property
    def runner(self):  # noqa: ANN201 - the target model's runner
        return self.executor.runner

    @property
    def max_model_len(self) -> int:
        return self.limits.max_model_len

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    # -------------------------------------------------------------- requests
    def add_request(self, request: EngineCoreRequest) -> None:
        """Queue a request. Raises :class:`RequestRejected` if it can never be served."""
        rid = request.request_id
        if rid in self._requests:
            raise RequestRejected(f"request id {rid!r} is already in use", code="duplicate_id")
        token_ids = list(request.prompt_token_ids)
        params = validate_request(self.limits, token_ids, request.params)
        order = next(self._arrivals)
        seq = self._new_sequence(rid, 0, token_ids, params, request.arrival_time, order,
                                 request.priority)
        future = self._start_grammar(params)
        req = _CoreRequest(
            request_id=rid, params=params, seqs=[seq], arrival_time=request.arrival_time,
            prompt_logprobs_sent=0 if params.prompt_logprobs is not None else None,
        )
        self._requests[rid] = req
        self._seqs[seq.seq_id] = seq
        if _reads_history(params):
            self._num_history_readers += 1
        if not _plain_greedy(params):
            self._num_not_plain += 1
        if not _async_safe(params):
            self._num_not_async += 1
        self._num_unstarted += 1
        if future is None:
            self.scheduler.add(seq)
        else:
            self._awaiting_grammar[rid] = (seq, future)
            self._admit_compiled()

    def _start_grammar(self, params: SamplingParams) -> Future[Any] | None:
        """Start compiling the request's grammar (None when it has none)."""
        spec = params.structured_outputs
        if spec is None:
            return None
        if self.structured is None:
            raise RequestRejected("structured outputs are not available on this engine (the "
                                  "model has no tokenizer)", code="invalid_value",
                                  param="structured_outputs")
        return self.structured.submit(spec)

    def _admit_compiled(self) -> None:
        """Move requests whose grammar is ready into the scheduler (or fail them)."""
        for rid, (seq, future) in list(self._awaiting_grammar.items()):
            if not future.done():
                continue
            del self._awaiting_grammar[rid]
            error = future.exception()
            if error is not None:
                logger.warning("request %s: grammar compilation failed: %s", rid, error)
                req = self._requests.get(rid)
                if req is not None:
                    self._drop(req)
                self._failed.append(EngineCoreOutput(
                    rid, finished=True, error=f"grammar compilation failed: {error}"))
                continue
            assert self.structured is not None
            seq.grammar = self.structured.new_grammar(future.result(), seq.prompt_token_ids)
            self.scheduler.add(seq)

    @property
    def num_awaiting_grammar(self) -> int:
        """Requests waiting for their grammar to compile."""
        return len(self._awaiting_grammar)

    def wait_for_grammars(self, timeout: float) -> None:
        """Block until a pending grammar compiles (or ``timeout`` seconds pass)."""
        futures = [f for _, f in self._awaiting_grammar.values()]
        if futures:
            concurrent.futures.wait(futures, timeout, concurrent.futures.FIRST_COMPLETED)

    def _new_sequence(
        self, request_id: str, index: int, token_ids: list[int], params: SamplingParams,
        arrival: float, order: int, priority: int,
    ) -> Sequence:
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed((params.seed * 1_000_003 + index) & 0x7FFF_FFFF_FFFF_FFFF)
        # The arrival order makes the id unique for the core's lifetime: a request id can
        # come back while a step planned ahead still names the earlier request's sequence.
        return Sequence(
            seq_id=f"{request_id}#{index}@{order}", request_id=request_id, index=index,
            token_ids=list(token_ids), num_prompt_tokens=len(token_ids), params=params,
            arrival_time=arrival, arrival_order=order, priority=priority, generator=generator,
        )

    def abort_request(self, request_id: str, index: int | None = None) -> bool:
        """Stop a request (or one sample of it) wherever it is; frees its blocks.

        Unknown ids are ignored (the request may have finished meanwhile).
        """
        req = self._requests.get(request_id)
        if req is None:
            return False
        if index is None or req.params.n == 1:
            self._awaiting_grammar.pop(request_id, None)
        for seq in req.seqs:
            if index is not None and seq.index != index:
                continue
            if not seq.is_finished:
                self.scheduler.abort(seq)
            self._seqs.pop(seq.seq_id, None)
        if index is None or req.finished:
            self._drop(req)
        return True

    def _drop(self, req: _CoreRequest) -> None:
        if self._requests.pop(req.request_id, None) is not None:
            if _reads_history(req.params):
                self._num_history_readers -= 1
            if not _plain_greedy(req.params):
                self._num_not_plain -= 1
            if not _async_safe(req.params):
                self._num_not_async -= 1
            if req.scheduled_time is None:
                self._num_unstarted -= 1
        for seq in req.seqs:
            self._seqs.pop(seq.seq_id, None)

    def fail_all(self, error: str) -> list[EngineCoreOutput]:
        """Abort every request in flight and say why (after a step raised)."""
        outputs = []
        self._in_flight, self._drained, self._planned_ahead = None, [], False
        for req in list(self._requests.values()):
            self.abort_request(req.request_id)
            outputs.append(EngineCoreOutput(req.request_id, finished=True, error=error))
        return outputs

    def shutdown(self) -> None:
        """Finish the offload tiers' queued writes, stop what the executor started."""
        try:
            if self.kv_offload is not None:
                self.kv_offload.close()
        finally:
            self.executor.shutdown()

    # ------------------------------------------------------------------ step
    def step(self) -> list[EngineCoreOutput]:
        """Schedule and run one step; return the deltas of the requests it touched.

        With nothing runnable but grammars compiling, waits briefly for them first.
        """
        sched = self.schedule()
        if sched.is_empty and self._awaiting_grammar and not self._failed:
            self.wait_for_grammars(0.05)
            sched = self.schedule()
        return self.execute(sched)

    def schedule(self) -> SchedulerOutput:
        """Plan the next step (requests scheduled for the first time become "started")."""
        if self._awaiting_grammar:
            self._admit_compiled()
        ahead = self.async_scheduling and not self._num_not_async
        if not ahead and self._in_flight is not None:
            # A request that needs one step at a time arrived: finish the step in flight
            # (its outputs go out with the next execute) before planning without it.
            self._drained += self._finish(self._in_flight)
            self._in_flight = None
        self._planned_ahead = ahead
        sched = self.scheduler.schedule(ahead=ahead)
        if self._num_unstarted:  # else every scheduled request has started before
            for item in sched.seqs:
                req = self._requests[self._seqs[item.seq_id].request_id]
                if req.scheduled_time is None:
                    req.scheduled_time = time.time()
                    self._started.append(req.request_id)
                    self._num_unstarted -= 1
        return sched

    def pop_started(self) -> list[str]:
        """Requests first scheduled since the last call."""
        started, self._started = self._started, []
        return started

    def execute(self, sched: SchedulerOutput) -> list[EngineCoreOutput]:
        """Run a planned step: forward, sample/verify, update, propose drafts.

        With async scheduling, launch it and return the previous step's outputs.
        """
        failed, self._failed = self._failed, []
        failed += self._drained
        self._drained = []
        if self._planned_ahead:
            return failed + self._execute_ahead(sched)
        if self.kv_offload is not None:
            self.kv_offload.restore(sched.kv_restores, self.executor)
        model_out = self.executor.execute(sched)
        if sched.is_empty:
            return failed
        self._steps += 1
        now = time.time()
        outputs: dict[str, EngineCoreOutput] = {}
        for item in sched.seqs:
            rid = self._seqs[item.seq_id].request_id
            if rid not in outputs:
                outputs[rid] = EngineCoreOutput(rid)
                req = self._requests[rid]
                if req.prompt_logprobs_sent == 0:
                    outputs[rid].prompt_logprobs = [None]  # the first prompt token has none
                    req.prompt_logprobs_sent = 1
        sampled, logprobs, forks = self._sample_and_verify(sched, model_out, outputs)
        if self.speculator is not None:
            work = [(self._seqs[item.seq_id], item) for item in sched.seqs]
        update = self.scheduler.update(sched, sampled, forks)
        if self.speculator is not None:
            self.speculator.propose(work)
        if self.kv_offload is not None and update.offload:
            # After propose: a draft model's catch-up pass writes its KV for this step's
            # tokens there, and the tiers keep the draft's block beside the target's.
            # Nothing reuses a freed block before the next schedule().
            self.kv_offload.store(update.offload, self.executor)
        return failed + self._collect(outputs, update.num_appended, logprobs, now)

    # ------------------------------------------------------ async scheduling
    def _execute_ahead(self, sched: SchedulerOutput) -> list[EngineCoreOutput]:
        """Launch ``sched``, then finish the step launched before it."""
        previous, self._in_flight = self._in_flight, None
        if not sched.is_empty:
            if self.kv_offload is not None:
                self.kv_offload.restore(sched.kv_restores, self.executor)
            model_out = self.executor.execute(sched, self._placeholder_fill(sched, previous))
            self._steps += 1
            self._in_flight = self._launch_sampling(sched, model_out)
        return self._finish(previous) if previous is not None else []

    @staticmethod
    def _placeholder_fill(sched: SchedulerOutput,
                          previous: _StepInFlight | None) -> TokenFill | None:
        """Where each placeholder token of ``sched`` comes from in the step before it."""
        rows: list[int] = []
        ids: list[str] = []
        row = 0
        for item in sched.seqs:
            row += len(item.token_ids)
            if item.token_ids[-1] == PLACEHOLDER_TOKEN:  # a decode of a token in flight
                rows.append(row - 1)
                ids.append(item.seq_id)
        if not rows:
            return None
        assert previous is not None, "a placeholder without a step in flight"
        device = previous.tokens.device
        if ids == previous.sampled_ids:  # steady decode: the same sequences, in order
            source_rows: range | torch.Tensor = range(len(ids))
        else:
            index = {sid: i for i, sid in enumerate(previous.sampled_ids)}
            source_rows = device_tensor([index[sid] for sid in ids], device=device)
        target_rows: range | torch.Tensor = (
            range(len(rows)) if rows[-1] == len(rows) - 1  # the step's first rows
            else device_tensor(rows, device=device))
        return TokenFill(target_rows, previous.tokens, source_rows)

    def _launch_sampling(self, sched: SchedulerOutput, model_out: ModelOutput) -> _StepInFlight:
        """Queue the step's sampling; start copying the tokens to the host."""
        sampled_ids: list[str] = []
        rows: list[int] = []
        for item, r in zip(sched.seqs, model_out.rows):
            if item.samples and r:
                sampled_ids.append(item.seq_id)
                rows.append(r.stop - 1)
        logits = model_out.logits
        if rows and (len(rows) != logits.shape[0] or rows[-1] != len(rows) - 1):
            # Only some rows are sampled (prompt chunks); a host index copied without
            # waiting for the device (a plain copy would wait for the forward pass).
            logits = logits[device_tensor(rows, device=logits.device)]
        if not rows:
            tokens = torch.empty(0, dtype=torch.long, device=self.device)
        elif not self._num_not_plain:
            tokens = argmax_rows(logits)
        else:
            seqs = [self._seqs[sid] for sid in sampled_ids]
            batch = SamplingBatch(
                params=[s.params for s in seqs],
                prompt_token_ids=[_NO_HISTORY] * len(seqs),
                output_token_ids=[_NO_HISTORY] * len(seqs),
                generators=[s.generator for s in seqs],
                eos_token_ids=tuple(self.scheduler.eos_token_ids),
            )
            tokens = self.sampler.sample_tokens(logits, batch)
        if tokens.device.type != "cuda":
            return _StepInFlight(sched, sampled_ids, tokens, tokens)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return _StepInFlight(sched, sampled_ids, tokens, host, copied)

    def _finish(self, step: _StepInFlight) -> list[EngineCoreOutput]:
        """Wait for a launched step's tokens; update the scheduler; build the deltas."""
        token_ids = step.token_ids()
        now = time.time()
        outputs: dict[str, EngineCoreOutput] = {}
        for item in step.sched.seqs:
            seq = self._seqs.get(item.seq_id)
            if seq is None:
                continue  # finished or aborted since this step was planned
            if seq.request_id not in outputs:
                outputs[seq.request_id] = EngineCoreOutput(seq.request_id)
        sampled = {sid: SampledTokens([token])
                   for sid, token in zip(step.sampled_ids, token_ids, strict=True)
                   if sid in self._seqs}
        update = self.scheduler.update(step.sched, sampled)
        if self.kv_offload is not None and update.offload:
            self.kv_offload.store(update.offload, self.executor)
        return self._collect(outputs, update.num_appended, {}, now)

    def _sample_and_verify(
        self, sched: SchedulerOutput, model_out: ModelOutput, outputs: dict[str, EngineCoreOutput],
    ) -> tuple[dict[str, SampledTokens], dict[str, list[TokenLogprob | None]],
               list[tuple[Sequence, Sequence]]]:
        logits = model_out.logits
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        forks: list[tuple[Sequence, Sequence]] = []
        spec: list[tuple[Sequence, ScheduledSeq, range]] = []
        for item, rows in zip(sched.seqs, model_out.rows):
            seq = self._seqs[item.seq_id]
            req = self._requests[seq.request_id]
            if (req.prompt_logprobs_sent is not None and rows and seq.index == 0
                    and seq.num_output_tokens == 0):
                first_pos = item.start_pos + len(item.token_ids) - item.num_logits
                entries = self._prompt_logprobs(req, seq, first_pos, logits[rows.start:rows.stop])
                if entries:
                    out = outputs[req.request_id]
                    out.prompt_logprobs = (out.prompt_logprobs or []) + entries
            if item.num_draft_tokens:
                spec.append((seq, item, rows))
                continue
            if not rows or item.start_pos + len(item.token_ids) != seq.num_tokens:
                continue  # a mid-prompt chunk
            sample_rows.append(rows.stop - 1)
            sample_seqs.append(seq)
            if req.params.n > 1 and not req.forked:
                # n > 1: siblings start from this prompt and sample from the same logits.
                req.forked = True
                for i in range(1, req.params.n):
                    child = self._new_sequence(
                        req.request_id, i, seq.token_ids, seq.params, seq.arrival_time,
                        seq.arrival_order, seq.priority)
                    if seq.grammar is not None:
                        child.grammar = seq.grammar.fork()  # nothing accepted yet
                    req.seqs.append(child)
                    self._seqs[child.seq_id] = child
                    forks.append((seq, child))
                    sample_rows.append(rows.stop - 1)
                    sample_seqs.append(child)

        sampled: dict[str, SampledTokens] = {}
        logprobs: dict[str, list[TokenLogprob | None]] = {}
        if sample_seqs and not self._num_not_plain:
            # every row sampled in order (a decode step): no copy of the logits
            every_row = sample_rows == list(range(logits.shape[0]))
            tokens = self.sampler.greedy(logits if every_row else logits[sample_rows])
            for seq, token in zip(sample_seqs, tokens, strict=True):
                sampled[seq.seq_id] = SampledTokens([token])
                logprobs[seq.seq_id] = [None]
        elif sample_seqs:
            if self._num_history_readers:
                history = [_reads_history(s.params) for s in sample_seqs]
                prompts = [s.prompt_token_ids if h else _NO_HISTORY
                           for s, h in zip(sample_seqs, history)]
                outputs_so_far = [s.output_token_ids if h else _NO_HISTORY
                                  for s, h in zip(sample_seqs, history)]
            else:
                prompts = outputs_so_far = [_NO_HISTORY] * len(sample_seqs)
            batch = SamplingBatch(
                params=[s.params for s in sample_seqs],
                prompt_token_ids=prompts,
                output_token_ids=outputs_so_far,
                generators=[s.generator for s in sample_seqs],
                eos_token_ids=tuple(self.scheduler.eos_token_ids),
            )
            if self.structured is not None:
                batch.token_bitmask, batch.bitmask_rows = (
                    self.structured.sampling_bitmask(sample_seqs))
            result = self.sampler(logits[sample_rows], batch)
            for seq, token, lp in zip(sample_seqs, result.token_ids, result.logprobs):
                sampled[seq.seq_id] = SampledTokens([token])
                logprobs[seq.seq_id] = [lp]
        if spec:
            assert self.speculator is not None
            num_drafts = [item.num_draft_tokens for _, item, _ in spec]
            masks: list[tuple[torch.Tensor, list[int]] | None] = [None] * len(spec)
            for i, (seq, _, _) in enumerate(spec):
                if seq.grammar is not None and self.structured is not None:
                    # Drafts the grammar refuses are cut before verification.
                    valid, bitmask, rows = self.structured.draft_bitmask(
                        seq, seq.spec_token_ids[:num_drafts[i]])
                    num_drafts[i] = valid
                    if bitmask is not None:
                        masks[i] = (bitmask, rows)
            verified = self.speculator.verify(
                [seq for seq, _, _ in spec],
                num_drafts,
                [logits[r.start:r.start + d + 1] for (_, _, r), d in zip(spec, num_drafts)],
                self.sampler,
                masks,
            )
            for (seq, _, _), v in zip(spec, verified):
                sampled[seq.seq_id] = SampledTokens(v.token_ids, v.num_accepted)
                logprobs[seq.seq_id] = list(v.logprobs)
        return sampled, logprobs, forks

    def _prompt_logprobs(
        self, req: _CoreRequest, seq: Sequence, first_pos: int, rows: torch.Tensor
    ) -> list[TokenLogprob | None]:
        """Entries for the prompt positions these rows predict that were not sent yet.

        Row j holds the logits at position first_pos + j, predicting token
        first_pos + j + 1. Rows already covered (recompute after preemption)
        are skipped.
        """
        assert req.prompt_logprobs_sent is not None
        done = req.prompt_logprobs_sent  # next prompt position without an entry
        skip = max(0, done - 1 - first_pos)
        end = min(first_pos + rows.shape[0], seq.num_prompt_tokens - 1)  # last predicting row
        if first_pos + skip >= end or first_pos + skip + 1 != done:
            return []
        targets = seq.token_ids[first_pos + skip + 1 : end + 1]
        entries = compute_prompt_logprobs(rows[skip : skip + len(targets)], targets,
                                          req.params.prompt_logprobs or 0)
        req.prompt_logprobs_sent += len(entries)
        return list(entries)

    def _collect(
        self, outputs: dict[str, EngineCoreOutput], num_appended: dict[str, int],
        logprobs: dict[str, list[TokenLogprob | None]], now: float,
    ) -> list[EngineCoreOutput]:
        """Fill each touched request's delta from what the update appended."""
        for rid, out in outputs.items():
            req = self._requests[rid]
            if not req.scheduled_time_sent:
                req.scheduled_time_sent = True
                out.scheduled_time = req.scheduled_time
            for seq in req.seqs:
                appended = num_appended.get(seq.seq_id, 0)
                if not appended:
                    continue  # tokens are only ever appended (or a sample finished) together
                lps = logprobs.get(seq.seq_id) if seq.params.logprobs is not None else None
                out.seqs.append(SeqDelta(
                    index=seq.index,
                    new_token_ids=seq.token_ids[len(seq.token_ids) - appended:],
                    new_logprobs=list(lps[:appended]) if lps is not None else None,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                ))
                self._generation_tokens_total += appended
            if out.seqs and not req.first_token_sent:
                req.first_token_sent = True
                out.first_token_time = now
                self._prompt_tokens_total += req.seqs[0].num_prompt_tokens
            out.num_cached_tokens = req.seqs[0].num_cached_tokens
            if req.finished:
                out.finished = True
                out.num_preemptions = sum(s.num_preemptions for s in req.seqs)
                self._drop(req)
        return list(outputs.values())

    # ----------------------------------------------------------------- stats
    def _offload_stats(self) -> dict[str, Any]:
        if self.kv_offload is None:
            return {}
        st = self.kv_offload.stats
        return dict(
            kv_offload_stores_total=st.stores, kv_offload_store_bytes_total=st.store_bytes,
            kv_offload_dropped_total=st.dropped, kv_offload_hits_total=st.hits,
            kv_offload_hit_bytes_total=st.hit_bytes, kv_offload_misses_total=st.misses,
            kv_offload_restore_seconds_total=st.restore_seconds,
            kv_offload_restored_tokens_total=self.scheduler.num_restored_tokens,
        )

    def stats(self) -> EngineStats:
        bm = self.scheduler.block_manager
        spec = self.speculator
        grammar = self.structured.stats if self.structured is not None else None
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting) + len(self._awaiting_grammar),
            kv_cache_usage=bm.usage,
            num_total_blocks=bm.num_blocks,
            num_free_blocks=bm.num_free_blocks,
            kv_cache_capacity_tokens=bm.num_blocks * bm.block_size,
            **self._offload_stats(),
            prefix_cache_queries=bm.prefix_queries,
            prefix_cache_hits=bm.prefix_hits,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total,
            steps_total=self._steps,
            spec_draft_tokens_total=spec.num_draft_tokens if spec else 0,
            spec_accepted_tokens_total=spec.num_accepted_tokens if spec else 0,
            spec_verifications_total=spec.num_verifications if spec else 0,
            grammar_compiles_total=grammar.compiles if grammar else 0,
            grammar_cache_hits_total=grammar.cache_hits if grammar else 0,
            grammar_compile_errors_total=grammar.errors if grammar else 0,
            grammar_compile_seconds_total=grammar.compile_seconds if grammar else 0.0,
        )


def _plain_greedy(p: SamplingParams) -> bool:
    """Whether the sampler's answer for this row is just the argmax of its logits."""
    return (p.is_greedy and not p.logit_bias and p.logprobs is None
            and p.structured_outputs is None and not _reads_history(p))


def _async_safe(p: SamplingParams) -> bool:
    """Whether a request's steps may be planned before its last token is known.

    Its sampling must not read the token history (penalties, ``min_tokens``) nor a
    grammar's state, and nothing may be computed from the logits on the host
    (logprobs); ``n > 1`` forks its samples from the first token's step.
    """
    return (p.n == 1 and p.logprobs is None and p.prompt_logprobs is None
            and p.structured_outputs is None and not _reads_history(p))


def _reads_history(p: SamplingParams) -> bool:
    """Whether the sampler reads a row's token history (penalties, ``min_tokens``).

    Other rows get an empty history, so a step does not copy every sequence's
    tokens (O(length) each) for nothing.
    """
    return (p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0
            or p.presence_penalty != 0.0 or p.min_tokens > 0)
