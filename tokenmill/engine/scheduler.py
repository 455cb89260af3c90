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
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from tokenmill.config import SchedulerConfig
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    """One sequence's share of a step, in plain data for the model runner."""

    seq_id: str
    token_ids: list[int]  # the tokens to compute this step
    start_pos: int  # position of token_ids[0] (= tokens already computed)
    block_table: list[int]
    num_logits: int  # trailing positions of this chunk whose logits are needed
    num_draft_tokens: int = 0  # trailing token_ids that are speculative proposals


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq]
    num_batched_tokens: int
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    """Decides, step by step, which sequences compute how many tokens."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: list[Sequence] = []  # sorted by sort_key
        self.running: list[Sequence] = []  # sorted by sort_key: last = first victim
        self._keys_waiting: list[tuple] = []
        self._keys_running: list[tuple] = []
        self._pending_copies: list[tuple[int, int]] = []
        self.num_preemptions = 0

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

    def _add_running(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.RUNNING
        key = self._key(seq)
        i = bisect.bisect(self._keys_running, key)
        self._keys_running.insert(i, key)
        self.running.insert(i, seq)

    def _remove(self, seq: Sequence) -> bool:
        for queue, keys in ((self.running, self._keys_running), (self.waiting, self._keys_waiting)):
            for i, s in enumerate(queue):
                if s is seq:
                    del queue[i]
                    del keys[i]
                    return True
        return False

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -------------------------------------------------------------- lifecycle
    def add_forked(self, parent: Sequence, child: Sequence) -> bool:
        """Start ``child`` sharing ``parent``'s computed KV blocks (n > 1 sampling)."""
        copies = self.block_manager.fork(parent.seq_id, child.seq_id, parent.num_computed_tokens)
        if copies is None:
            return False
        self._pending_copies.extend(copies)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_cached_tokens = parent.num_cached_tokens
        self._add_running(child)
        return True

    def finish(self, seq: Sequence) -> None:
        """Remove a finished sequence and free its blocks."""
        self.abort(seq)

    def _preempt(self, seq: Sequence) -> None:
        self._remove(seq)
        self.block_manager.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.spec_token_ids, seq.spec_probs = [], None  # proposed for the old state
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)

    # --------------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        """Build the next step's batch."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[str] = []
        bm = self.block_manager

        # 1) Running sequences, highest priority first.
        planned: list[tuple[Sequence, int]] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if num_new <= 0:
                i += 1
                continue
            while bm.append_slots(seq.seq_id, seq.num_computed_tokens + num_new) is None:
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.seq_id)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # seq preempted itself: nothing lower-priority was left
            planned.append((seq, num_new))
            budget -= num_new
            i += 1

        # 1b) Draft tokens of running sequences, from what the real tokens left.
        for seq, num_new in planned:
            num_drafts = self._fit_drafts(seq, num_new, budget)
            scheduled.append(self._scheduled(seq, num_new, num_drafts))
            budget -= num_drafts

        # 2) Waiting sequences, in queue order; stop at the first that does not
        # fit so that nothing behind it can overtake it (no starvation).
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
            remaining = seq.num_tokens - num_cached
            num_new = min(remaining, budget)
            if num_new < remaining and not self.config.enable_chunked_prefill:
                break
            if bm.allocate(seq.seq_id, num_cached + num_new, cached) is None:
                break
            if seq.num_preemptions == 0:
                bm.record_prefix_query(seq.num_prompt_tokens, num_cached)
                seq.num_cached_tokens = num_cached
            seq.num_computed_tokens = num_cached
            del self.waiting[0]
            del self._keys_waiting[0]
            self._add_running(seq)
            scheduled.append(self._scheduled(seq, num_new))
            budget -= num_new

        copies, self._pending_copies = self._pending_copies, []
        return SchedulerOutput(
            seqs=scheduled,
            num_batched_tokens=self.config.max_num_batched_tokens - budget,
            block_copies=copies,
            preempted_ids=preempted,
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

    def _scheduled(self, seq: Sequence, num_new: int, num_drafts: int = 0) -> ScheduledSeq:
        start = seq.num_computed_tokens
        end = start + num_new
        reaches_end = end == seq.num_tokens
        num_logits = 1 + num_drafts if reaches_end else 0
        prompt_logprobs = getattr(seq.params, "prompt_logprobs", None)
        if prompt_logprobs is not None and seq.num_output_tokens == 0 and seq.index == 0:
            # Every prompt position predicts the next prompt token.
            num_logits = num_new
        return ScheduledSeq(
            seq_id=seq.seq_id,
            token_ids=seq.token_ids[start:end] + seq.spec_token_ids[:num_drafts],
            start_pos=start,
            block_table=self.block_manager.block_table(seq.seq_id),
            num_logits=num_logits,
            num_draft_tokens=num_drafts,
        )

    def abort(self, seq: Sequence) -> bool:
        """Drop a sequence wherever it is and free its blocks."""
        found = self._remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.block_manager.free(seq.seq_id)
        return found
