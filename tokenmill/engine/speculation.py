"""Engine-side speculative decoding: propose after a step, verify the next step's drafts.

The engine core owns one :class:`Speculator` when speculation is on. Per step:

1. the scheduler appends each sequence's ``spec_token_ids`` to its share
   (``ScheduledSeq.num_draft_tokens`` of them fit) and asks for logits at
   every one of them;
2. :meth:`Speculator.verify` turns those logit rows into the tokens to
   append (accepted drafts + one target token);
3. ``Scheduler.update`` appends them one by one (stop conditions apply to
   each) and rolls ``num_computed_tokens`` back to the accepted prefix;
4. :meth:`Speculator.propose` sets the next drafts of every scheduled
   sequence (and, in draft-model mode, keeps the draft's KV in step). KV slots
   for the draft's own passes come from the scheduler.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass

import torch

from tokenmill.config import SpeculativeConfig
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.sequence import Sequence
from tokenmill.outputs import TokenLogprob
from tokenmill.sampling import Sampler, SamplingBatch, compute_prompt_logprobs
from tokenmill.sampling.sampler import constrained_logits, probability_rows
from tokenmill.spec.draft_model import DraftInput, DraftModelProposer
from tokenmill.spec.ngram import propose_ngram
from tokenmill.spec.policy import can_speculate, max_num_drafts
from tokenmill.spec.verify import accept_greedy, rejection_sample
from tokenmill.step_types import ScheduledSeq


@dataclass
class Verified:
    """What a verification gives one sequence: tokens to append, in order."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None]
    num_accepted: int  # leading drafts among token_ids


