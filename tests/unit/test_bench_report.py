"""The bench's markdown report (bench/harness/report.py): every drain says how its backlog arrived,
the worst-case drain (random arrival) has its own row with its ratio to the ordered drain, the
targets table names each figure's arrival, and results from before arrival order (version 2, no
"arrival" anywhere) still render, as random arrival."""

from __future__ import annotations

import copy
import re
from typing import Any

from bench.harness.report import drain_rows, markdown
from bench.harness.runner import _ratio_to_ordered
from bench.harness.targets import targets

PROCESSES = ("worker", "merger", "postgres", "broker", "s3", "harness", "unattributed")


def _cpu(events: int, wall_s: float) -> dict[str, Any]:
    usage = {"cpu_s": 1.0, "us_per_event": 1e6 / events, "cores": 1.0 / wall_s}
    return {
        "wall_s": wall_s,
        "processes": {p: dict(usage) for p in PROCESSES},
        "machine_busy_s": 7.0,
        "machine_utilisation": 0.8,
        "machine_us_per_event": 7e6 / events,
        "missing": [],
    }


def _drain(events: int, per_s: float, arrival: str | None, workers: int = 1) -> dict[str, Any]:
    seconds = events / per_s
    drain: dict[str, Any] = {
        "workers": workers,
        "variant": "full",
        "events": events,
        "seconds": seconds,
        "events_per_s": per_s,
        "aggregates_seconds": seconds * 1.1,
        "aggregates_events_per_s": per_s / 1.1,
        "fifths_events_per_s": [per_s] * 5,
        "all_workers_consuming": None,
        "produce_events_per_s": 40_000.0,
        "peak_rss_mib": [290.0] * workers,
        "cpu": {"index": _cpu(events, seconds), "aggregates": _cpu(events, seconds * 1.1)},
        "statements": {
            "available": True,
            "total_ms": 1_000.0,
            "total_us_per_event": 1e6 / events,
            "top": [
                {"query": "INSERT INTO log_index (id) SELECT id FROM log_index_stage_v2", "by": "pipeline",
                 "calls": 10, "rows": events, "total_ms": 900.0, "share": 0.9,
                 "us_per_row": 9e5 / events, "us_per_event": 9e5 / events},
            ],
        },
    }  # fmt: skip
    if arrival is not None:
        drain["arrival"] = arrival
    return drain


def _ceiling(events: int, per_s: float) -> dict[str, Any]:
    return {"events": events, "events_per_s": per_s}


def _run(arrival: str | None = "ordered", worst_per_s: float | None = 6_000.0) -> dict[str, Any]:
    """A full run's result as runner.run returns it (arrival None: a version 2 result)."""
    one_m = _drain(1_000_000, 12_000.0, arrival)
    small = _drain(200_000, 13_000.0, arrival)
    scenarios: dict[str, Any] = {
        "drain_200k": small,
        "drain_1m": one_m,
        "drain_5m": _drain(5_000_000, 12_500.0, arrival),
        "ingest_1_worker": one_m,
        "ceiling_copy": _ceiling(200_000, 50_000.0),
        "ceiling_gzip": {**_ceiling(200_000, 500_000.0), "mb_per_s": 400.0, "ratio": 4.2},
        "ceiling_kafka_aiokafka": _ceiling(1_000_000, 100_000.0),
        "ceiling_index_transaction": _ceiling(200_000, 40_000.0),
        "ceiling_validate": _ceiling(200_000, 60_000.0),
        "scaling_workers": {
            "backlog": 200_000,
            "partitions": 8,
            "workers_1": small,
            "workers_2": _drain(200_000, 18_000.0, arrival, workers=2),
            "speedup_2_over_1": 1.38,
        },
        "peer_faust": {"events": 30_000, "events_per_s": 4_000.0, "batch": 100, "ours_over_peer": 3.0},
        "freshness": {
            "rate": 6_000.0,
            "events": 180_000,
            "p50_s": 1.5,
            "p99_s": 3.0,
            "metric_p50_s": 2.0,
            "metric_p99_s": 4.0,
            "aggregates_visible": {"p50_s": 2.5, "p99_s": 5.0},
        },
        "memory": {"backlog_events": 5_000_000, "peak_rss_mib": 290.0, "measured_in": "drain_5m"},
        "scaling_aggregates": {
            "stage_1": _ceiling(200_000, 11_000.0),
            "stage_3": _ceiling(200_000, 13_000.0),
            "stage_3_over_1": 1.18,
        },
    }
    for name in ("ingest_1_worker",):
        scenarios[name]["ratio_to"] = {
            "copy": 0.24, "kafka_aiokafka": 0.12, "gzip": 0.024, "index_transaction": 0.3, "validate": 0.2
        }  # fmt: skip
    if worst_per_s is not None:
        worst = _drain(1_000_000, worst_per_s, "random")
        worst["ratio_to_ordered"] = _ratio_to_ordered(worst, one_m)
        scenarios["drain_1m_random"] = worst
    traffic: dict[str, Any] = {"span_hours": 1.0}
    if arrival is not None:
        traffic |= {"arrival": arrival, "order_jitter_ms": 2_000}
    return {
        "version": 3 if arrival is not None else 2,
        "mode": "full",
        "started_at": "2026-11-29T16:00:00+00:00",
        "duration_s": 1_500.0,
        "machine": {"cpus": 2},
        "git_commit": "abc1234",
        "traffic": traffic,
        "scenarios": scenarios,
        "targets": targets(scenarios),
    }


