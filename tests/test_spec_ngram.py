"""N-gram prompt lookup: exact proposals on hand-built token lists."""

from __future__ import annotations

from tokenmill.spec.ngram import propose_ngram


def test_longest_suffix_wins_over_more_recent_shorter_match():
    # Suffix [1, 2, 3] occurred at 0 (followed by 4, 5); the 1-gram [3] also
    # occurs more recently at 6 (followed by 9), but the longer match wins.
    tokens = [1, 2, 3, 4, 5, 7, 3, 9, 1, 2, 3]
    assert propose_ngram(tokens, k=2, n_max=3) == [4, 5]
    assert propose_ngram(tokens, k=4, n_max=3) == [4, 5, 7, 3]
    # Limited to 1-grams, the most recent earlier [3] (at 6) is used.
    assert propose_ngram(tokens, k=2, n_max=1) == [9, 1]


def test_most_recent_occurrence_of_the_ngram_is_used():
    tokens = [5, 6, 10, 5, 6, 20, 21, 5, 6]
    assert propose_ngram(tokens, k=3, n_max=2) == [20, 21, 5]


def test_proposal_is_cut_at_the_end_of_the_sequence():
    # Repeating pattern: the latest earlier [1, 2] starts at 2, followed only by [1, 2].
    tokens = [1, 2, 1, 2, 1, 2]
    assert propose_ngram(tokens, k=5, n_max=2) == [1, 2]
    assert propose_ngram(tokens, k=1, n_max=2) == [1]


def test_no_match_below_n_min_gives_nothing():
    tokens = [1, 2, 3, 4, 9, 3, 4]  # [3, 4] matches; [4] too
    assert propose_ngram(tokens, k=2, n_max=4, n_min=2) == [9, 3]
    assert propose_ngram([1, 2, 3, 4, 5], k=3, n_max=3, n_min=1) == []
    assert propose_ngram([1, 2, 3, 4, 9, 1, 4], k=2, n_max=3, n_min=2) == []
    assert propose_ngram([1, 2, 3, 4, 9, 1, 4], k=2, n_max=3, n_min=1) == [9, 1]


def test_degenerate_inputs():
    assert propose_ngram([], k=3, n_max=3) == []
    assert propose_ngram([7], k=3, n_max=3) == []
    assert propose_ngram([7, 7], k=3, n_max=3) == [7]  # [7] at 0 is followed by 7
    assert propose_ngram([1, 2, 1], k=0, n_max=3) == []
    # n_max longer than the sequence is clipped.
    assert propose_ngram([4, 4, 4], k=2, n_max=10) == [4]
