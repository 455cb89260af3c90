"""Speculative decoding: propose draft tokens cheaply, verify them in one target pass.

Drafts are just more tokens for the one-rule scheduler: a sequence with ``k``
drafts gets ``1 + k`` tokens scheduled and logits at each of them; the engine
then keeps the longest verified prefix plus one token of the target's own.

- :mod:`~tokenmill.spec.ngram`: n-gram prompt lookup (no model);
- :mod:`~tokenmill.spec.draft_model`: a smaller draft model sharing the
  target's block tables;
- :mod:`~tokenmill.spec.verify`: greedy acceptance and distribution-preserving
  rejection sampling;
- :mod:`~tokenmill.spec.policy`: which requests speculate and how far;
- the engine-side glue (propose after a step, verify the next step's drafts,
  count acceptances) is :mod:`tokenmill.engine.speculation`.
"""

from tokenmill.spec.ngram import propose_ngram
from tokenmill.spec.policy import can_speculate, max_num_drafts
from tokenmill.spec.verify import accept_greedy, rejection_sample

__all__ = ["accept_greedy", "can_speculate", "max_num_drafts", "propose_ngram",
           "rejection_sample"]
