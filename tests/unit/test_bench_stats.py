"""Arithmetic of the bench harness: percentiles, rates per fifth, rollup lag, drain sizes, and the
per-statement summary."""

from __future__ import annotations

import pytest

from bench.harness import statements
from bench.harness.runner import Plan, drain_key, parse_sizes
from bench.harness.stats import count_at, fifth_rates, percentile, ratio, time_reaching, visibility_lags


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.99) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    values = [float(v) for v in range(101)]
    assert percentile(values, 0.99) == pytest.approx(99.0)
    assert percentile(values, 0.0) == 0.0 and percentile(values, 1.0) == 100.0


def test_time_reaching_interpolates_and_misses() -> None:
    progress = [(0.0, 0), (1.0, 100), (3.0, 300)]
    assert time_reaching(progress, 50) == pytest.approx(0.5)
    assert time_reaching(progress, 200) == pytest.approx(2.0)
    assert time_reaching(progress, 300) == pytest.approx(3.0)
    assert time_reaching(progress, 301) is None


def test_count_at_interpolates_between_samples() -> None:
    progress = [(0.0, 0), (2.0, 100), (4.0, 500)]
    assert count_at(progress, 1.0) == pytest.approx(50.0)
    assert count_at(progress, 3.0) == pytest.approx(300.0)
    assert count_at(progress, 2.0) == pytest.approx(100.0)
    assert count_at(progress, 9.0) == 500.0  # after the last sample: the last count


def test_fifth_rates_by_events_show_a_slowing_drain() -> None:
    # 1000 events: the first half at 100/s (5 s), the second half at 50/s (10 s)
    progress = [(0.0, 0), (5.0, 500), (15.0, 1000)]
    assert fifth_rates(progress, 1000) == [100.0, 100.0, pytest.approx(66.7, abs=0.1), 50.0, 50.0]


def test_fifth_rates_of_an_unfinished_drain() -> None:
    assert fifth_rates([(0.0, 0), (2.0, 400)], 1000) == [200.0, 200.0, None, None, None]


def test_visibility_lags_per_index_step() -> None:
    index = [(0.0, 0), (0.5, 100), (1.0, 100), (1.5, 250), (2.0, 300)]
    rollups = [(0.0, 0), (0.5, 0), (1.0, 0), (3.0, 250), (4.5, 300)]
    # 100 committed at 0.5 s, counted at 3.0 s; 250 at 1.5 -> 3.0; 300 at 2.0 -> 4.5
    assert visibility_lags(index, rollups) == [2.5, 1.5, 2.5]
    # counts the rollups never reached are left out, not invented
    assert visibility_lags([(0.0, 0), (1.0, 10)], [(0.0, 0), (2.0, 5)]) == []


def test_ratio() -> None:
    assert ratio(9.0, 10.0) == 0.9
    assert ratio(None, 10.0) is None and ratio(1.0, 0.0) is None and ratio(1.0, None) is None


def test_drain_sizes() -> None:
    assert parse_sizes("1m, 200000,5M,200k") == (200_000, 1_000_000, 5_000_000)
    for bad in ("", "abc", "0", "-5", "1.5m"):
        with pytest.raises(ValueError):
            parse_sizes(bad)
    assert [drain_key(n) for n in (30_000, 200_000, 1_000_000, 5_000_000, 1234)] == [
        "drain_30k", "drain_200k", "drain_1m", "drain_5m", "drain_1234",
    ]  # fmt: skip
    plan = Plan.full().with_drains((5_000_000, 200_000))
    assert plan.drains == (200_000, 5_000_000)
    assert plan.reference_drain == 5_000_000  # no 1 M drain chosen: the largest
    assert Plan.full().reference_drain == 1_000_000
    assert Plan.quick().reference_drain == 30_000


def _row(query: str, calls: int, rows: int, ms: float) -> dict[str, object]:
    return {"query": query, "calls": calls, "rows": rows, "total_ms": ms, "io_ms": 0.0}


def test_statement_summary_orders_by_time_and_divides_per_row_and_event() -> None:
    rows = [
        _row("INSERT INTO log_index SELECT *\n   FROM stage", 10, 200_000, 4000.0),
        _row(
            f"{statements.HARNESS_TAG} SELECT coalesce(sum(next_offset), 0) FROM ingest_offsets",
            500,
            500,
            50.0,
        ),
        _row("UPDATE ingest_offsets SET next_offset = $1", 10, 0, 950.0),
    ]
    summary = statements.summarize(rows, events=200_000, top=2)
    assert summary["total_ms"] == 5000.0
    assert summary["total_us_per_event"] == 25.0
    top = summary["top"]
    assert [q["total_ms"] for q in top] == [4000.0, 950.0]
    assert top[0]["query"] == "INSERT INTO log_index SELECT * FROM stage"
    assert top[0]["us_per_row"] == 20.0 and top[0]["us_per_event"] == 20.0
    assert top[0]["share"] == 0.8 and top[0]["by"] == "pipeline"
    assert top[1]["us_per_row"] is None  # no rows: no per-row cost rather than a division by zero
    harness = statements.summarize(rows, events=200_000)["top"][2]
    assert harness["by"] == "harness"
