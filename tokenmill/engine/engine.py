"""The synchronous engine: add requests, call ``step()``, collect outputs.

One step = schedule → run the model once over every scheduled token →
sample one token for each sequence that reached the end of its tokens →
update state, detokenize, check stop conditions → free what finished.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tokenmill.config import EngineConfig
from tokenmill.engine.args import EngineArgs
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.outputs import (
    CompletionOutput,
    EngineStats,
    RequestMetrics,
    RequestOutput,
    TokenLogprob,
)
from tokenmill.engine.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from tokenmill.engine.sequence import Sequence
from tokenmill.runner.attention.base import get_attention_backend
from tokenmill.runner.cuda_graphs import DEFAULT_MAX_CAPTURE_BATCH, CudaGraphConfig
from tokenmill.runner.kv_cache import allocate_kv_cache, bytes_per_block, num_kv_blocks
from tokenmill.runner.model_runner import ModelRunner, profile_peak_memory
from tokenmill.sampling import Sampler, SamplingBatch, SamplingParams
from tokenmill.sampling.sampler import compute_prompt_logprobs

if TYPE_CHECKING:
    from tokenmill.spec.speculator import Speculator

logger = logging.getLogger(__name__)


class RequestRejected(ValueError):
    """A request that can never be served (too long for the model or the KV cache)."""

    def __init__(self, message: str, code: str = "invalid_request", **details: int):
        super().__init__(message)
        self.code = code
        self.details = details


@dataclass(eq=False)
class _Request:
    """A user request: its ``n`` sequences and request-level bookkeeping."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    metrics: RequestMetrics
    prompt_logprobs: list[TokenLogprob | None] | None = None
    forked: bool = False

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs) and (self.forked or self.params.n == 1)