class Speculator:
    """Proposes drafts (n-gram or draft model), verifies them, counts acceptances."""

    def __init__(
        self,
        config: SpeculativeConfig,
        scheduler: Scheduler,
        max_model_len: int,
        eos_token_ids: tuple[int, ...],
        default_generator: torch.Generator | None = None,
        draft: DraftModelProposer | None = None,
    ) -> None:
        if config.method == "draft" and draft is None:
            raise ValueError("speculative method 'draft' needs a DraftModelProposer")
        self.config = config
        self.scheduler = scheduler
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.default_generator = default_generator
        self.draft = draft
        self.num_draft_tokens = 0  # drafts verified
        self.num_accepted_tokens = 0  # of which accepted
        self.num_verifications = 0  # sequence-steps that verified at least one draft

    # ----------------------------------------------------------------- verify
    def verify(
        self,
        seqs: list[Sequence],
        num_drafts: list[int],
        logits: list[torch.Tensor],
        sampler: Sampler,
        bitmasks: SequenceOf[tuple[torch.Tensor, list[int]] | None] | None = None,
    ) -> list[Verified]:
        """Verify ``num_drafts[i]`` drafts of ``seqs[i]`` against its ``logits[i]`` rows.

        Row ``j`` of ``logits[i]`` (``num_drafts[i] + 1`` rows) follows the
        sequence extended by its first ``j`` drafts; each row is processed as
        the sampler would (``min_tokens`` counted at that row's length).
        ``bitmasks[i]``, for a sequence with a grammar, is ``(bitmask, rows)``:
        the tokens the grammar allows at each of those rows (drafts it refuses
        get probability 0 and are rejected like any other).
        """
        results: list[Verified | None] = [None] * len(seqs)
        masks = list(bitmasks) if bitmasks is not None else [None] * len(seqs)
        batches = [self._row_batch(s, d, m) for s, d, m in zip(seqs, num_drafts, masks)]
        greedy = [i for i, s in enumerate(seqs) if s.params.is_greedy]
        sampled = [i for i, s in enumerate(seqs) if not s.params.is_greedy]
        if greedy:
            # The sampler itself picks the target's token per row: exactly what a
            # non-speculative step would have picked.
            out = sampler(torch.cat([logits[i] for i in greedy]), _concat([batches[i]
                                                                         for i in greedy]))
            row = 0
            for i in greedy:
                d = num_drafts[i]
                targets = out.token_ids[row : row + d + 1]
                lps = out.logprobs[row : row + d + 1]
                row += d + 1
                tokens = accept_greedy(targets, seqs[i].spec_token_ids[:d])
                results[i] = Verified(tokens, lps[: len(tokens)], len(tokens) - 1)
        if sampled:
            probs = probability_rows(torch.cat([logits[i] for i in sampled]),
                                     _concat([batches[i] for i in sampled]))
            row = 0
            for i in sampled:
                seq, d = seqs[i], num_drafts[i]
                q = seq.spec_probs[:d] if seq.spec_probs is not None else None
                generator = seq.generator if seq.generator is not None else (
                    self.default_generator)
                tokens = rejection_sample(probs[row : row + d + 1], seq.spec_token_ids[:d],
                                          q, generator)
                row += d + 1
                lps: list[TokenLogprob | None] = [None] * len(tokens)
                if seq.params.logprobs is not None:
                    rows_logits = constrained_logits(logits[i].float(), batches[i])
                    lps = list(compute_prompt_logprobs(rows_logits[: len(tokens)], tokens,
                                                       seq.params.logprobs))
                results[i] = Verified(tokens, lps, len(tokens) - 1)
        for d, r in zip(num_drafts, results):
            assert r is not None
            self.num_draft_tokens += d
            self.num_accepted_tokens += r.num_accepted
            self.num_verifications += 1
        return [r for r in results if r is not None]

    def _row_batch(self, seq: Sequence, num_drafts: int,
                   mask: tuple[torch.Tensor, list[int]] | None = None) -> SamplingBatch:
        rows = num_drafts + 1
        prompt, output = seq.prompt_token_ids, seq.output_token_ids
        drafts = seq.spec_token_ids
        return SamplingBatch(
            params=[seq.params] * rows,
            prompt_token_ids=[prompt] * rows,
            output_token_ids=[output + drafts[:j] for j in range(rows)],
            generators=[seq.generator] * rows,
            eos_token_ids=self.eos_token_ids,
            token_bitmask=mask[0] if mask is not None else None,
            bitmask_rows=list(mask[1]) if mask is not None else [],
        )

    # ---------------------------------------------------------------- propose
    def propose(self, work: list[tuple[Sequence, ScheduledSeq]]) -> None:
        """Set the next drafts of the sequences scheduled this step.

        Called after ``Scheduler.update``. Sequences that finished there have
        freed their blocks, but nothing reuses a block before the next
        ``schedule()``: the draft model still writes the KV of what they computed
        into them (``item.block_table``), so a later prefix-cache hit finds the
        draft's cache in step with the target's.
        """
        inputs: list[DraftInput] = []
        for seq, item in work:
            seq.spec_token_ids, seq.spec_probs = [], None  # consumed by this step
            k = self._num_to_propose(seq)
            if self.draft is None:
                if k:
                    seq.spec_token_ids = propose_ngram(
                        seq.token_ids, k, self.config.ngram_prompt_lookup_max,
                        self.config.ngram_prompt_lookup_min,
                    )
                continue
            if k:
                k = self.scheduler.reserve_draft_slots(seq, k)
            # The draft runs over what the target computed, and over the newest
            # token when it proposes (its logits give the first draft).
            end = seq.num_tokens if k else seq.num_computed_tokens
            inputs.append(DraftInput(
                seq_id=seq.seq_id, token_ids=seq.token_ids[item.start_pos : end],
                start_pos=item.start_pos, block_table=item.block_table,
                num_proposals=k, params=seq.params, prompt_token_ids=seq.prompt_token_ids,
                output_token_ids=seq.output_token_ids, generator=seq.generator,
            ))
        if self.draft is None or not inputs:
            return
        proposals = self.draft.propose(inputs)
        seqs = {seq.seq_id: seq for seq, _ in work}
        for seq_id, proposal in proposals.items():
            seqs[seq_id].spec_token_ids = proposal.token_ids
            seqs[seq_id].spec_probs = proposal.probs

    def _num_to_propose(self, seq: Sequence) -> int:
        if (seq.finish_reason is not None or not can_speculate(seq.params)
                or seq.num_computed_tokens != seq.num_tokens - 1):
            return 0
        return max_num_drafts(
            self.config.num_speculative_tokens, seq.num_tokens, seq.num_output_tokens,
            seq.params.max_tokens, self.max_model_len,
        )

    # ----------------------------------------------------------------- stats
    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


def _concat(batches: list[SamplingBatch]) -> SamplingBatch:
    first = batches[0]
    bitmask = None
    bitmask_rows: list[int] = []
    masked = [b for b in batches if b.bitmask_rows]
    if masked:
        assert masked[0].token_bitmask is not None
        width = masked[0].token_bitmask.shape[1]
        parts, offset = [], 0
        for b in batches:
            rows = len(b.params)
            if b.bitmask_rows and b.token_bitmask is not None:
                parts.append(b.token_bitmask[:rows])
                bitmask_rows += [offset + r for r in b.bitmask_rows]
            else:
                parts.append(torch.full((rows, width), -1, dtype=torch.int32))
            offset += rows
        bitmask = torch.cat(parts)
    return SamplingBatch(
        params=[p for b in batches for p in b.params],
        prompt_token_ids=[t for b in batches for t in b.prompt_token_ids],
        output_token_ids=[t for b in batches for t in b.output_token_ids],
        generators=[g for b in batches for g in b.generators],
        eos_token_ids=first.eos_token_ids,
        token_bitmask=bitmask,
        bitmask_rows=bitmask_rows,
    )
