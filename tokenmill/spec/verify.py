"""Verifying draft tokens against the target model's distributions.

Row ``j`` of the target's output (``j = 0..d``) is its distribution for the
token after the sequence extended by drafts ``0..j-1``.

- Greedy: accept drafts while they equal the target's own choice; at the
  first mismatch (or after all ``d``), the target's choice is appended. The
  result is the target's greedy output, token for token.
- Sampled: rejection sampling keeps the output distributed exactly as the
  target's. Draft ``x`` drawn from the proposal ``q`` is accepted with
  probability ``min(1, p(x) / q(x))``; on rejection the replacement is drawn
  from ``max(0, p - q)`` renormalised; if every draft survives, one more token
  is drawn from the last row. A deterministic proposer (n-gram lookup) has a
  one-hot ``q``: accept with ``p(x)``, else draw from ``p`` without ``x``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def accept_greedy(target_ids: Sequence[int], draft_ids: Sequence[int]) -> list[int]:
    """Tokens to append: the drafts that match ``target_ids``, then the target's next.

    ``target_ids`` has ``len(draft_ids) + 1`` entries (the target's argmax
    per row). The result always ends with a target token; its length minus
    one is the number of accepted drafts.
    """
    if len(target_ids) != len(draft_ids) + 1:
        raise ValueError(f"need {len(draft_ids) + 1} target tokens, got {len(target_ids)}")
    out: list[int] = []
    for target, draft in zip(target_ids, draft_ids):
        out.append(int(target))
        if target != draft:
            return out
    out.append(int(target_ids[-1]))
    return out


def rejection_sample(
    target_probs: torch.Tensor,
    draft_ids: Sequence[int],
    draft_probs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Tokens to append after verifying ``draft_ids`` by rejection sampling.

    ``target_probs`` ``[d + 1, V]``: the target's processed distributions
    (after temperature and filters); ``draft_probs`` ``[d, V]``: the proposal
    distributions the drafts were drawn from, or None for a deterministic
    proposer (one-hot ``q``). Draws ``d`` uniforms and one categorical sample
    from ``generator``; the result has ``accepted + 1`` tokens.
    """
    num_drafts = len(draft_ids)
    if target_probs.dim() != 2 or target_probs.shape[0] != num_drafts + 1:
        raise ValueError(
            f"target_probs must be [{num_drafts + 1}, V], got {tuple(target_probs.shape)}"
        )
    device = target_probs.device
    out: list[int] = []
    if num_drafts:
        drafts = torch.tensor(list(draft_ids), dtype=torch.long, device=device)
        rows = torch.arange(num_drafts, device=device)
        p_x = target_probs[rows, drafts]
        if draft_probs is None:
            q_x = torch.ones_like(p_x)
        else:
            q_x = draft_probs[rows, drafts].to(p_x.dtype)
        u = torch.rand(num_drafts, generator=generator, device=device, dtype=p_x.dtype)
        # u < p/q without dividing; a draft its own proposal gave q(x) = 0 is rejected.
        accepted = ((u * q_x < p_x) & (q_x > 0)).tolist()
        for j, ok in enumerate(accepted):
            if not ok:
                p = target_probs[j]
                if draft_probs is None:
                    residual = p.clone()
                    residual[int(draft_ids[j])] = 0.0
                else:
                    residual = (p - draft_probs[j].to(p.dtype)).clamp_(min=0.0)
                if not float(residual.sum()) > 0.0:
                    residual = p  # p == q up to rounding: rejection had probability ~0
                out.append(_draw(residual, generator))
                return out
            out.append(int(draft_ids[j]))
    out.append(_draw(target_probs[num_drafts], generator))
    return out


def _draw(weights: torch.Tensor, generator: torch.Generator | None) -> int:
    """One index drawn with probability proportional to ``weights`` (need not sum to 1)."""
    return int(torch.multinomial(weights, 1, generator=generator).item())
