"""bench/retention_cost.py end to end on a small scale: while a writer ingests, the expiry deletes
every seeded row of the expiring organization and none of the writer's (speed is reported by the
bench, not asserted here: the machine is shared)."""

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
        "--expired-rows", "3000", "--baseline-s", "0.3", "--rounds", "1", "--batch", "200",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    (round_,) = report["rounds"]
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
