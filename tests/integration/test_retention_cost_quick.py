"""bench/retention_cost.py end to end on a small scale: two pacings interleaved over two rounds;
while a writer ingests, each expiry deletes every seeded row of the expiring organization and none
of the writer's (speed is reported by the bench, not asserted here: the machine is shared)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from bench.retention_cost import EXPIRING_ORG
from sinks.migrate import migrate

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


async def test_the_bench_expires_every_seeded_row_while_the_writer_ingests(fresh_database_url: str) -> None:
    await migrate(fresh_database_url)
    command = [
        sys.executable, str(ROOT / "bench" / "retention_cost.py"), "--database-url", fresh_database_url,
        "--expired-rows", "3000", "--baseline-s", "0.3", "--rounds", "2", "--batch", "200",
        "--variant", "2:0", "--variant", "4:1",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    # Each variant ran once per round, with its own pacing.
    assert [(v["expiry_page_objects"], v["idle_ratio"]) for v in report["variants"]] == [(2, 0.0), (4, 1.0)]
    for variant in report["variants"]:
        assert len(variant["rounds"]) == 2 and len(variant["drops_pct"]) == 2
        for round_ in variant["rounds"]:
            assert round_["expired_rows"] == 3000
            assert round_["baseline_rows_per_s"] > 0 and round_["during_expiry_rows_per_s"] > 0
    # Paired windows: the expiry paused and running in turn, each kind of window measured.
    paired = [*command[:4], "--expired-rows", "3000", "--rounds", "1", "--batch", "200",
              "--variant", "2:1", "--paired-window-s", "0.2"]  # fmt: skip
    done = subprocess.run(paired, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr
    ((round_,),) = [v["rounds"] for v in json.loads(done.stdout.splitlines()[-1])["variants"]]
    assert round_["expired_rows"] == 3000
    assert round_["baseline_rows_per_s"] > 0 and round_["during_expiry_rows_per_s"] > 0
    conn = await asyncpg.connect(fresh_database_url)
    try:
        assert (
            await conn.fetchval("SELECT count(*) FROM log_index WHERE organization_id = $1", EXPIRING_ORG)
            == 0
        )
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM ingest_objects WHERE organization_id = $1", EXPIRING_ORG
            )
            == 0
        )
        # The writer's rows (today, other organizations) are all there, each with its ledger row.
        assert await conn.fetchval("SELECT count(*) FROM log_index") > 0
        assert await conn.fetchval(
            "SELECT count(*) FROM log_index i WHERE NOT EXISTS"
            " (SELECT 1 FROM ingest_objects o WHERE o.object_uri = i.object_uri)"
        ) == 0  # fmt: skip
    finally:
        await conn.close()
