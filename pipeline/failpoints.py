"""Fail points: kill the process with SIGKILL at a named moment, for crash tests.

Off unless OMNILOG_FAILPOINTS is set (e.g. `after_upload:0.2,after_postgres_commit:0.1`: at each
pass through a point, die with that probability). Random `kill -9` from outside can only hit
these moments by luck; a fail point hits the moment the guarantee is about, every run.
"""

from __future__ import annotations

import os
import random
import signal

_points: dict[str, float] | None = None


def _parse(spec: str) -> dict[str, float]:
    points: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, probability = item.partition(":")
        points[name] = float(probability or 1.0)
    return points


def hit(name: str) -> None:
    """Die here (SIGKILL: no cleanup, no flush) if the fail point is armed and the dice say so."""
    global _points
    if _points is None:
        _points = _parse(os.environ.get("OMNILOG_FAILPOINTS", ""))
    probability = _points.get(name)
    if probability and random.random() < probability:
        os.kill(os.getpid(), signal.SIGKILL)
