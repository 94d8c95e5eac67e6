"""mcp_usage_hourly on native PostgreSQL (migration 0013): a range query reads only the partitions
of that range, and every row equals the first definition's (a GROUP BY date_trunc('hour', time))."""

from __future__ import annotations

import random
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from sinks.aggregate_timescale import ensure_rollup_views
from sinks.migrate import MIGRATIONS_DIR, migrate
from sinks.partitions import TIME_PARTITIONED, ensure_day_partitions

pytestmark = pytest.mark.integration

# The first definition, as sinks/aggregate_timescale.py created it before migration 0013: the
# reference for equality and for the plan that scans every partition.
_FIRST_DEFINITION = """
SELECT date_trunc('hour', time) AS bucket, org_id, server_id, tool_name,
       count(*) AS calls,
       count(*) FILTER (WHERE status = 'success') AS success_count,
       count(*) FILTER (WHERE status = 'error') AS error_count,
       count(*) FILTER (WHERE status = 'timeout') AS timeout_count,
       count(*) FILTER (WHERE status = 'blocked') AS blocked_count,
       sum(latency_ms) AS total_latency_ms,
       avg(latency_ms) AS avg_latency_ms,
       sum(input_size) AS total_input_size,
       sum(output_size) AS total_output_size
FROM mcp_usage
GROUP BY 1, org_id, server_id, tool_name
"""
_INSERT = (
    "INSERT INTO mcp_usage (time, org_id, server_id, tool_name, request_id, latency_ms, status, "
    "input_size, output_size) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
)
ORGS = [str(uuid.UUID(int=i, version=4)) for i in (1, 2)]
SERVERS = [str(uuid.UUID(int=i, version=4)) for i in (11, 12)]
DAYS = 3


def _rows(first_day: date, count: int, seed: int) -> Iterator[tuple[Any, ...]]:
    """Calls over `DAYS` days: random instants plus the edges (midnight, exact hours, the last
    microsecond of an hour), NULL latencies and sizes, every status."""
    rng = random.Random(seed)
    start = datetime(first_day.year, first_day.month, first_day.day, tzinfo=UTC)
    edges = [start + timedelta(hours=h) for h in range(DAYS * 24)]
    edges += [e - timedelta(microseconds=1) for e in edges[1:]]
    for i in range(count):
        at = edges[i] if i < len(edges) else start + timedelta(seconds=rng.uniform(0, DAYS * 86400 - 1))
        yield (
            at,
            rng.choice(ORGS),
            rng.choice(SERVERS),
            rng.choice(["search", "fetch", "write"]),
            uuid.uuid4(),
            rng.choice([None, rng.randint(0, 5000)]),
            rng.choice(["success", "success", "error", "timeout", "blocked"]),
            rng.choice([None, rng.randint(0, 10**6)]),
            rng.choice([None, rng.randint(0, 10**6)]),
        )


async def _prepared(url: str, before_0013: Path | None = None) -> tuple[asyncpg.Connection, date]:
    """Migrated, the merger's view ensured, three days of calls. `before_0013`: migrated without
    0013 first (the merger then creates the first definition), then upgraded."""
    if before_0013 is not None:
        before_0013.mkdir()
        for path in MIGRATIONS_DIR.glob("*.sql"):
            if int(path.name[:4]) < 13:
                shutil.copy(path, before_0013 / path.name)
        await migrate(url, directory=before_0013)
        first = await asyncpg.connect(url)
        try:
            await ensure_rollup_views(first, 90)
        finally:
            await first.close()
    await migrate(url)
    conn = await asyncpg.connect(url)
    await ensure_rollup_views(conn, 90)  # as the merger does at start: it keeps 0013's view
    first_day = datetime.now(UTC).date() - timedelta(days=1)
    days = [first_day + timedelta(days=d) for d in range(DAYS)]
    await ensure_day_partitions(conn, "mcp_usage", days[:-1])
    # A partition not named by sinks/partitions.py: the view reads its bounds from the catalog.
    low, high = (
        datetime(d.year, d.month, d.day, tzinfo=UTC) for d in (days[-1], days[-1] + timedelta(days=1))
    )
    await conn.execute(
        "CREATE TABLE mcp_usage_made_by_hand (LIKE mcp_usage INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
    )
    await conn.execute(
        f"ALTER TABLE mcp_usage ATTACH PARTITION mcp_usage_made_by_hand "
        f"FOR VALUES FROM ('{low.isoformat()}') TO ('{high.isoformat()}')"
    )
    await conn.executemany(_INSERT, list(_rows(first_day, 3000, seed=7)))
    await conn.execute("ANALYZE mcp_usage")
    return conn, first_day


