"""The scheduler: one rule for prefill, chunked prefill and decode.

Every sequence has ``num_tokens`` (prompt + generated) and
``num_computed_tokens`` (those with K/V in the cache). Each step has a token
budget; the scheduler walks the running sequences in priority order and gives
each ``min(num_tokens - num_computed_tokens, budget)`` tokens, then admits
waiting sequences with whatever budget is left. A decode is simply a sequence
with one token left to compute; a long prompt is cut into chunks by the budget.
Prefill chunks and decodes therefore share one forward pass.

When the KV pool runs dry, the lowest-priority running sequence (the most
recently arrived one under FCFS) is preempted: it gives back every block and
returns to the waiting queue to be recomputed later (its prefix will often
still be in the prefix cache). The queue is ordered by arrival (or priority),
so a preempted sequence is first in line and nothing starves.

Speculative decoding adds no second rule: a running sequence whose tokens are
all scheduled and that carries proposed draft tokens gets them appended to its
share, budget and free blocks permitting (never at the cost of preempting
anyone), with logits at every position so the engine can verify them.

Async scheduling (``schedule(ahead=True)``) plans a step while the previous one
is still computing: each sequence in that step holds a *claim* (tokens it is
computing, tokens it will sample), and the next plan counts them as if done. A
decode whose last token is still being sampled gets a placeholder, filled on the
device (:data:`~tokenmill.step_types.PLACEHOLDER_TOKEN`). ``update`` settles a
step's claims; a sequence that stops there was planned once more in vain, and a
sequence preempted with a claim keeps its sampled token but not the progress.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable, Mapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Protocol

from tokenmill.config import SchedulerConfig
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.sequence import Sequence, SequenceStatus
from tokenmill.step_types import PLACEHOLDER_TOKEN, SampledTokens, ScheduledSeq, SchedulerOutput

logger = logging.getLogger(__name__)


class KVTierLookup(Protocol):
    """The scheduler's view of the prefix cache's offload tiers
    (:class:`~tokenmill.engine.kv_offload.KVOffloadManager`)."""

    def block_keys(self, token_ids: Seq[int], num_blocks: int,
                   start: Seq[bytes] = ()) -> list[bytes]: ...

    def lookup(self, token_ids: Seq[int], first: int, max_blocks: int) -> list[bytes]: ...


@dataclass
class StepUpdate:
    """What ``Scheduler.update`` did: tokens appended per sequence, sequences finished,
    and (with offload tiers) the newly registered full blocks to offer to them."""

    num_appended: dict[str, int] = field(default_factory=dict)  # seq_id -> new tokens
    finished: list[Sequence] = field(default_factory=list)
    # (block id, content key, the block's token ids)
    offload: list[tuple[int, bytes, list[int]]] = field(default_factory=list)


class Scheduler:
    """Decides, step by step, which sequences compute how many tokens.

    The scheduler is the only caller of the block manager and the only writer of
    a sequence's progress: :meth:`schedule` plans a step, :meth:`update` applies
    its results (advances and rolls back counters, appends tokens with the
    token-level stop checks, registers full blocks, forks ``n > 1`` samples and
    frees what finished).
    """

    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        eos_token_ids: Iterable[int] = (),
        sliding_window: int | None = None,
        kv_tiers: KVTierLookup | None = None,
    ):
        self.config = config
        self.block_manager = block_manager
        # Offload tiers of the prefix cache (host memory, disk): looked up on a pool
        # miss at admission; full blocks are offered to them in update().
        self.kv_tiers = kv_tiers
        self._tier_keys: dict[str, list[bytes]] = {}  # seq_id -> content keys so far
        self.num_restored_tokens = 0  # prompt tokens restored from the tiers
        # Set when every layer (of the target and any draft model) attends through a
        # window of at most this many tokens: blocks behind it are released in update().
        self.sliding_window = sliding_window
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: list[Sequence] = []  # sorted by sort_key
        self.running: list[Sequence] = []  # sorted by sort_key: last = first victim
        self._keys_waiting: list[tuple] = []
        self._keys_running: list[tuple] = []
        self._seqs: dict[str, Sequence] = {}  # every waiting or running sequence
        self._pending_copies: list[tuple[int, int]] = []
        self.num_preemptions = 0
        # Async scheduling: sequences preempted while a step in flight computed them
        # (their claims live on the sequences: Sequence.inflight_tokens/_samples).
        self._preempted_with_claims: set[str] = set()

    # ------------------------------------------------------------------ queues
    def _key(self, seq: Sequence) -> tuple:
        return seq.sort_key(self.config.policy) + (seq.index,)

    def add(self, seq: Sequence) -> None:
        """Queue a new (or preempted) sequence."""
        seq.status = SequenceStatus.WAITING
        key = self._key(seq)
        i = bisect.bisect(self._keys_waiting, key)
        self._keys_waiting.insert(i, key)
        self.waiting.insert(i, seq)
        self._seqs[seq.seq_id] = seq

    def _add_running(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.RUNNING
        key = self._key(seq)
        i = bisect.bisect(self._keys_running, key)
        self._keys_running.insert(i, key)
        self.running.insert(i, seq)
        self._seqs[seq.seq_id] = seq

    def _remove(self, seq: Sequence) -> bool:
        for queue, keys in ((self.running, self._keys_running), (self.waiting, self._keys_waiting)):
            for i, s in enumerate(queue):
                if s is seq:
                    del queue[i]
                    del keys[i]
                    return True
        return False

    def get(self, seq_id: str) -> Sequence | None:
        """A waiting or running sequence by id."""
        return self._seqs.get(seq_id)

    def block_table(self, seq_id: str) -> list[int]:
        return self.block_manager.block_table(seq_id)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -------------------------------------------------------------- lifecycle
    def abort(self, seq: Sequence) -> bool:
        """Drop a sequence wherever it is and free its blocks."""
        found = self._remove(seq)
        self._seqs.pop(seq.seq_id, None)
        self._tier_keys.pop(seq.seq_id, None)
        if self._preempted_with_claims:
            self._preempted_with_claims.discard(seq.seq_id)
        seq.status = SequenceStatus.FINISHED
        if seq.finish_reason is None:
            seq.finish_reason = "abort"
        self.block_manager.free(seq.seq_id)
        return found

    def finish(self, seq: Sequence) -> None:
        """Remove a finished sequence and free its blocks."""
        self.abort(seq)

    def _preempt(self, seq: Sequence) -> None:
        self._remove(seq)
        self.block_manager.free(seq.seq_id)
        self._tier_keys.pop(seq.seq_id, None)
        if seq.inflight_tokens:
            self._preempted_with_claims.add(seq.seq_id)
            seq.inflight_tokens = seq.inflight_samples = 0
        seq.num_computed_tokens = 0
        seq.spec_token_ids, seq.spec_probs = [], None  # proposed for the old state
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)

    def reserve_draft_slots(self, seq: Sequence, num_drafts: int) -> int:
        """KV slots for a draft model's own passes over ``num_drafts`` proposals.

        The draft writes positions ``num_tokens - 1 .. num_tokens + num_drafts - 2``;
        only free blocks are used (never preempting), so fewer drafts may fit.
        Returns how many drafts the reserved slots allow.
        """
        bm = self.block_manager
        if bm.append_slots(seq.seq_id, seq.num_tokens + num_drafts - 1) is not None:
            return num_drafts
        covered = len(bm.block_table(seq.seq_id)) * bm.block_size
        return max(0, min(num_drafts, covered - seq.num_tokens + 1))

    # --------------------------------------------------------------- schedule
    def schedule(self, ahead: bool = False) -> SchedulerOutput:
        """Build the next step's batch.

        ``ahead``: the step may be planned before the previous one is updated
        (async scheduling); its sequences' claims are recorded for the next plan.
        The caller must not ask for drafts, prompt logprobs or ``n > 1`` then.
        """
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[str] = []
        bm = self.block_manager

        # 1) Running sequences, highest priority first.
        planned: list[tuple[Sequence, int, int, int]] = []  # seq, new, computed, total
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            # Counting what a step in flight computes and samples (async scheduling).
            computed = seq.num_computed_tokens + seq.inflight_tokens
            total = seq.num_tokens + seq.inflight_samples
            num_new = min(total - computed, budget)
            if num_new <= 0:
                i += 1
                continue
            while bm.append_slots(seq.seq_id, computed + num_new) is None:
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.seq_id)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # seq preempted itself: nothing lower-priority was left
            planned.append((seq, num_new, computed, total))
            budget -= num_new
            i += 1

        # 1b) Draft tokens of running sequences, from what the real tokens left.
        for seq, num_new, computed, total in planned:
            num_drafts = self._fit_drafts(seq, num_new, budget) if seq.spec_token_ids else 0
            scheduled.append(self._scheduled(seq, num_new, num_drafts, computed, total))
            budget -= num_drafts

        # 2) Waiting sequences, in queue order; stop at the first that does not
        # fit so that nothing behind it can overtake it (no starvation).
        restores: list[tuple[int, bytes]] = []
        while (
            not preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            seq = self.waiting[0]
            # Prompt logprobs need logits at every prompt position: no cache hits.
            wants_prompt_logprobs = getattr(seq.params, "prompt_logprobs", None) is not None
            cached = [] if wants_prompt_logprobs else bm.computed_prefix(seq.token_ids)
            num_cached = len(cached) * bm.block_size
            # A pool miss before the last full block: the tiers may hold what follows.
            tier_keys: list[bytes] = []
            if self.kv_tiers is not None and not wants_prompt_logprobs:
                max_blocks = (seq.num_tokens - 1) // bm.block_size  # never the last token
                tier_keys = self.kv_tiers.lookup(seq.token_ids, len(cached), max_blocks)
            num_restored = len(tier_keys) * bm.block_size
            remaining = seq.num_tokens - num_cached - num_restored
            num_new = min(remaining, budget)
            if num_new < remaining and not self.config.enable_chunked_prefill:
                break
            table = bm.allocate(seq.seq_id, num_cached + num_restored + num_new, cached)
            if table is None:
                break
            # The blocks after the pool's hits receive the tiers' bytes before the step runs.
            restores.extend(zip(table[len(cached):len(cached) + len(tier_keys)], tier_keys,
                                strict=True))
            self.num_restored_tokens += num_restored
            if seq.num_preemptions == 0:
                bm.record_prefix_query(seq.num_prompt_tokens, num_cached)
                seq.num_cached_tokens = num_cached + num_restored
            seq.num_computed_tokens = num_cached + num_restored
            del self.waiting[0]
            del self._keys_waiting[0]
            self._add_running(seq)
            scheduled.append(self._scheduled(seq, num_new, 0, seq.num_computed_tokens,
                                             seq.num_tokens))
            budget -= num_new

        if ahead:
            seqs = self._seqs
            for item in scheduled:
                seq = seqs[item.seq_id]
                seq.inflight_tokens += len(item.token_ids)
                seq.inflight_samples += item.samples
        copies, self._pending_copies = self._pending_copies, []
        return SchedulerOutput(
            seqs=scheduled,
            num_batched_tokens=self.config.max_num_batched_tokens - budget,
            block_copies=copies,
            preempted_ids=preempted,
            kv_restores=restores,
        )

    def _fit_drafts(self, seq: Sequence, num_new: int, budget: int) -> int:
        """How many of ``seq``'s drafts fit this step (blocks for them are taken).

        Drafts follow the last token, so only a sequence whose every token is
        scheduled can carry them; they use leftover budget and free blocks only.
        """
        drafts = len(seq.spec_token_ids)
        if not drafts or seq.num_computed_tokens + num_new != seq.num_tokens:
            return 0
        bm = self.block_manager
        end = seq.num_tokens
        room = (len(bm.block_table(seq.seq_id)) + bm.num_free_blocks) * bm.block_size - end
        num_drafts = max(0, min(drafts, budget, room))
        if num_drafts and bm.append_slots(seq.seq_id, end + num_drafts) is None:
            return 0  # cannot happen given ``room``; stay safe
        return num_drafts

    def _scheduled(self, seq: Sequence, num_new: int, num_drafts: int, start: int,
                   total: int) -> ScheduledSeq:
        """``num_new`` tokens from ``start`` of a sequence ``total`` tokens long (counting
        tokens a step in flight will sample, which get placeholders)."""
        end = start + num_new
        reaches_end = end == total
        num_logits = 1 + num_drafts if reaches_end else 0
        prompt_logprobs = getattr(seq.params, "prompt_logprobs", None)
        if prompt_logprobs is not None and seq.num_output_tokens == 0 and seq.index == 0:
            # Every prompt position predicts the next prompt token.
            num_logits = num_new
        token_ids = seq.token_ids[start:end]
        if end > seq.num_tokens:  # async: the token a step in flight is sampling
            token_ids += [PLACEHOLDER_TOKEN] * (end - max(start, seq.num_tokens))
        return ScheduledSeq(
            seq_id=seq.seq_id,
            token_ids=token_ids + seq.spec_token_ids[:num_drafts],
            start_pos=start,
            block_table=self.block_manager.block_table(seq.seq_id),
            num_logits=num_logits,
            num_draft_tokens=num_drafts,
            samples=reaches_end,
        )

    # ----------------------------------------------------------------- update
    def update(
        self,
        out: SchedulerOutput,
        sampled: Mapping[str, SampledTokens],
        forks: Iterable[tuple[Sequence, Sequence]] = (),
    ) -> StepUpdate:
        """Apply the results of a computed step; the one place state moves forward.

        ``sampled`` maps a sequence id to the tokens it gained (absent: a
        mid-prompt chunk). ``forks`` pairs a parent that just sampled its first
        token with a new sibling (``n > 1``) that sampled from the same logits;
        the sibling shares the parent's prompt blocks (or, with no block free
        for the copy of a partial block, queues to recompute its prompt).

        For each scheduled sequence: the computed count advances by the real
        tokens it computed; its tokens are appended one by one until a stop
        condition (EOS, a stop token id, ``max_tokens``, the model length);
        with drafts, only the accepted ones count as computed (rejected
        positions are overwritten later). Full blocks are registered in the
        prefix cache; with a sliding window, blocks that no query from this
        step's first new token on can see are released; finished sequences are
        freed.
        """
        result = StepUpdate()
        touched: list[Sequence] = []
        step_start: dict[str, int] = {}
        preempted = self._preempted_with_claims
        for item in out.seqs:
            seq = self._seqs.get(item.seq_id)
            if seq is None:
                continue  # aborted (or finished) since it was scheduled
            if preempted and item.seq_id in preempted:
                # Preempted after this step was planned: its K/V is gone, but the token
                # it sampled is still the sequence's next one.
                preempted.discard(item.seq_id)
            else:
                seq.num_computed_tokens += len(item.token_ids) - item.num_draft_tokens
                if seq.inflight_tokens:  # planned ahead: settle the step's claim
                    seq.inflight_tokens -= len(item.token_ids)
                    seq.inflight_samples -= item.samples
            step_start[seq.seq_id] = item.start_pos
            touched.append(seq)
        for parent, child in forks:
            self._fork(parent, child)
            touched.append(child)
        for seq in touched:
            tokens = sampled.get(seq.seq_id)
            if tokens is None:
                continue
            computed = seq.num_computed_tokens
            appended = 0
            for token in tokens.token_ids:
                self._append(seq, token)
                appended += 1
                if seq.finish_reason is not None:
                    break  # whatever followed is discarded
            # Accepted drafts have valid K/V; the target's own token after them not yet.
            seq.num_computed_tokens = computed + min(tokens.num_accepted, appended)
            result.num_appended[seq.seq_id] = appended
        for seq in touched:
            if self.block_manager.has_seq(seq.seq_id):
                registered = self.block_manager.cache_full_blocks(
                    seq.seq_id, seq.token_ids, seq.num_computed_tokens)
                if registered and self.kv_tiers is not None:
                    result.offload.extend(self._offload_entries(seq, registered))
                if self.sliding_window is not None and seq.finish_reason is None:
                    # Later queries sit at >= num_computed_tokens, but a draft model's
                    # catch-up pass still runs this step's tokens (from start_pos on)
                    # before the next schedule: keep every key those can see.
                    first = min(step_start.get(seq.seq_id, seq.num_computed_tokens),
                                seq.num_computed_tokens)
                    self.block_manager.free_blocks_before(
                        seq.seq_id, first - self.sliding_window + 1)
            if seq.finish_reason is not None:
                self.finish(seq)
                result.finished.append(seq)
        return result

    def _offload_entries(self, seq: Sequence, registered: list[tuple[int, int]]
                         ) -> list[tuple[int, bytes, list[int]]]:
        """(block id, content key, token ids) of blocks just registered (index, block id)."""
        assert self.kv_tiers is not None
        bs = self.block_manager.block_size
        keys = self.kv_tiers.block_keys(seq.token_ids, registered[-1][0] + 1,
                                        self._tier_keys.get(seq.seq_id, ()))
        self._tier_keys[seq.seq_id] = keys
        return [(block_id, keys[i], seq.token_ids[i * bs:(i + 1) * bs])
                for i, block_id in registered]

    def _fork(self, parent: Sequence, child: Sequence) -> None:
        """Start ``child`` on ``parent``'s computed blocks (copy-on-write of a partial one)."""
        copies = self.block_manager.fork(parent.seq_id, child.seq_id, parent.num_computed_tokens)
        if copies is None:
            child.num_computed_tokens = 0  # no block for the copy: recompute later
            self.add(child)
            return
        self._pending_copies.extend(copies)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_cached_tokens = parent.num_cached_tokens
        self._add_running(child)

    def _append(self, seq: Sequence, token: int) -> None:
        """Append one token and apply the token-level stop conditions.

        A constrained sequence's grammar advances here too; a grammar that has
        accepted its stop token ends the sequence ("stop") even with ignore_eos.
        """
        params = seq.params
        seq.token_ids.append(token)
        n_out = seq.num_output_tokens
        min_ok = n_out >= params.min_tokens
        grammar = seq.grammar
        if grammar is not None:
            if not grammar.accept(token):
                # The sampler only picks allowed tokens; stop rather than emit garbage.
                logger.error("sequence %s: token %d refused by its grammar; stopping",
                             seq.seq_id, token)
                seq.finish_reason = "stop"
                return
            if grammar.is_terminated:
                seq.finish_reason = "stop"
                return
        if min_ok and not params.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason = "stop"
        elif min_ok and token in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif (params.max_tokens is not None and n_out >= params.max_tokens) or (
                seq.num_tokens >= self.config.max_model_len):
            seq.finish_reason = "length"
