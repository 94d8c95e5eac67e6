"""Pure arithmetic over what a drain sampled: percentiles, the rate over each fifth of a drain,
and how long the rollups lag behind the index."""

from __future__ import annotations

import math
from collections.abc import Sequence

# (seconds since the drain's start, a count that only grows: events committed, or rolled up)
Progress = Sequence[tuple[float, int]]


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = q * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def time_reaching(progress: Progress, count: float) -> float | None:
    """When the count reached `count`, interpolated linearly between the two samples around it
    (the first sample at or above it when the one before is unknown); None if it never did."""
    before_t, before_n = 0.0, 0
    for t, n in progress:
        if n >= count:
            if n == before_n:
                return t
            share = (count - before_n) / (n - before_n)
            return before_t + (t - before_t) * max(0.0, min(1.0, share))
        before_t, before_n = t, n
    return None


def count_at(progress: Progress, at: float) -> float:
    """The count at time `at`, interpolated linearly between the samples around it."""
    before_t, before_n = 0.0, 0
    for t, n in progress:
        if t >= at:
            if t == before_t:
                return float(n)
            return before_n + (n - before_n) * (at - before_t) / (t - before_t)
        before_t, before_n = t, n
    return float(before_n)


def fifth_rates(progress: Progress, total: int, parts: int = 5) -> list[float | None]:
    """Events/s over each fifth of the backlog (by events, not by time): the first 20 % of the
    events, the next 20 %, ... A rate that falls from fifth to fifth means the cost per event grows
    with the data already stored. `progress` starts at the drain's start (t=0, n=0)."""
    bounds = [total * i / parts for i in range(parts + 1)]
    times = [0.0] + [time_reaching(progress, b) for b in bounds[1:]]
    rates: list[float | None] = []
    for i in range(parts):
        t0, t1 = times[i], times[i + 1]
        if t0 is None or t1 is None or t1 <= t0:
            rates.append(None)
        else:
            rates.append(round((bounds[i + 1] - bounds[i]) / (t1 - t0), 1))
    return rates


def visibility_lags(index: Progress, rollups: Progress) -> list[float]:
    """For each count the index reached (each sample where it grew), how long until the rollups
    counted as many events: rollups' time reaching it minus the index's. Counts the rollups never
    reached in the samples are left out (the caller samples until they caught up)."""
    lags = []
    previous = 0
    for t, n in index:
        if n <= previous:
            continue
        previous = n
        reached = next((tr for tr, nr in rollups if nr >= n), None)
        if reached is not None:
            lags.append(max(reached - t, 0.0))
    return lags


def ratio(numerator: float | None, denominator: float | None, digits: int = 3) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, digits)
