"""Partition maintenance against a real PostgreSQL: create ahead, on demand (concurrently),
drop past retention, and never block the ingest path while doing it."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, time, timedelta, timezone
from pathlib import Path

import asyncpg
import orjson
import pytest

from pipeline.devtools.stack import StackInfo
from sinks.migrate import migrate
from sinks.partitions import (
    TIME_PARTITIONED,
    PartitionCache,
    PartitionError,
    create_ahead,
    drop_expired,
    ensure_day_partitions,
)

pytestmark = pytest.mark.integration

TODAY = datetime.now(UTC).date()


@pytest.fixture
async def conn(fresh_database_url: str) -> AsyncIterator[asyncpg.Connection]:
    await migrate(fresh_database_url)
    connection = await asyncpg.connect(fresh_database_url)
    try:
        yield connection
    finally:
        await connection.close()


async def _partitions(conn: asyncpg.Connection, table: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = $1::regclass ORDER BY 1",
        table,
    )
    return [r["relname"] for r in rows]


async def _insert_index_row(conn: asyncpg.Connection, started_at: datetime) -> str:
    """Insert one log_index row; return the partition it landed in."""
    return str(
        await conn.fetchval(
            "INSERT INTO log_index "
            "(id, organization_id, started_at, storage_provider, object_uri, byte_offset, byte_length) "
            "VALUES ($1, $2, $3, 's3', 's3://b/k', 0, 10) RETURNING tableoid::regclass::text",
            uuid.uuid4(),
            uuid.uuid4(),
            started_at,
        )
    )


def _at(day: date, hour: int = 12, minute: int = 0) -> datetime:
    return datetime.combine(day, time(hour, minute), tzinfo=UTC)


async def test_create_ahead_covers_today_and_the_days_ahead(conn: asyncpg.Connection) -> None:
    created = await create_ahead(conn, 3, today=TODAY)
    days = [TODAY + timedelta(days=n) for n in range(4)]
    for table in ("log_index", "usage_events", "mcp_usage"):
        assert created[table] == days
        assert await _partitions(conn, table) == [f"{table}_p{d:%Y%m%d}" for d in days]
    months = sorted({d.replace(day=1) for d in days})
    assert created["health_checks"] == months
    assert await _partitions(conn, "health_checks") == [f"health_checks_p{m:%Y%m}" for m in months]
    # Rows route into the new partitions; the bounds are UTC midnights.
    assert await _insert_index_row(conn, _at(TODAY, 0, 0)) == f"log_index_p{TODAY:%Y%m%d}"
    assert await _insert_index_row(conn, _at(TODAY, 23, 59)) == f"log_index_p{TODAY:%Y%m%d}"
    # A second run creates nothing.
    assert await create_ahead(conn, 3, today=TODAY) == {table: [] for table in TIME_PARTITIONED}


async def test_partition_indexes_match_the_parent(conn: asyncpg.Connection) -> None:
    await ensure_day_partitions(conn, "log_index", [TODAY])
    parent = await conn.fetchval("SELECT count(*) FROM pg_index WHERE indrelid = 'log_index'::regclass")
    child = await conn.fetchval(
        "SELECT count(*) FROM pg_index WHERE indrelid = to_regclass($1)", f"log_index_p{TODAY:%Y%m%d}"
    )
    assert child == parent > 1
    with pytest.raises(asyncpg.UniqueViolationError):
        row_id = uuid.uuid4()
        for _ in range(2):
            await conn.execute(
                "INSERT INTO log_index "
                "(id, organization_id, started_at, storage_provider, object_uri, byte_length) "
                "VALUES ($1, $2, $3, 's3', 'u', 1)",
                row_id,
                uuid.uuid4(),
                _at(TODAY),
            )


async def test_bounds_do_not_depend_on_the_session_time_zone(conn: asyncpg.Connection) -> None:
    await conn.execute("SET TimeZone = 'America/New_York'")
    day = TODAY - timedelta(days=3)
    await ensure_day_partitions(conn, "log_index", [day])
    assert await _insert_index_row(conn, _at(day, 23, 30)) == f"log_index_p{day:%Y%m%d}"
    assert await _insert_index_row(conn, _at(day, 0, 0)) == f"log_index_p{day:%Y%m%d}"


async def test_on_demand_late_day_and_a_warm_cache_does_no_io(
    conn: asyncpg.Connection, fresh_database_url: str
) -> None:
    cache = PartitionCache()
    late = TODAY - timedelta(days=40)
    assert await ensure_day_partitions(conn, "log_index", [late, TODAY], cache) == [late, TODAY]
    assert await _insert_index_row(conn, _at(late)) == f"log_index_p{late:%Y%m%d}"
    # Known days: no query at all (a closed connection would raise on any use).
    closed = await asyncpg.connect(fresh_database_url)
    await closed.close()
    assert await ensure_day_partitions(closed, "log_index", [late, TODAY], cache) == []
    # Without a cache: one listing, nothing created.
    assert await ensure_day_partitions(conn, "log_index", [late]) == []


async def test_aware_datetimes_stand_for_their_utc_day(conn: asyncpg.Connection) -> None:
    local = datetime.combine(TODAY, time(2, 0), tzinfo=timezone(timedelta(hours=5)))  # previous UTC day
    assert await ensure_day_partitions(conn, "log_index", [local]) == [TODAY - timedelta(days=1)]
    assert await _insert_index_row(conn, local) == f"log_index_p{TODAY - timedelta(days=1):%Y%m%d}"


async def test_refuses_to_run_inside_a_transaction(conn: asyncpg.Connection) -> None:
    async with conn.transaction():
        with pytest.raises(PartitionError, match="outside a transaction"):
            await ensure_day_partitions(conn, "log_index", [TODAY])
    with pytest.raises(PartitionError, match="not a time-partitioned table"):
        await ensure_day_partitions(conn, "organizations", [TODAY])


async def test_concurrent_callers_for_the_same_days_all_succeed(fresh_database_url: str) -> None:
    await migrate(fresh_database_url)
    days = [TODAY - timedelta(days=n) for n in range(5, 10)]
    conns = [await asyncpg.connect(fresh_database_url) for _ in range(4)]
    try:
        results = await asyncio.gather(*(ensure_day_partitions(c, "log_index", days) for c in conns))
        created = sorted(d for r in results for d in r)
        assert created == sorted(days)  # every day created exactly once, by one of the callers
        assert await _partitions(conns[0], "log_index") == [f"log_index_p{d:%Y%m%d}" for d in sorted(days)]
    finally:
        for c in conns:
            await c.close()


async def test_creating_a_partition_does_not_wait_for_open_insert_transactions(
    conn: asyncpg.Connection, fresh_database_url: str
) -> None:
    await ensure_day_partitions(conn, "log_index", [TODAY])
    other = await asyncpg.connect(fresh_database_url)
    try:
        # A batch transaction in flight, holding its locks on log_index.
        transaction = conn.transaction()
        await transaction.start()
        await _insert_index_row(conn, _at(TODAY))
        # PARTITION OF would need ACCESS EXCLUSIVE on log_index and wait here; ATTACH does not.
        await other.execute("SET lock_timeout = '3s'")
        late = TODAY - timedelta(days=2)
        assert await asyncio.wait_for(ensure_day_partitions(other, "log_index", [late]), 10) == [late]
        await transaction.commit()
    finally:
        await other.close()


async def test_drop_expired_drops_only_partitions_past_retention(conn: asyncpg.Connection) -> None:
    retention = 30
    old_days = [TODAY - timedelta(days=n) for n in (33, 32, 31)]
    kept_days = [TODAY - timedelta(days=n) for n in (30, 29)]
    for table in ("log_index", "usage_events"):
        await ensure_day_partitions(conn, table, old_days + kept_days)
    for day in old_days + kept_days:
        await _insert_index_row(conn, _at(day))
    # An interrupted earlier drop left a detached, expired partition behind: it goes too.
    leftover = TODAY - timedelta(days=35)
    await ensure_day_partitions(conn, "mcp_usage", [leftover, TODAY])
    await conn.execute(f"ALTER TABLE mcp_usage DETACH PARTITION mcp_usage_p{leftover:%Y%m%d}")
    # health_checks: months wholly older than its own 30 days go, and are not reported.
    old_month = (TODAY.replace(day=1) - timedelta(days=70)).replace(day=1)
    await ensure_day_partitions(conn, "health_checks", [old_month, TODAY])

    dropped = await drop_expired(conn, retention, today=TODAY)

    assert dropped == sorted([leftover, *old_days])
    assert await _partitions(conn, "log_index") == [f"log_index_p{d:%Y%m%d}" for d in kept_days]
    assert await _partitions(conn, "usage_events") == [f"usage_events_p{d:%Y%m%d}" for d in kept_days]
    assert await conn.fetchval("SELECT to_regclass($1)", f"mcp_usage_p{leftover:%Y%m%d}") is None
    assert await _partitions(conn, "health_checks") == [f"health_checks_p{TODAY:%Y%m}"]
    assert await conn.fetchval("SELECT count(*) FROM log_index") == len(kept_days)
    assert await drop_expired(conn, retention, today=TODAY) == []


async def test_maintain_command_creates_ahead_and_reports_dropped_days(
    fresh_database_url: str, stack_info: StackInfo
) -> None:
    await migrate(fresh_database_url)
    conn = await asyncpg.connect(fresh_database_url)
    try:
        expired = TODAY - timedelta(days=100)
        # The partition-drop line follows the longest organization retention (the seed's default
        # organization keeps 365 days): at 90 days, the 100-day-old partition is dropped.
        await conn.execute("UPDATE organizations SET log_retention_days = 90")
        await ensure_day_partitions(conn, "log_index", [expired])
    finally:
        await conn.close()
    # maintain also expires objects and sweeps orphans, so it needs the object store too.
    env = {**os.environ, **stack_info.env(), "OMNILOG_DATABASE_URL": fresh_database_url}
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "omnilog"),
        "maintain",
        "--days-ahead",
        "1",
        "--retention-days",
        "90",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    summary = orjson.loads(out.splitlines()[-1])
    assert summary["dropped_days"] == [expired.isoformat()]
    assert summary["created"]["log_index"] == [TODAY.isoformat(), (TODAY + timedelta(days=1)).isoformat()]
    assert summary["retention_days"] == 90
    assert summary["retention_horizon"] == (TODAY - timedelta(days=90)).isoformat()
