"""N-gram prompt lookup: propose what followed the latest n-gram the last time it occurred.

Extractive workloads (summaries, code edits, "repeat this passage") copy long
runs of their own context. Looking the sequence's final ``n`` tokens up in its
own prompt + output and proposing the tokens that followed their most recent
earlier occurrence costs no model at all and is often right for several tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def propose_ngram(token_ids: Sequence[int], k: int, n_max: int, n_min: int = 1) -> list[int]:
    """Up to ``k`` draft tokens continuing ``token_ids``, or ``[]`` when nothing matches.

    For ``n`` from ``n_max`` down to ``n_min``, the suffix ``token_ids[-n:]``
    is searched among the earlier windows of the sequence (each must have at
    least one token after it); the longest ``n`` that matches wins, and of its
    occurrences the most recent one. The proposal is the (at most ``k``)
    tokens that followed it, so it may be shorter near the end of the sequence.
    """
    num_tokens = len(token_ids)
    if k <= 0 or num_tokens < 2:
        return []
    tokens = np.asarray(token_ids, dtype=np.int64)
    # Windows of tokens[:-1] start at 0..num_tokens-n-1: each has a follower, and
    # the suffix itself (start num_tokens-n) is excluded.
    head = tokens[:-1]
    for n in range(min(n_max, num_tokens - 1), n_min - 1, -1):
        windows = sliding_window_view(head, n)
        matches = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
        if matches.size:
            start = int(matches[-1]) + n
            return tokens[start : start + k].tolist()
    return []
