"""When requests arrive: Poisson (or burstier/smoother gamma) arrival processes.

Intervals between arrivals are gamma-distributed with shape ``burstiness`` and mean
``1 / rate``. Burstiness 1 is the exponential distribution, i.e. a Poisson process;
below 1 the arrivals clump together (coefficient of variation ``1 / sqrt(burstiness)``
above 1), above 1 they spread out towards a fixed interval.
"""

from __future__ import annotations

import math

import numpy as np


def arrival_intervals(num: int, rate: float, burstiness: float,
                      rng: np.random.Generator) -> np.ndarray:
    """``num`` gaps (seconds) between consecutive arrivals; all zero when ``rate`` is inf."""
    if num < 0:
        raise ValueError("num must be non-negative")
    if not rate > 0:
        raise ValueError(f"request rate must be positive or inf, got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be positive, got {burstiness}")
    if math.isinf(rate):
        return np.zeros(num)
    scale = 1.0 / (rate * burstiness)  # mean = shape * scale = 1 / rate
    return rng.gamma(shape=burstiness, scale=scale, size=num)


def arrival_offsets(num: int, rate: float, burstiness: float,
                    rng: np.random.Generator) -> np.ndarray:
    """Send times (seconds after the start) of ``num`` requests; the first is at 0."""
    gaps = arrival_intervals(num, rate, burstiness, rng)
    if num == 0:
        return gaps
    return np.concatenate(([0.0], np.cumsum(gaps[:-1])))
