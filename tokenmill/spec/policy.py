"""Which requests speculate, and how many drafts are worth proposing.

Not speculated (they simply decode one token per step):

- ``n > 1``: siblings fork from the parent's KV blocks after the prompt;
  keeping fork bookkeeping apart from draft rollback keeps both simple;
- ``prompt_logprobs``: those requests want logits at every prompt position
  and bypass the prefix cache;
- repetition / frequency / presence penalties: the penalty of the token at
  draft position ``j`` depends on the drafts before it, so each verification
  row would need its own penalised logits.
"""

from __future__ import annotations

from tokenmill.sampling import SamplingParams


def can_speculate(params: SamplingParams) -> bool:
    """Whether requests with these parameters may get draft tokens."""
    return (
        params.n == 1
        and params.prompt_logprobs is None
        and params.repetition_penalty == 1.0
        and params.frequency_penalty == 0.0
        and params.presence_penalty == 0.0
    )


def max_num_drafts(
    num_speculative_tokens: int,
    num_tokens: int,
    num_output_tokens: int,
    max_tokens: int | None,
    max_model_len: int,
) -> int:
    """Most drafts useful for a sequence of ``num_tokens`` tokens (never negative).

    With ``d`` drafts a step appends up to ``d + 1`` tokens, so ``d`` stops one
    short of ``max_tokens``; draft positions ``num_tokens .. num_tokens + d - 1``
    must lie inside the model's context.
    """
    limit = min(num_speculative_tokens, max_model_len - num_tokens)
    if max_tokens is not None:
        limit = min(limit, max_tokens - num_output_tokens - 1)
    return max(0, limit)
