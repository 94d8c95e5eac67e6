"""The issue's targets, checked against one run's results. A target whose figure the run did not
measure (a smaller `--drains` choice, quick mode, statements unavailable) says "not measured":
it is never counted as met. Each row names the arrival order of the drains its figure came from
("ordered", "random", or both for a figure over every drain): random arrival costs the index
several times more per row as it grows, so a figure means little without it."""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bench.harness.stats import ratio
from bench.harness.traffic import RANDOM

REFERENCE_EVENTS = 1_000_000
LIVE = "live"  # a stream at a fixed rate, each event stamped at its send
SMALL_DRAIN = "drain_200k"
LARGE_DRAIN = "drain_5m"


@dataclass(frozen=True)
class Target:
    name: str
    goal: str
    bound: float
    better: Callable[[float, float], bool]  # (value, bound) -> met

    def check(self, value: float | None, arrival: str | None, note: str = "") -> dict[str, Any]:
        if value is None:
            return {"target": self.name, "goal": self.goal, "value": None, "met": None,
                    "status": "not measured", "arrival": None, "note": note}  # fmt: skip
        met = self.better(value, self.bound)
        return {"target": self.name, "goal": self.goal, "value": value, "met": met,
                "status": "met" if met else "not met", "arrival": arrival, "note": note}  # fmt: skip


AT_LEAST, AT_MOST = operator.ge, operator.le
THROUGHPUT = Target("1 worker, 1 M backlog, index caught up (events/s)", ">= 25000", 25_000, AT_LEAST)
THROUGHPUT_STRETCH = Target("1 worker, 1 M backlog, stretch (events/s)", ">= 30000", 30_000, AT_LEAST)
THROUGHPUT_AGGREGATES = Target(
    "1 worker, 1 M backlog, aggregates caught up (events/s)", ">= 25000", 25_000, AT_LEAST
)
VS_COPY = Target("1 worker / COPY ceiling", ">= 0.5", 0.5, AT_LEAST)
VS_PEER = Target("1 worker / faust peer", ">= 4", 4.0, AT_LEAST)
FLAT = Target("5 M drain rate / 200 k drain rate", ">= 0.9 (within 10 %)", 0.9, AT_LEAST)
WORKER_CPU = Target("worker CPU, 1 M drain (µs/event)", "<= 30", 30.0, AT_MOST)
MERGER_CPU = Target("merger CPU, 1 M drain (µs/event)", "<= 5", 5.0, AT_MOST)
FRESHNESS = Target("freshness p99 at half the reference drain's rate (s)", "<= 5", 5.0, AT_MOST)
VISIBLE = Target("aggregates visible after commit, p99 (s)", "<= 10", 10.0, AT_MOST)
RSS = Target("worker peak RSS, every drain (MiB)", "<= 300", 300.0, AT_MOST)


def _dig(data: Mapping[str, Any], *path: str) -> Any:
    value: Any = data
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value


def arrival_of(drain: Mapping[str, Any]) -> str:
    """A drain's arrival order; drains from before the field existed arrived at random."""
    return str(drain.get("arrival", RANDOM))


def _arrivals(drains: list[Mapping[str, Any]]) -> str:
    """One name, or "ordered + random" when the figure spans drains of both."""
    names = sorted({arrival_of(d) for d in drains})
    return " + ".join(names)


def targets(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per target: value, met (True / False / None when not measured), status and the
    arrival order of the drains the value came from."""
    ref = results.get("ingest_1_worker", {})
    is_million = ref.get("events") == REFERENCE_EVENTS and ref.get("workers") == 1
    one_m = ref if is_million else {}
    on_ref = arrival_of(ref)
    size_note = "" if is_million else f"reference drain is {ref.get('events', 0):,} events, not 1 M"
    small, large = results.get(SMALL_DRAIN, {}), results.get(LARGE_DRAIN, {})
    flat = ratio(large.get("events_per_s"), small.get("events_per_s"))
    fifths = large.get("fifths_events_per_s") or []
    flat_note = f"5 M fifths: {', '.join(f'{r:,.0f}' for r in fifths if r)}" if fifths else ""
    rss = _dig(results, "memory", "peak_rss_mib")
    # The memory figure is the largest over every 1-worker drain, whatever its arrival.
    every_drain = [v for k, v in results.items() if k.startswith("drain_") and isinstance(v, Mapping)]
    return [
        THROUGHPUT.check(one_m.get("events_per_s"), on_ref, size_note),
        THROUGHPUT_STRETCH.check(one_m.get("events_per_s"), on_ref, size_note),
        THROUGHPUT_AGGREGATES.check(one_m.get("aggregates_events_per_s"), on_ref, size_note),
        VS_COPY.check(_dig(one_m, "ratio_to", "copy"), on_ref, size_note),
        VS_PEER.check(
            _dig(results, "peer_faust", "ours_over_peer") if is_million else None, on_ref, size_note
        ),
        FLAT.check(flat, _arrivals([small, large]), flat_note),
        WORKER_CPU.check(
            _dig(one_m, "cpu", "index", "processes", "worker", "us_per_event"), on_ref, size_note
        ),
        MERGER_CPU.check(
            _dig(one_m, "cpu", "aggregates", "processes", "merger", "us_per_event"), on_ref, size_note
        ),
        FRESHNESS.check(_dig(results, "freshness", "p99_s"), LIVE),
        VISIBLE.check(_dig(results, "freshness", "aggregates_visible", "p99_s"), LIVE),
        RSS.check(rss, _arrivals(every_drain), _dig(results, "memory", "measured_in") or ""),
    ]
