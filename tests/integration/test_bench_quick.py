"""`omnilog bench --quick` end to end on the session's stack: every scenario reports positive
numbers (no thresholds: speed is reported, not asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


@pytest.mark.timeout(240)
def test_bench_quick_reports_every_scenario(stack_info: StackInfo, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNILOG_")} | stack_info.env()
    completed = subprocess.run(
        [sys.executable, "-c", "from pipeline.cli import main; main()", "bench", "--quick", "--use-env",
         "--out", str(tmp_path)],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=230,
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
    assert scenarios["freshness"]["p99_s"] > 0
    assert scenarios["freshness"]["p50_s"] <= scenarios["freshness"]["p99_s"]
    assert scenarios["memory"]["peak_rss_mib"] > 0
    scaling = scenarios["scaling_aggregates"]
    for part in ("stage_1", "stage_3", "ingest_1", "ingest_3"):
        assert scaling[part]["events_per_s"] > 0, part
    # every end-to-end scenario indexed its whole backlog (the harness checks the row count)
    assert scenarios["ingest_1_worker"]["events"] == result["plan"]["backlog_1"]
    assert {t["target"] for t in result["targets"]} and all("met" in t for t in result["targets"])
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert "| target | goal | reached | met |" in completed.stdout
