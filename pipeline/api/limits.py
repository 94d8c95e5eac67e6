"""Per-key request rate limit: a token bucket per authenticated key, in this process.

Each replica enforces its own buckets, so N replicas allow up to N times the rate; the limit is
there to stop one key from starving the others on a replica (and the database behind it), not to
bill. Only authenticated keys get a bucket, so the table is bounded by the number of live keys.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate_per_s
        self._burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def acquire(self, key_id: str) -> float:
        """0 when the request may proceed, else the seconds until a token is available."""
        now = self._clock()
        bucket = self._buckets.get(key_id)
        if bucket is None:
            bucket = self._buckets[key_id] = _Bucket(self._burst, now)
        bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.updated) * self._rate)
        bucket.updated = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / self._rate


def retry_after_header(wait_s: float) -> str:
    return str(max(1, math.ceil(wait_s)))