def _row(table: str, starts: str) -> list[str]:
    """The cells of the one markdown row whose first cell starts with `starts`."""
    rows = [line for line in table.splitlines() if line.startswith(f"| {starts}")]
    assert len(rows) == 1, (starts, rows)
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


def test_the_worst_case_drain_has_its_own_row_with_its_ratio_to_the_ordered_drain() -> None:
    result = _run()
    worst = result["scenarios"]["drain_1m_random"]
    assert worst["ratio_to_ordered"] == {"events_per_s": 0.5, "aggregates_events_per_s": 0.5}
    table = markdown(result)

    cells = _row(table, "ingest end to end, 1 worker, 1 M backlog, random arrival (worst case)")
    assert cells[1:3] == ["1,000,000", "6,000"]
    assert "0.50× the same drain in arrival order" in cells[3]
    cells = _row(table, "ingest end to end, 1 worker, reference backlog, ordered arrival")
    assert cells[2] == "12,000"
    assert "0.50× the ordered rate to the index" in table
    assert "Backlogs arrive in time order" in table and "± 2 s" in table

    drains = _row(table, "1 worker, 1,000,000 backlog, random arrival (worst case)")
    assert drains[2] == "6,000"
    # the ordered drain of the same size sorts first
    labels = [label for _, label, _ in drain_rows(result["scenarios"])]
    assert labels.index("1 worker, 1,000,000 backlog, ordered arrival") < labels.index(
        "1 worker, 1,000,000 backlog, random arrival (worst case)"
    )
    assert "2 worker(s), 200,000 backlog, ordered arrival" in labels


def test_the_targets_table_names_each_figures_arrival() -> None:
    table = markdown(_run())
    assert "| target | goal | reached | met | arrival |" in table
    assert _row(table, "1 worker, 1 M backlog, index caught up")[4] == "ordered"
    assert _row(table, "5 M drain rate / 200 k drain rate")[4] == "ordered"
    assert _row(table, "freshness p99")[4] == "live"
    # the memory target spans every drain, the worst case among them
    assert _row(table, "worker peak RSS, every drain")[4] == "ordered + random"


def test_a_run_without_the_worst_case_has_no_such_row() -> None:
    table = markdown(_run(worst_per_s=None))
    assert "random arrival" not in table and "worst case" not in table
    assert _row(table, "worker peak RSS, every drain")[4] == "ordered"


def test_results_from_before_arrival_order_render_as_random_arrival() -> None:
    old = _run(arrival=None, worst_per_s=None)
    # as stored by version 2: targets rows without an arrival, the scaling's 1-worker point a copy
    for row in old["targets"]:
        del row["arrival"]
    old["scenarios"]["scaling_workers"]["workers_1"] = copy.deepcopy(old["scenarios"]["drain_200k"])
    table = markdown(old)

    assert "Backlogs arrive in random order" in table
    assert "ordered" not in table
    assert _row(table, "ingest end to end, 1 worker, reference backlog, random arrival")[2] == "12,000"
    assert _row(table, "1 worker, 1 M backlog, index caught up")[4] == "random"
    # each drain once in the drains table, though the 1-worker scaling point is a copy
    assert len(re.findall(r"^\| 1 worker(\(s\))?, 200,000 backlog", table, flags=re.MULTILINE)) == 1
