"""Per-key token buckets, key parsing and hashing, and the time-range rules of the API."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from pipeline.api.app import time_range
from pipeline.api.limits import RateLimiter, retry_after_header
from pipeline.api.problems import ApiProblem
from sinks.api_keys import generate_key, hash_key, key_prefix


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_the_burst_then_the_rate_per_key() -> None:
    clock = Clock()
    limiter = RateLimiter(rate_per_s=2, burst=3, clock=clock)
    assert [limiter.acquire("a") for _ in range(3)] == [0, 0, 0]
    wait = limiter.acquire("a")
    assert wait == pytest.approx(0.5)
    assert retry_after_header(wait) == "1"
    assert limiter.acquire("b") == 0, "another key has its own bucket"
    clock.now += 0.5
    assert limiter.acquire("a") == 0
    assert limiter.acquire("a") > 0
    clock.now += 60
    assert [limiter.acquire("a") for _ in range(3)] == [0, 0, 0], "refills up to the burst only"
    assert limiter.acquire("a") > 0


def test_keys_are_random_prefixed_and_parsed_strictly() -> None:
    prefix, key = generate_key()
    other_prefix, other = generate_key()
    assert key_prefix(key) == prefix and prefix != other_prefix and key != other
    assert len(hash_key(key)) == 32 and hash_key(key) != hash_key(other)
    for hostile in (
        "",
        "omk_",
        key + "x",
        key[:-1],
        key.upper(),
        "omk_" + "0" * 12 + "_" + "\x00" * 43,
        "omk_0123456789ab_" + "é" * 43,
        key.replace("omk_", "OMK_"),
        "x" * 100_000,
    ):
        assert key_prefix(hostile) is None, hostile[:40]


def test_time_range_defaults_bounds_and_refusals() -> None:
    start, end = time_range(None, None, max_days=31)
    assert end - start == timedelta(hours=24) and end.tzinfo is not None
    naive = datetime(2026, 1, 2, 3, 4, 5)
    start, end = time_range(naive, naive + timedelta(days=31), max_days=31)
    assert start == naive.replace(tzinfo=UTC)
    with pytest.raises(ApiProblem) as too_long:
        time_range(naive, naive + timedelta(days=31, seconds=1), max_days=31)
    assert too_long.value.status == 400
    with pytest.raises(ApiProblem):
        time_range(naive + timedelta(seconds=1), naive, max_days=31)
    far = datetime(9999, 12, 31, 23, 0, tzinfo=timezone(-timedelta(hours=23)))
    with pytest.raises(ApiProblem) as overflow:
        time_range(None, far, max_days=31)
    assert overflow.value.slug == "invalid-time"
    start, end = time_range(None, datetime(1, 1, 1, 12, tzinfo=UTC), max_days=31)
    assert start == datetime.min.replace(tzinfo=UTC)