def _sorted(rows: list[asyncpg.Record]) -> list[tuple[Any, ...]]:
    return sorted(tuple(r) for r in rows)


def _touched(plan: dict[str, Any]) -> set[str]:
    """Relations a plan (EXPLAIN ANALYZE, JSON) actually read: scan nodes executed at least once."""
    found = set()
    if plan.get("Relation Name") and plan.get("Actual Loops", 0) > 0:
        found.add(plan["Relation Name"])
    for child in plan.get("Plans", []):
        found |= _touched(child)
    return found


async def _partitions_read(conn: asyncpg.Connection, source: str, day: date) -> set[str]:
    low = datetime(day.year, day.month, day.day, tzinfo=UTC)
    plan = await conn.fetchval(
        f"EXPLAIN (ANALYZE, FORMAT JSON) SELECT * FROM {source} t "
        "WHERE t.org_id = $1::uuid AND t.bucket >= $2 AND t.bucket < $3",
        ORGS[0], low, low + timedelta(days=1),
    )  # fmt: skip
    return {r for r in _touched(orjson.loads(plan)[0]["Plan"]) if r.startswith("mcp_usage_p")}


@pytest.mark.parametrize("upgraded", [False, True], ids=["fresh", "upgraded"])
async def test_a_one_day_range_reads_only_that_days_partition(fresh_database_url, tmp_path, upgraded):
    conn, first_day = await _prepared(fresh_database_url, tmp_path / "before_0013" if upgraded else None)
    try:
        middle = first_day + timedelta(days=1)
        expected = {TIME_PARTITIONED["mcp_usage"].partition_name(middle)}
        # The first definition reads every partition for the same question: what the test guards.
        first = await _partitions_read(conn, f"({_FIRST_DEFINITION})", middle)
        assert len(first) > 1
        assert await _partitions_read(conn, "mcp_usage_hourly", middle) == expected
    finally:
        await conn.close()


@pytest.mark.parametrize("time_zone", ["UTC", "America/New_York", "Asia/Kolkata"])
async def test_rows_equal_the_first_definition(fresh_database_url, time_zone):
    conn, first_day = await _prepared(fresh_database_url)
    try:
        await conn.execute(f"SET TIME ZONE '{time_zone}'")
        everything = _sorted(await conn.fetch("SELECT * FROM mcp_usage_hourly"))
        assert len(everything) > 500  # the data spreads over many hours and keys
        assert everything == _sorted(await conn.fetch(_FIRST_DEFINITION))
        # A range not aligned on hours, and one organization, as the dashboard asks.
        low = datetime(first_day.year, first_day.month, first_day.day, 7, 30, tzinfo=UTC)
        ranged = "SELECT * FROM {} t WHERE t.org_id = $1::uuid AND t.bucket BETWEEN $2 AND $3"
        args = (ORGS[1], low, low + timedelta(hours=30, minutes=10))
        new = _sorted(await conn.fetch(ranged.format("mcp_usage_hourly"), *args))
        assert new and new == _sorted(await conn.fetch(ranged.format(f"({_FIRST_DEFINITION})"), *args))
    finally:
        await conn.close()
