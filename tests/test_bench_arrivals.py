"""Arrival processes of the serving benchmark: Poisson and gamma statistics, seeded."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tokenmill.bench.arrivals import arrival_intervals, arrival_offsets


def cv(x: np.ndarray) -> float:
    return float(x.std() / x.mean())


def test_poisson_mean_and_cv():
    gaps = arrival_intervals(20_000, rate=4.0, burstiness=1.0, rng=np.random.default_rng(0))
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert cv(gaps) == pytest.approx(1.0, rel=0.05)  # exponential gaps: CV = 1


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_burstiness_changes_cv_not_mean(burstiness):
    gaps = arrival_intervals(20_000, rate=10.0, burstiness=burstiness,
                             rng=np.random.default_rng(1))
    assert gaps.mean() == pytest.approx(0.1, rel=0.05)
    assert cv(gaps) == pytest.approx(1 / math.sqrt(burstiness), rel=0.07)


def test_same_seed_same_arrivals():
    a = arrival_offsets(50, 2.0, 1.0, np.random.default_rng(7))
    b = arrival_offsets(50, 2.0, 1.0, np.random.default_rng(7))
    c = arrival_offsets(50, 2.0, 1.0, np.random.default_rng(8))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_offsets_start_at_zero_and_increase():
    offsets = arrival_offsets(100, 5.0, 1.0, np.random.default_rng(3))
    assert offsets[0] == 0.0 and np.all(np.diff(offsets) >= 0)
    assert len(arrival_offsets(0, 5.0, 1.0, np.random.default_rng(3))) == 0


def test_infinite_rate_sends_everything_at_once():
    assert np.array_equal(arrival_offsets(5, math.inf, 1.0, np.random.default_rng(0)),
                          np.zeros(5))


@pytest.mark.parametrize("rate,burstiness", [(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0)])
def test_rejects_bad_parameters(rate, burstiness):
    with pytest.raises(ValueError):
        arrival_intervals(3, rate, burstiness, np.random.default_rng(0))