class LLMEngine:
    """Continuous-batching inference engine over a paged KV cache."""

    def __init__(self, args: EngineArgs):
        from tokenmill.model.loader import load_model, resolve_model

        self.args = args
        device = args.resolved_device()
        dtype = args.resolved_dtype(device)
        if device.type == "cpu":
            torch.set_num_threads(args.num_threads or os.cpu_count() or 1)
        backend = get_attention_backend(args.resolved_backend(device))

        t0 = time.perf_counter()
        resolved = resolve_model(args.model, args.load_format)
        loaded = load_model(resolved, dtype=dtype, device=str(device), attn_backend=backend,
                            quantization=args.quantization)
        self.model_config = loaded.config
        self.tokenizer = _load_tokenizer(args, resolved, loaded)
        self.model_path = resolved.path
        self.gguf_file = resolved.gguf_file
        self.model_name = _model_name(resolved)
        load_s = time.perf_counter() - t0

        cache_cfg = args.cache_config()
        sched_cfg = args.scheduler_config(self.model_config.max_position_embeddings, device)
        self.config = EngineConfig(
            model=self.model_config, model_path=resolved.path, cache=cache_cfg,
            scheduler=sched_cfg, dtype=dtype, quantization=args.quantization, device=str(device),
            load_format=resolved.format, attention_backend=backend.name, seed=args.seed,
            num_threads=args.num_threads,
        )
        spec_cfg = args.speculative_config()
        draft_loaded = None
        if spec_cfg is not None and spec_cfg.method == "draft":
            from tokenmill.spec.draft_model import load_draft_model

            # Loaded before KV sizing so its weights count against the budget.
            draft_loaded = load_draft_model(
                spec_cfg.model or "", self.model_config, sched_cfg.max_model_len, dtype,
                device, backend, load_format="dummy" if args.load_format == "dummy" else "auto",
                quantization=args.speculative_quantization,
            )
        peak = None
        if (device.type == "cuda" and cache_cfg.kv_cache_memory is None
                and cache_cfg.num_gpu_blocks_override is None):
            # Size the KV cache from what a worst-case step leaves free.
            mc = self.model_config
            peak = profile_peak_memory(
                loaded.model, mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim,
                sched_cfg.max_num_batched_tokens, sched_cfg.max_num_seqs,
                cache_cfg.block_size, dtype, device,
            )
            torch.cuda.empty_cache()  # hand the profiling activations back to the device
        num_blocks = num_kv_blocks(self.model_config, cache_cfg, dtype, device, peak)
        if draft_loaded is not None and cache_cfg.num_gpu_blocks_override is None:
            from tokenmill.spec.draft_model import split_kv_blocks

            # The draft's cache mirrors the target's block for block: share the budget.
            num_blocks = split_kv_blocks(num_blocks, self.model_config, draft_loaded.config,
                                         cache_cfg.block_size, dtype)
        kv = allocate_kv_cache(self.model_config, num_blocks, cache_cfg.block_size, dtype, device)
        self.block_manager = BlockManager(
            num_blocks, cache_cfg.block_size, cache_cfg.enable_prefix_caching
        )
        self.scheduler = Scheduler(sched_cfg, self.block_manager)
        graph_cfg = None
        if device.type == "cuda" and not args.enforce_eager:
            largest = args.max_cudagraph_batch_size or DEFAULT_MAX_CAPTURE_BATCH
            graph_cfg = CudaGraphConfig(
                max_batch_size=max(1, min(largest, sched_cfg.max_num_seqs)),
                max_model_len=sched_cfg.max_model_len,
            )
        self.runner = ModelRunner(loaded.model, kv, cache_cfg.block_size,
                                  attn_backend=backend, graph_config=graph_cfg)
        self.runner.capture_cuda_graphs()
        gen = torch.Generator(device=device).manual_seed(args.seed)
        self.sampler = Sampler(default_generator=gen)
        self.device = device
        self.max_model_len = sched_cfg.max_model_len
        self.eos_token_ids = tuple(
            self.tokenizer.eos_token_ids if self.tokenizer is not None
            else self.model_config.eos_token_ids
        )
        self.speculator: Speculator | None = None
        if spec_cfg is not None:
            from tokenmill.spec.draft_model import build_draft_proposer
            from tokenmill.spec.speculator import Speculator

            draft = None if draft_loaded is None else build_draft_proposer(
                draft_loaded, num_blocks, cache_cfg.block_size, dtype, device, backend,
                self.eos_token_ids, gen,
            )
            self.speculator = Speculator(spec_cfg, self.block_manager, self.max_model_len,
                                         self.eos_token_ids, gen, draft)

        self._requests: dict[str, _Request] = {}
        self._seq_to_request: dict[str, _Request] = {}
        self._arrivals = itertools.count()
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._steps = 0

        capacity = num_blocks * cache_cfg.block_size
        block_bytes = bytes_per_block(self.model_config, cache_cfg.block_size, dtype)
        kv_mib = num_blocks * block_bytes / 2**20
        logger.info(
            "loaded %s (%s, %s) in %.1fs on %s; KV cache: %d blocks x %d tokens = %d tokens "
            "(%.0f MiB); max concurrency at full context (%d tokens): %.2f",
            self.model_config.architecture, resolved.format, str(dtype).replace("torch.", ""),
            load_s, device, num_blocks, cache_cfg.block_size, capacity, kv_mib,
            self.max_model_len, capacity / self.max_model_len,
        )

    @classmethod
    def from_engine_args(cls, **kwargs: Any) -> LLMEngine:
        return cls(EngineArgs.from_kwargs(**kwargs))

    # --------------------------------------------------------------- requests
    def add_request(
        self,
        request_id: str,
        prompt: str | Seq[int],
        params: SamplingParams | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a request. Raises :class:`RequestRejected` if it can never be served."""
        text, token_ids, params = self.preprocess(prompt, params)
        self.add_prepared(request_id, text, token_ids, params, priority, arrival_time)

    def preprocess(
        self, prompt: str | Seq[int], params: SamplingParams | None = None
    ) -> tuple[str | None, list[int], SamplingParams]:
        """Tokenize and validate without touching engine state (safe from any thread)."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids, not text")
            text: str | None = prompt
            token_ids = self.tokenizer.encode(prompt)
        else:
            text = None
            token_ids = [int(t) for t in prompt]
        self._validate(token_ids, params)
        if params.max_tokens is None:
            params = params.clone(max_tokens=self.max_model_len - len(token_ids))
        return text, token_ids, params

    def add_prepared(
        self,
        request_id: str,
        text: str | None,
        token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> None:
        """Queue an already preprocessed request (engine thread only)."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        now = time.time() if arrival_time is None else arrival_time
        order = next(self._arrivals)
        seq = self._new_sequence(request_id, 0, token_ids, params, now, order, priority)
        req = _Request(
            request_id=request_id, prompt=text, prompt_token_ids=token_ids, params=params,
            seqs=[seq], metrics=RequestMetrics(arrival_time=now),
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
        )
        self._requests[request_id] = req
        self._seq_to_request[seq.seq_id] = req
        self.scheduler.add(seq)

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise RequestRejected("the prompt is empty", code="invalid_prompt")
        vocab = self.model_config.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestRejected(f"token id {bad} is out of range [0, {vocab})",
                                  code="invalid_prompt")
        n_prompt = len(token_ids)
        max_tokens = params.max_tokens if params.max_tokens is not None else 1
        if n_prompt + max_tokens > self.max_model_len:
            raise RequestRejected(
                f"This model's maximum context length is {self.max_model_len} tokens. "
                f"However, you requested {n_prompt + max_tokens} tokens ({n_prompt} in the "
                f"prompt, {max_tokens} for the completion). Please reduce the prompt or "
                "max_tokens.",
                code="context_length_exceeded",
                prompt_tokens=n_prompt, max_tokens=max_tokens, max_model_len=self.max_model_len,
            )
        need = self.block_manager.blocks_needed(n_prompt + max_tokens)
        if need > self.block_manager.num_blocks:
            capacity = self.block_manager.num_blocks * self.block_manager.block_size
            raise RequestRejected(
                f"the request needs {n_prompt + max_tokens} tokens of KV cache but the whole "
                f"cache holds {capacity}; raise kv_cache_memory or shorten the request",
                code="kv_cache_capacity_exceeded",
                prompt_tokens=n_prompt, max_tokens=max_tokens,
            )

    def _new_sequence(
        self, request_id: str, index: int, token_ids: list[int], params: SamplingParams,
        arrival: float, order: int, priority: int,
    ) -> Sequence:
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed((params.seed * 1_000_003 + index) & 0x7FFF_FFFF_FFFF_FFFF)
        seq = Sequence(
            seq_id=f"{request_id}#{index}", request_id=request_id, index=index,
            token_ids=list(token_ids), num_prompt_tokens=len(token_ids), params=params,
            arrival_time=arrival, arrival_order=order, priority=priority, generator=generator,
            logprobs=[] if params.logprobs is not None else None,
        )
        if self.tokenizer is not None:
            from tokenmill.tokenizer import IncrementalDetokenizer

            seq.detokenizer = IncrementalDetokenizer(
                self.tokenizer, list(token_ids), skip_special_tokens=params.skip_special_tokens
            )
        return seq

    def abort_request(self, request_id: str) -> bool:
        """Stop a request wherever it is; frees all its blocks. Unknown ids are ignored."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.abort(seq)
                seq.finish_reason = seq.finish_reason or "abort"
            self._seq_to_request.pop(seq.seq_id, None)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    # ------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Run one scheduling + forward + sampling step; return outputs of touched requests."""
        sched = self.scheduler.schedule()
        if self.speculator is not None:
            self.speculator.copy_blocks(sched.block_copies)
        if sched.is_empty:
            if sched.block_copies:
                self.runner.copy_blocks(sched.block_copies)
            return []
        self._steps += 1
        now = time.time()
        logits = self.runner.execute(sched)
        touched = self._process(sched, logits, now)
        return [self._make_output(req) for req in touched]

    def _process(self, sched: SchedulerOutput, logits: torch.Tensor, now: float) -> list[_Request]:
        rows_for_sampling: list[int] = []
        sample_seqs: list[Sequence] = []
        touched: dict[str, _Request] = {}
        work: list[tuple[Sequence, ScheduledSeq]] = []
        spec_items: list[tuple[Sequence, ScheduledSeq, range]] = []
        row = 0
        for item in sched.seqs:
            req = self._seq_to_request[item.seq_id]
            seq = next(s for s in req.seqs if s.seq_id == item.seq_id)
            touched[req.request_id] = req
            work.append((seq, item))
            if req.metrics.scheduled_time is None:
                req.metrics.scheduled_time = now
            # Draft positions count as computed only once verified (below).
            seq.num_computed_tokens += len(item.token_ids) - item.num_draft_tokens
            self.block_manager.cache_full_blocks(seq.seq_id, seq.token_ids,
                                                 seq.num_computed_tokens)
            rows = range(row, row + item.num_logits)
            row += item.num_logits
            if (req.prompt_logprobs is not None and item.num_logits and seq.index == 0
                    and seq.num_output_tokens == 0):
                first_pos = item.start_pos + len(item.token_ids) - item.num_logits
                self._record_prompt_logprobs(req, seq, first_pos, logits[rows.start:rows.stop])
            if item.num_draft_tokens:
                spec_items.append((seq, item, rows))
            elif seq.num_computed_tokens == seq.num_tokens:
                rows_for_sampling.append(rows.stop - 1)
                sample_seqs.append(seq)

        finished: list[Sequence] = []  # freed at the end, after the draft model's pass
        if sample_seqs:
            self._sample(rows_for_sampling, sample_seqs, logits, now, finished)
        if spec_items:
            self._verify(spec_items, logits, now, finished)
        if self.speculator is not None:
            self.speculator.propose(work)
        for seq in finished:
            if seq.detokenizer is not None and not isinstance(seq.stop_reason, str):
                seq.text += seq.detokenizer.flush()  # a character cut off at the end
            self.scheduler.finish(seq)
        for req in touched.values():
            if req.finished and req.metrics.finished_time is None:
                req.metrics.finished_time = time.time()
        return list(touched.values())

    def _sample(
        self, rows_for_sampling: list[int], sample_seqs: list[Sequence], logits: torch.Tensor,
        now: float, finished: list[Sequence],
    ) -> None:
        """One token for each sequence that reached the end of its tokens."""
        # n > 1: the first sequence just finished its prompt; fork the siblings
        # so they share its KV blocks, and sample each from the same logits.
        expanded_rows: list[int] = []
        expanded_seqs: list[Sequence] = []
        for r, seq in zip(rows_for_sampling, sample_seqs):
            req = self._seq_to_request[seq.seq_id]
            expanded_rows.append(r)
            expanded_seqs.append(seq)
            if req.params.n > 1 and not req.forked:
                for child in self._fork(req, seq):
                    expanded_rows.append(r)
                    expanded_seqs.append(child)

        batch = SamplingBatch(
            params=[s.params for s in expanded_seqs],
            prompt_token_ids=[s.prompt_token_ids for s in expanded_seqs],
            output_token_ids=[s.output_token_ids for s in expanded_seqs],
            generators=[s.generator for s in expanded_seqs],
            eos_token_ids=self.eos_token_ids,
        )
        result = self.sampler(logits[expanded_rows], batch)
        for seq, token, lp in zip(expanded_seqs, result.token_ids, result.logprobs):
            self._emit_token(seq, token, lp, now)
            if seq.finish_reason is not None:
                finished.append(seq)

    def _verify(
        self, spec_items: list[tuple[Sequence, ScheduledSeq, range]], logits: torch.Tensor,
        now: float, finished: list[Sequence],
    ) -> None:
        """Verify speculative drafts; append accepted drafts + one target token each."""
        assert self.speculator is not None
        results = self.speculator.verify(
            [seq for seq, _, _ in spec_items],
            [item.num_draft_tokens for _, item, _ in spec_items],
            [logits[rows.start : rows.stop] for _, _, rows in spec_items],
            self.sampler,
        )
        for (seq, _, _), verified in zip(spec_items, results):
            computed = seq.num_computed_tokens  # every real token, drafts excluded
            appended = 0
            for token, lp in zip(verified.token_ids, verified.logprobs):
                self._emit_token(seq, token, lp, now)
                appended += 1
                if seq.finish_reason is not None:
                    break  # the rest is discarded
            # Accepted drafts have valid K/V; rejected positions are recomputed
            # (overwritten) later, so only the accepted prefix counts as computed.
            seq.num_computed_tokens = computed + min(verified.num_accepted, appended)
            self.block_manager.cache_full_blocks(seq.seq_id, seq.token_ids,
                                                 seq.num_computed_tokens)
            if seq.finish_reason is not None:
                finished.append(seq)

    def _emit_token(self, seq: Sequence, token: int, lp: TokenLogprob | None, now: float) -> None:
        req = self._seq_to_request[seq.seq_id]
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
            self._prompt_tokens_total += len(req.prompt_token_ids)
        req.metrics.last_token_time = now
        self._append_token(seq, token, lp)
        self._generation_tokens_total += 1

    def _fork(self, req: _Request, parent: Sequence) -> list[Sequence]:
        req.forked = True
        children = []
        for i in range(1, req.params.n):
            child = self._new_sequence(
                req.request_id, i, parent.token_ids, parent.params, parent.arrival_time,
                parent.arrival_order, parent.priority,
            )
            if not self.scheduler.add_forked(parent, child):
                # No block for the copy: the child recomputes its prompt later.
                self.scheduler.add(child)
                req.seqs.append(child)
                self._seq_to_request[child.seq_id] = req
                continue
            req.seqs.append(child)
            self._seq_to_request[child.seq_id] = req
            children.append(child)
        return children

    def _record_prompt_logprobs(
        self, req: _Request, seq: Sequence, first_pos: int, rows: torch.Tensor
    ) -> None:
        """Row j holds the logits at position first_pos + j, predicting the next token.

        ``prompt_logprobs[p]`` belongs to prompt token p (entry 0 is None). Rows
        for positions already recorded (recompute after preemption) are skipped.
        """
        assert req.prompt_logprobs is not None
        done = len(req.prompt_logprobs)  # next prompt position without an entry
        skip = max(0, done - 1 - first_pos)
        end = min(first_pos + rows.shape[0], seq.num_prompt_tokens - 1)  # last predicting row
        if first_pos + skip >= end or first_pos + skip + 1 != done:
            return
        targets = seq.token_ids[first_pos + skip + 1 : end + 1]
        k = req.params.prompt_logprobs or 0
        req.prompt_logprobs.extend(
            compute_prompt_logprobs(rows[skip : skip + len(targets)], targets, k)
        )

    # ------------------------------------------------------- stop conditions
    def _append_token(self, seq: Sequence, token: int, lp: TokenLogprob | None) -> None:
        params = seq.params
        seq.token_ids.append(token)
        if seq.logprobs is not None and lp is not None:
            seq.logprobs.append(lp)
        n_out = seq.num_output_tokens
        min_ok = n_out >= params.min_tokens
        if min_ok and not params.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason = "stop"
            return  # the EOS token itself is not detokenized
        if min_ok and token in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
            if not params.include_stop_str_in_output:
                return
        if seq.detokenizer is not None:
            delta = seq.detokenizer.add_tokens([token])
            seq.text += delta
            if params.stop and min_ok and seq.finish_reason is None:
                self._check_stop_strings(seq, len(delta))
        if seq.finish_reason is None and (
            n_out >= params.max_tokens or seq.num_tokens >= self.max_model_len
        ):
            seq.finish_reason = "length"

    @staticmethod
    def _check_stop_strings(seq: Sequence, delta_len: int) -> None:
        longest = max(len(s) for s in seq.params.stop)
        window_start = max(0, len(seq.text) - delta_len - longest + 1)
        best: tuple[int, str] | None = None
        for stop in seq.params.stop:
            i = seq.text.find(stop, window_start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, stop)
        if best is None:
            return
        i, stop = best
        cut = i + len(stop) if seq.params.include_stop_str_in_output else i
        seq.text = seq.text[:cut]
        seq.finish_reason, seq.stop_reason = "stop", stop

    # ---------------------------------------------------------------- outputs
    def _make_output(self, req: _Request) -> RequestOutput:
        outputs = []
        for seq in sorted(req.seqs, key=lambda s: s.index):
            text = seq.text
            # While running, hold back text that could be the start of a stop string.
            visible = len(text)
            if seq.finish_reason is None and seq.params.stop:
                visible = max(seq.sent_text_len,
                              len(text) - max(len(s) for s in seq.params.stop) + 1)
            out_ids = seq.output_token_ids
            delta_lp = None
            if seq.logprobs is not None:
                delta_lp = seq.logprobs[seq.sent_logprob_len:]
                seq.sent_logprob_len = len(seq.logprobs)
            outputs.append(CompletionOutput(
                index=seq.index,
                text=text[:visible],
                token_ids=list(out_ids),
                logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
                delta_text=text[seq.sent_text_len:visible],
                delta_token_ids=out_ids[seq.sent_token_len:],
                delta_logprobs=delta_lp,
            ))
            seq.sent_text_len = visible
            seq.sent_token_len = len(out_ids)
        finished = req.finished
        if finished:
            self._requests.pop(req.request_id, None)
            for seq in req.seqs:
                self._seq_to_request.pop(seq.seq_id, None)
        req.metrics.num_preemptions = sum(s.num_preemptions for s in req.seqs)
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=outputs,
            finished=finished,
            num_cached_tokens=req.seqs[0].num_cached_tokens,
            prompt_logprobs=req.prompt_logprobs,
            metrics=req.metrics,
        )

    def stats(self) -> EngineStats:
        bm = self.block_manager
        spec = self.speculator
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=bm.usage,
            num_total_blocks=bm.num_blocks,
            num_free_blocks=bm.num_free_blocks,
            prefix_cache_queries=bm.prefix_queries,
            prefix_cache_hits=bm.prefix_hits,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total,
            steps_total=self._steps,
            spec_draft_tokens_total=spec.num_draft_tokens if spec else 0,
            spec_accepted_tokens_total=spec.num_accepted_tokens if spec else 0,
            spec_verifications_total=spec.num_verifications if spec else 0,
        )


