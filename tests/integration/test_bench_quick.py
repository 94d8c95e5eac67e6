"""`omnilog bench --quick` end to end on the session's stack: every scenario and every figure of
every drain is there (both clocks, fifths, CPU per process, per-statement times), every backlog
arrives in time order but the one worst-case drain (random arrival, its ratio to the ordered one),
and targets the quick sizes do not measure say "not measured". No thresholds: speed is reported,
not asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.harness.runner import SCENARIOS
from pipeline.devtools.stack import StackInfo

pytestmark = pytest.mark.integration


def _positive_numbers(value: object) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _positive_numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _positive_numbers(v)]
    return []


@pytest.mark.timeout(360)
def test_bench_quick_reports_every_scenario(stack_info: StackInfo, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNILOG_")} | stack_info.env()
    completed = subprocess.run(
        [sys.executable, "-c", "from pipeline.cli import main; main()", "bench", "--quick", "--use-env",
         "--out", str(tmp_path)],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=350,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]

    result = json.loads((tmp_path / "latest.json").read_text())
    assert result["mode"] == "quick"
    scenarios = result["scenarios"]
    assert set(SCENARIOS) <= set(scenarios)
    for name in SCENARIOS:
        numbers = _positive_numbers(scenarios[name])
        assert numbers, f"{name} reports no numbers"
        assert min(numbers) >= 0, f"{name} reports a negative number"
    for name in SCENARIOS:
        if "events_per_s" in scenarios[name]:
            assert scenarios[name]["events_per_s"] > 0, name

    reference = scenarios["ingest_1_worker"]
    assert reference["events"] == result["plan"]["reference_drain"] == result["plan"]["drains"][-1]
    assert result["traffic"]["arrival"] == "ordered"
    drains = [scenarios[f"drain_{n // 1000}k"] for n in result["plan"]["drains"]]
    scaling = scenarios["scaling_workers"]
    for workers in result["plan"]["scaling_workers"]:
        drains.append(scaling[f"workers_{workers}"])
    for drain in drains:
        _check_drain(drain)
        assert drain["arrival"] == "ordered"
    worst = scenarios[f"drain_{reference['events'] // 1000}k_random"]
    _check_drain(worst)
    assert worst["arrival"] == "random" and worst["events"] == reference["events"]
    assert worst["ratio_to_ordered"]["events_per_s"] == round(
        worst["events_per_s"] / reference["events_per_s"], 3
    )
    assert "random arrival (worst case)" in completed.stdout
    assert scaling["workers_1"] is not None and len(result["plan"]["scaling_workers"]) >= 2
    for workers in result["plan"]["scaling_workers"][1:]:
        assert scaling[f"speedup_{workers}_over_1"] > 0, workers
    assert scenarios["ingest_2_workers"]["workers"] == 2
    # None when one worker drained it all before the other joined: then there is no steady rate
    assert set(scenarios["ingest_2_workers"]["all_workers_consuming"]) == {"after_s", "events_per_s"}

    fresh = scenarios["freshness"]
    assert 0 < fresh["p50_s"] <= fresh["p99_s"]
    visible = fresh["aggregates_visible"]
    assert visible["samples"] > 0 and 0 <= visible["p50_s"] <= visible["p99_s"]
    assert scenarios["memory"]["peak_rss_mib"] > 0
    stage = scenarios["scaling_aggregates"]
    for part in ("stage_1", "stage_3"):
        assert stage[part]["events_per_s"] > 0, part

    # quick mode has no 1 M, 200 k or 5 M drain: those targets say so and are not met
    rows = {t["target"]: t for t in result["targets"]}
    assert all(t["status"] in ("met", "not met", "not measured") for t in rows.values())
    assert all((t["met"] is None) == (t["status"] == "not measured") for t in rows.values())
    assert rows["1 worker, 1 M backlog, index caught up (events/s)"]["status"] == "not measured"
    assert rows["5 M drain rate / 200 k drain rate"]["status"] == "not measured"
    assert rows["aggregates visible after commit, p99 (s)"]["value"] == visible["p99_s"]
    assert rows["worker peak RSS, every drain (MiB)"]["value"] == scenarios["memory"]["peak_rss_mib"]
    assert rows["worker peak RSS, every drain (MiB)"]["arrival"] == "ordered + random"
    assert scenarios["memory"]["peak_rss_mib_per_drain"].keys() == {"drain_30k", "drain_30k_random"}

    assert (tmp_path / "bench.png").stat().st_size > 0
    assert "| target | goal | reached | met | arrival |" in completed.stdout
    assert "| process | to index caught up: CPU s | µs/event | cores |" in completed.stdout
    assert "| statement | by | calls | rows | total ms | share | µs/row | µs/event |" in completed.stdout


def _check_drain(drain: dict[str, Any]) -> None:
    """Every figure of one drain is there: both clocks, the fifths, CPU per process, statements."""
    events = drain["events"]
    assert drain["seconds"] > 0 and drain["events_per_s"] > 0
    assert drain["aggregates_seconds"] >= drain["seconds"]
    assert 0 < drain["aggregates_events_per_s"] <= drain["events_per_s"]
    fifths = drain["fifths_events_per_s"]
    assert len(fifths) == 5 and all(r is not None and r > 0 for r in fifths), fifths
    assert drain["produce_events_per_s"] > 0
    for window in ("index", "aggregates"):
        cpu = drain["cpu"][window]
        assert cpu["missing"] == [], cpu["missing"]
        assert cpu["wall_s"] > 0 and 0 < cpu["machine_utilisation"] <= 1.05  # two clocks read apart
        processes = cpu["processes"]
        for name in ("worker", "merger", "postgres", "broker", "s3", "harness", "unattributed"):
            assert processes[name]["us_per_event"] is not None, (window, name)
        # a process that does the work uses CPU for it
        for name in ("worker", "postgres", "broker"):
            assert processes[name]["cpu_s"] > 0, (window, name)
    assert drain["cpu"]["aggregates"]["processes"]["merger"]["cpu_s"] > 0
    statements = drain["statements"]
    assert statements["available"], statements.get("reason")
    assert statements["total_ms"] > 0 and statements["top"]
    pipeline = [q for q in statements["top"] if q["by"] == "pipeline"]
    assert pipeline and all(q["calls"] > 0 and q["us_per_event"] is not None for q in pipeline)
    assert any(q["rows"] >= events for q in pipeline)  # the index insert wrote every row
