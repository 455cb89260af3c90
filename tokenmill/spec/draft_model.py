"""A draft model that proposes tokens for the target, sharing its paged-KV layout.

The draft has its own KV tensor with the *same* number of blocks and block
size as the target's, so the target's block tables and slot mappings address
it too: no second block manager, and prefix-cache hits, forks and preemption
apply to both caches at once (the engine's executor applies every block copy
to both). For that to hold, the draft runs over every
token the target computes (prefill chunks included), in the same step.

After a step, for each scheduled sequence :meth:`DraftModelProposer.propose`
runs one draft pass over the tokens the target computed (plus, for a
sequence that will speculate, its newest token, whose logits give the first
draft), then ``k - 1`` one-token passes. Greedy requests take the draft's
argmax; sampled requests draw from the draft's processed distribution ``q``
(same temperature and filters as the request), which is kept for rejection
sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tokenmill.attention.base import AttentionBackend
from tokenmill.config import ModelConfig
from tokenmill.runner.kv_cache import allocate_kv_cache, bytes_per_block
from tokenmill.runner.model_runner import ModelRunner
from tokenmill.sampling import SamplingBatch, SamplingParams
from tokenmill.sampling.sampler import probability_rows
from tokenmill.step_types import ScheduledSeq, SchedulerOutput

if TYPE_CHECKING:
    from tokenmill.model.loader import LoadedModel


@dataclass
class DraftInput:
    """One sequence's draft work after a step, in plain data.

    ``token_ids`` start at position ``start_pos``: the tokens the target
    computed this step and, when ``num_proposals > 0``, the newest token.
    """

    seq_id: str
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    num_proposals: int
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None


@dataclass
class DraftProposal:
    token_ids: list[int]
    probs: torch.Tensor | None  # [len, V] proposal distributions; None for greedy requests


class DraftModelProposer:
    """Runs the draft model through a :class:`ModelRunner` of its own."""

    def __init__(
        self,
        runner: ModelRunner,
        eos_token_ids: tuple[int, ...] = (),
        default_generator: torch.Generator | None = None,
    ) -> None:
        self.runner = runner
        self.eos_token_ids = eos_token_ids
        self.default_generator = default_generator

    @torch.inference_mode()
    def propose(self, inputs: list[DraftInput]) -> dict[str, DraftProposal]:
        """Catch the draft's KV up with the target's, then propose; keyed by seq id."""
        items = [
            ScheduledSeq(seq_id=i.seq_id, token_ids=i.token_ids, start_pos=i.start_pos,
                         block_table=i.block_table, num_logits=1 if i.num_proposals else 0)
            for i in inputs
            if i.token_ids
        ]
        if not items:
            return {}
        logits = self._run(items)
        active = [i for i in inputs if i.num_proposals and i.token_ids]
        drafts: dict[str, list[int]] = {i.seq_id: [] for i in active}
        probs: dict[str, list[torch.Tensor]] = {i.seq_id: [] for i in active}
        while active:
            tokens, rows = self._sample(logits, active, drafts)
            for i, token, row in zip(active, tokens, rows):
                drafts[i.seq_id].append(token)
                if row is not None:
                    probs[i.seq_id].append(row)
            active = [i for i in active if len(drafts[i.seq_id]) < i.num_proposals]
            if not active:
                break
            # Feed each new draft at its position to get the next one.
            logits = self._run([
                ScheduledSeq(
                    seq_id=i.seq_id, token_ids=[drafts[i.seq_id][-1]],
                    start_pos=i.start_pos + len(i.token_ids) + len(drafts[i.seq_id]) - 1,
                    block_table=i.block_table, num_logits=1,
                )
                for i in active
            ])
        return {
            seq_id: DraftProposal(
                token_ids=toks,
                probs=torch.stack(probs[seq_id]) if probs[seq_id] else None,
            )
            for seq_id, toks in drafts.items()
        }

    def _run(self, items: list[ScheduledSeq]) -> torch.Tensor:
        out = SchedulerOutput(seqs=items, num_batched_tokens=sum(len(s.token_ids) for s in items))
        return self.runner.execute(out).logits

    def _sample(
        self, logits: torch.Tensor, active: list[DraftInput], drafts: dict[str, list[int]]
    ) -> tuple[list[int], list[torch.Tensor | None]]:
        """One draft token per active sequence, and its ``q`` row when the request samples."""
        batch = SamplingBatch(
            params=[i.params for i in active],
            prompt_token_ids=[i.prompt_token_ids for i in active],
            output_token_ids=[i.output_token_ids + drafts[i.seq_id] for i in active],
            generators=[i.generator for i in active],
            eos_token_ids=self.eos_token_ids,
        )
        q = probability_rows(logits, batch)
        tokens = q.argmax(dim=-1).tolist()
        rows: list[torch.Tensor | None] = [None] * len(active)
        for r, i in enumerate(active):
            if i.params.is_greedy:
                continue
            generator = i.generator if i.generator is not None else self.default_generator
            tokens[r] = int(torch.multinomial(q[r], 1, generator=generator).item())
            rows[r] = q[r]
        return tokens, rows


def load_draft_model(
    path: str,
    target: ModelConfig,
    max_model_len: int,
    dtype: torch.dtype,
    device: torch.device,
    attn_backend: AttentionBackend,
    load_format: str = "auto",
    quantization: str | None = None,
) -> LoadedModel:
    """Load the draft model like the target (same dtype and device) and check it fits.

    Draft and target must share the vocabulary: drafts are target token ids.
    ``load_format`` "dummy" gives random weights (benchmarks on dummy targets);
    ``quantization`` may differ from the target's (an int4 copy of the target
    itself is a cheap, well-matched draft).
    """
    from tokenmill.model.loader import load_model, resolve_model

    loaded = load_model(resolve_model(path, load_format), dtype=dtype, device=str(device),
                        attn_backend=attn_backend, quantization=quantization,
                        max_model_len=max_model_len)
    if loaded.config.vocab_size != target.vocab_size:
        raise ValueError(
            f"the speculative model {path!r} has a vocabulary of {loaded.config.vocab_size} "
            f"tokens but the target has {target.vocab_size}: draft and target must share "
            "the same tokenizer and vocabulary"
        )
    if loaded.config.max_position_embeddings < max_model_len:
        raise ValueError(
            f"the speculative model {path!r} supports {loaded.config.max_position_embeddings} "
            f"positions, fewer than max_model_len {max_model_len}"
        )
    return loaded


def split_kv_blocks(
    num_blocks: int, target: ModelConfig, draft: ModelConfig, block_size: int,
    dtype: torch.dtype,
    kv_cache_dtype: str = "auto",
) -> int:
    """Blocks per cache when one KV budget (sized for ``num_blocks`` target blocks)
    must hold the target's and the draft's caches, block for block."""
    target_bytes = bytes_per_block(target, block_size, dtype, kv_cache_dtype=kv_cache_dtype)
    draft_bytes = bytes_per_block(draft, block_size, dtype, kv_cache_dtype=kv_cache_dtype)
    return max(1, num_blocks * target_bytes // (target_bytes + draft_bytes))


def build_draft_proposer(
    loaded: LoadedModel,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    attn_backend: AttentionBackend,
    eos_token_ids: tuple[int, ...] = (),
    default_generator: torch.Generator | None = None,
    kv_cache_dtype: str = "auto",
) -> DraftModelProposer:
    """The draft's own KV tensor (same block count and size as the target's, same
    ``kv_cache_dtype``) and runner."""
    kv = allocate_kv_cache(loaded.config, num_blocks, block_size, dtype, device,
                           kv_cache_dtype=kv_cache_dtype)
    runner = ModelRunner(loaded.model, kv, block_size, attn_backend=attn_backend)
    return DraftModelProposer(runner, eos_token_ids, default_generator)