def _model_name(resolved: Any) -> str:
    """A short model id: the directory name, or the GGUF file name without quantization."""
    if resolved.gguf_file:
        name = os.path.basename(resolved.gguf_file)
        name = name[: -len(".gguf")] if name.lower().endswith(".gguf") else name
        stem, dot, suffix = name.rpartition(".")
        # "SmolLM2-135M-Instruct.Q4_1" -> "SmolLM2-135M-Instruct"
        if dot and suffix.upper().startswith(("Q", "F16", "F32", "BF16", "IQ")):
            name = stem
        return name
    return os.path.basename(os.path.normpath(resolved.path))


def _load_tokenizer(args: EngineArgs, resolved: Any, loaded: Any) -> Any:
    """The model's tokenizer (GGUF metadata or HF files), or None for bare dummy configs."""
    path = args.tokenizer
    needs_tokenizer = path is not None or getattr(loaded, "gguf_reader", None) is not None or (
        os.path.isfile(os.path.join(resolved.path, "tokenizer.json")))
    if not needs_tokenizer:
        logger.warning("no tokenizer found for %s: only token-id prompts are accepted",
                       resolved.path)
        return None
    from tokenmill.tokenizer import Tokenizer

    if path is not None:
        return Tokenizer.from_path(path)
    if getattr(loaded, "gguf_reader", None) is not None:
        return Tokenizer.from_gguf_reader(loaded.gguf_reader)
    return Tokenizer.from_hf_dir(resolved.path)
