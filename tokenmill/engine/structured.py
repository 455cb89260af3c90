"""Structured outputs in the engine core: compiled grammars and the per-step bitmask.

The core owns one :class:`StructuredOutputManager` (on rank 0 with tensor
parallelism: sampling happens there). Its jobs:

- on ``add_request``, start compiling the request's grammar (or take it from
  the cache); the request joins the scheduler once it is compiled, so a slow
  compile never stalls the step (other requests keep decoding meanwhile);
- give each sequence its own :class:`~tokenmill.sampling.grammar.SequenceGrammar`
  (``seq.grammar``; ``n > 1`` siblings fork it), which ``Scheduler.update``
  advances token by token as it appends them;
- build the step's bitmask for the rows that sample, and for speculative
  verification the rows after each draft (drafts the grammar refuses are cut).

Preemption needs nothing here: a preempted sequence keeps its tokens (only its
KV is recomputed), so its matcher is already in step with its output.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf
from concurrent.futures import Future
from typing import Any

import torch

from tokenmill.engine.sequence import Sequence
from tokenmill.sampling.grammar import (
    CompileStats,
    GrammarCompiler,
    ReasoningMarkers,
    SequenceGrammar,
    bitmask_width,
)
from tokenmill.sampling.params import StructuredOutputsParams


class StructuredOutputManager:
    """Grammar compilation (cached, in the background) and bitmasks for sampling."""

    def __init__(self, compiler: GrammarCompiler, vocab_size: int,
                 reasoning: ReasoningMarkers | None = None) -> None:
        self.compiler = compiler
        self.vocab_size = vocab_size
        self.reasoning = reasoning
        self._width = bitmask_width(vocab_size)

    @property
    def stats(self) -> CompileStats:
        return self.compiler.stats

    def submit(self, spec: StructuredOutputsParams) -> Future[Any]:
        """Start compiling ``spec`` (a cache hit is done already)."""
        return self.compiler.submit(spec)

    def new_grammar(self, compiled: Any, prompt_token_ids: SequenceOf[int]) -> SequenceGrammar:
        """A matcher for a sequence that starts after ``prompt_token_ids``."""
        return SequenceGrammar.create(compiled, prompt_token_ids, self.reasoning)

    def sampling_bitmask(self, seqs: SequenceOf[Sequence]) -> tuple[torch.Tensor | None, list[int]]:
        """The bitmask of a step's sampled rows (one per sequence) and the constrained rows."""
        rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
        if not rows:
            return None, []
        bitmask = torch.empty((len(seqs), self._width), dtype=torch.int32)
        constrained = [i for i in rows if seqs[i].grammar.fill_bitmask(bitmask, i)]
        return (bitmask if constrained else None), constrained

    def draft_bitmask(self, seq: Sequence, drafts: SequenceOf[int]
                      ) -> tuple[int, torch.Tensor | None, list[int]]:
        """Verification rows for ``drafts``: ``(valid drafts, bitmask, constrained rows)``.

        The bitmask has one row per draft kept plus one (the bonus row); drafts
        from the first one the grammar refuses on are dropped.
        """
        grammar = seq.grammar
        assert grammar is not None
        bitmask = torch.empty((len(drafts) + 1, self._width), dtype=torch.int32)
        valid, constrained = grammar.fill_draft_bitmasks(drafts, bitmask, 0)
        rows = [j for j, c in enumerate(constrained) if c]
        return valid, (bitmask[: valid + 1] if rows else None), rows

    def shutdown(self) -> None:
        self.compiler.shutdown()
