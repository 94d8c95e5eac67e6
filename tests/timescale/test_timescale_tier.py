"""The project's TimescaleDB path executed for real (PGlite with TimescaleDB 2.23, see
tests/timescale/conftest.py), and compared with the same steps on the session's PostgreSQL 15."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest

from sinks.aggregate_timescale import MCP_USAGE_HOURLY, ensure_rollup_views, rollup_statements
from sinks.merger import merge_until_clean
from sinks.migrate import migrate
from sinks.partitions import TIME_PARTITIONED, create_ahead, drop_expired
from sinks.readpath import QueryFilter
from sinks.retention import load_horizon
from sinks.timescale import COMPRESS_AFTER_DAYS, Backend, policy_retention_days
from tests.timescale.support import Batches, day_start, make_events, snapshot

pytestmark = pytest.mark.timescale

MAX_EVENT_AGE_DAYS = 90


async def _connect(url: str) -> asyncpg.Connection[Any]:
    return await asyncpg.connect(url)


async def _jobs(conn: asyncpg.Connection[Any]) -> dict[tuple[str, str], dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT hypertable_name, proc_name, config::text AS config FROM timescaledb_information.jobs "
        "WHERE hypertable_name IS NOT NULL"
    )
    return {(r["hypertable_name"], r["proc_name"]): orjson.loads(r["config"]) for r in rows}


async def _job_id(conn: asyncpg.Connection[Any], hypertable: str, proc_name: str) -> int:
    job_id: int = await conn.fetchval(
        "SELECT job_id FROM timescaledb_information.jobs WHERE hypertable_name = $1 AND proc_name = $2",
        hypertable,
        proc_name,
    )
    return job_id


async def test_migrate_creates_hypertables_and_policies_and_runs_every_job(timescale_url: str) -> None:
    assert await migrate(timescale_url)  # the project's own probe: timescaledb is installed
    assert await migrate(timescale_url) == []
    conn = await _connect(timescale_url)
    try:
        assert await ensure_rollup_views(conn, MAX_EVENT_AGE_DAYS) is Backend.TIMESCALEDB
        assert await conn.fetchval("SELECT DISTINCT backend FROM schema_migrations") == "timescaledb"
        dims = {
            r["hypertable_name"]: (r["column_name"], r["time_interval"])
            for r in await conn.fetch(
                "SELECT hypertable_name, column_name, time_interval FROM timescaledb_information.dimensions"
            )
        }
        jobs = await _jobs(conn)
        for spec in TIME_PARTITIONED.values():
            interval = timedelta(days=1) if spec.period == "day" else timedelta(days=30)
            assert dims[spec.table] == (spec.column, interval)
            keep = policy_retention_days(spec, MAX_EVENT_AGE_DAYS)
            assert jobs[(spec.table, "policy_retention")]["drop_after"] == f"{keep} days"
            settings = await conn.fetch(
                "SELECT attname, segmentby_column_index, orderby_column_index, orderby_asc "
                "FROM timescaledb_information.compression_settings WHERE hypertable_name = $1 "
                "ORDER BY segmentby_column_index NULLS LAST",
                spec.table,
            )
            segment_by = tuple(r["attname"] for r in settings if r["segmentby_column_index"])
            order_by = [(r["attname"], r["orderby_asc"]) for r in settings if r["orderby_column_index"]]
            assert segment_by == spec.compress_segment_by
            if spec.compress_segment_by:
                assert order_by == [(spec.column, False)]
                compress = jobs[(spec.table, "policy_compression")]
                assert compress["compress_after"] == f"{COMPRESS_AFTER_DAYS} days"
            else:
                assert (spec.table, "policy_compression") not in jobs
        # Migration 0008 gives row security to the uncompressed tenant tables (mcp_usage,
        # health_checks) and a filtering view to the compressed ones; the rollup of mcp_usage is
        # then a plain view reading as its caller (test_row_security_and_compression_conflict).
        assert await conn.fetchval("SELECT relrowsecurity FROM pg_class WHERE relname = 'mcp_usage'")
        view = await conn.fetchrow(
            "SELECT relkind::text, reloptions FROM pg_class WHERE oid = to_regclass($1)", MCP_USAGE_HOURLY
        )
        assert view is not None and view["relkind"] == "v" and "security_invoker=true" in view["reloptions"]
        # No background worker runs in this server: run every job of the project once, by hand
        # (ids from 1000 are the policies created here; below are TimescaleDB's own).
        for job in await conn.fetch("SELECT job_id FROM timescaledb_information.jobs WHERE job_id >= 1000"):
            await conn.execute("CALL run_job($1)", job["job_id"])
    finally:
        await conn.close()


async def _load(url: str, now: datetime) -> list[int]:
    """Migrate, then the same batches as a worker would commit them, a re-sent batch among them,
    then merge; returns the duplicates counted per batch."""
    assert await migrate(url)
    conn = await _connect(url)
    try:
        await ensure_rollup_views(conn, MAX_EVENT_AGE_DAYS)
        events = make_events(seed=16, count=900, days=6, now=now)
        batches = Batches()
        duplicates = [await batches.write(conn, events[i : i + 150]) for i in range(0, len(events), 150)]
        duplicates.append(await batches.write(conn, events[100:220]))  # a replay: all duplicates
        stats = await merge_until_clean(conn)
        assert stats is not None
        return duplicates
    finally:
        await conn.close()


async def _read(url: str, since: datetime, until: datetime) -> dict[str, Any]:
    conn = await _connect(url)
    try:
        return await snapshot(conn, since, until)
    finally:
        await conn.close()


async def _maintain(url: str, retention_days: int, today: date) -> tuple[list[str], str]:
    """The database half of `omnilog maintain`: create ahead, advance the horizon, drop. `today`
    is fixed by the caller, so both servers drop the same days even across midnight."""
    conn = await _connect(url)
    try:
        await create_ahead(conn, today=today)
        dropped = await drop_expired(conn, retention_days, today=today)
        horizon = await load_horizon(conn)
        assert horizon is not None
        return [d.isoformat() for d in dropped], horizon.isoformat()
    finally:
        await conn.close()


async def test_same_results_as_postgresql_15(timescale_url: str, fresh_database_url: str) -> None:
    now = datetime.now(UTC)
    since, until = day_start(now.date()) - timedelta(days=8), now + timedelta(days=1)
    assert await _load(timescale_url, now) == await _load(fresh_database_url, now) == [0] * 6 + [120]

    native = await _read(fresh_database_url, since, until)
    assert native["counts"]["log_index"] == 900 and native["mcp_usage_hourly"]
    assert await _read(timescale_url, since, until) == native

    # Retention: the horizon moves 3 days back from today, the older days go on both servers.
    dropped = await _maintain(timescale_url, 3, now.date())
    assert dropped == await _maintain(fresh_database_url, 3, now.date())
    assert dropped[0], "the data spans 6 days: some must be dropped"
    assert dropped[1] == (now.date() - timedelta(days=3)).isoformat()
    after = await _read(fresh_database_url, since, until)
    assert 0 < after["counts"]["log_index"] < 900
    assert await _read(timescale_url, since, until) == after


async def test_continuous_aggregate_where_mcp_usage_has_no_row_security(timescale_url: str) -> None:
    """The continuous aggregate's statements, on a database whose mcp_usage has no row security
    (one that serves no tenant read API): created, kept fresh by real-time aggregation, refreshed
    and compressed by its policies, equal to the same rollup computed on read."""
    assert await migrate(timescale_url)
    conn = await _connect(timescale_url)
    try:
        await conn.execute("ALTER TABLE mcp_usage DISABLE ROW LEVEL SECURITY")
        await ensure_rollup_views(conn, MAX_EVENT_AGE_DAYS)
        cagg = await conn.fetchrow(
            "SELECT materialized_only, compression_enabled "
            "FROM timescaledb_information.continuous_aggregates WHERE view_name = $1",
            MCP_USAGE_HOURLY,
        )
        assert cagg is not None and cagg["materialized_only"] is False and cagg["compression_enabled"] is True
        jobs = await _jobs(conn)
        refresh = jobs[(MCP_USAGE_HOURLY, "policy_refresh_continuous_aggregate")]
        assert (refresh["start_offset"], refresh["end_offset"]) == (
            f"{MAX_EVENT_AGE_DAYS + 1} days",
            "01:00:00",
        )
        compress = jobs[(MCP_USAGE_HOURLY, "policy_compression")]
        assert compress["compress_after"] == f"{MAX_EVENT_AGE_DAYS + 2} days"

        now = datetime.now(UTC)
        await Batches().write(conn, make_events(seed=7, count=400, days=3, now=now))
        on_read = rollup_statements(Backend.NATIVE, MAX_EVENT_AGE_DAYS)[0].split(" AS ", 1)[1]
        order = " ORDER BY bucket, org_id, server_id, tool_name"
        expected = [dict(r) for r in await conn.fetch(f"SELECT * FROM ({on_read}) v{order}")]
        assert expected, "the events include MCP tool calls"
        # Real-time aggregation: right before any refresh ...
        assert [dict(r) for r in await conn.fetch(f"SELECT * FROM {MCP_USAGE_HOURLY}{order}")] == expected
        # ... and after the policy's own refresh, then its compression job.
        before = datetime.now(UTC)
        for name in ("policy_refresh_continuous_aggregate", "policy_compression"):
            await conn.execute("CALL run_job($1)", await _job_id(conn, MCP_USAGE_HOURLY, name))
        after = datetime.now(UTC)
        mat_id = await conn.fetchval(
            "SELECT mat_hypertable_id FROM _timescaledb_catalog.continuous_agg WHERE user_view_name = $1",
            MCP_USAGE_HOURLY,
        )
        materialized = await conn.fetchval(
            f"SELECT count(*) FROM _timescaledb_internal._materialized_hypertable_{int(mat_id)}"
        )

        def refreshed(at: datetime) -> int:
            # The refresh covers whole hours up to end_offset (1 hour) before its clock.
            end = (at - timedelta(hours=1)).replace(minute=0, second=0, microsecond=0)
            return sum(r["bucket"] + timedelta(hours=1) <= end for r in expected)

        assert materialized in {refreshed(before), refreshed(after)}
        assert 0 < materialized < len(expected)
        assert [dict(r) for r in await conn.fetch(f"SELECT * FROM {MCP_USAGE_HOURLY}{order}")] == expected
    finally:
        await conn.close()


async def test_row_security_and_compression_conflict(timescale_url: str) -> None:
    """TimescaleDB refuses row security and compression (columnstore) on one hypertable, in either
    order, and a continuous aggregate over a table with row security. The resolution (migration
    0008 and sinks/aggregate_timescale.py): compressed tables keep compression and are filtered by
    a security-barrier view in omnilog_tenant; uncompressed ones get row security, and their
    rollup is a plain view reading as its caller."""
    assert await migrate(timescale_url)
    conn = await _connect(timescale_url)
    try:
        with pytest.raises(asyncpg.FeatureNotSupportedError, match="row security"):
            await conn.execute(
                "ALTER TABLE mcp_usage SET (timescaledb.compress, timescaledb.compress_segmentby = 'org_id')"
            )
        with pytest.raises(asyncpg.FeatureNotSupportedError, match="columnstore enabled"):
            await conn.execute("ALTER TABLE log_index ENABLE ROW LEVEL SECURITY")
        with pytest.raises(asyncpg.FeatureNotSupportedError, match="row security"):
            async with conn.transaction():
                for statement in rollup_statements(Backend.TIMESCALEDB, MAX_EVENT_AGE_DAYS):
                    await conn.execute(statement)

        # The resolution at work: the tenant view shows one organization's compressed rows only.
        now = datetime.now(UTC)
        events = make_events(seed=3, count=200, days=10, now=now)
        await Batches().write(conn, events)
        await conn.execute(
            "SELECT compress_chunk(c) FROM show_chunks('log_index', older_than => INTERVAL '7 days') c"
        )
        assert await conn.fetchval(
            "SELECT count(*) FROM timescaledb_information.chunks "
            "WHERE hypertable_name = 'log_index' AND is_compressed"
        )
        org = events[0].organization_id
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.current_org', $1, true)", org)
            seen = await conn.fetch(
                "SELECT DISTINCT organization_id::text AS org FROM omnilog_tenant.log_index"
            )
            count = await conn.fetchval("SELECT count(*) FROM omnilog_tenant.log_index")
        assert [r[0] for r in seen] == [org]
        assert count == sum(e.organization_id == org for e in events)
        assert await conn.fetchval("SELECT count(*) FROM omnilog_tenant.log_index") == 0  # unset: nothing
    finally:
        await conn.close()


async def test_late_event_into_a_compressed_chunk(timescale_url: str) -> None:
    """Days older than the compression policy's 7 days are compressed by the policy's own job; a
    late event for such a day is then indexed (decompressing the segment it lands in), a replay of
    a compressed row is still a counted duplicate, and the reads and rollups include the late one."""
    assert await migrate(timescale_url)
    now = datetime.now(UTC)
    old_day = now.date() - timedelta(days=9)
    conn = await _connect(timescale_url)
    try:
        await ensure_rollup_views(conn, MAX_EVENT_AGE_DAYS)
        batches = Batches()
        events = make_events(seed=9, count=300, days=12, now=now)
        assert await batches.write(conn, events) == 0
        for table in ("log_index", "usage_events"):
            await conn.execute("CALL run_job($1)", await _job_id(conn, table, "policy_compression"))
        compressed = {
            r["range_start"].date()
            for r in await conn.fetch(
                "SELECT range_start FROM timescaledb_information.chunks "
                "WHERE hypertable_name = 'log_index' AND is_compressed"
            )
        }
        assert old_day in compressed and now.date() not in compressed
        assert all(day <= now.date() - timedelta(days=COMPRESS_AFTER_DAYS) for day in compressed)

        old_events = [e for e in events if e.started_at.date() in compressed]
        late = make_events(seed=10, count=1, days=0.5, now=day_start(old_day) + timedelta(hours=13))[0]
        assert late.started_at.date() == old_day
        # One batch: the late event, and a replay of events already in compressed chunks.
        assert await batches.write(conn, [late, *old_events[:5]]) == 5
        assert await conn.fetchval("SELECT count(*) FROM log_index") == 301

        await merge_until_clean(conn)
        since, until = day_start(old_day), day_start(old_day) + timedelta(days=1)
        rows = await snapshot(conn, since, until)
        org = late.organization_id
        index = rows[f"index/{org}/{QueryFilter(organization_id=org, since=since, until=until)}"]
        assert late.event_id in {str(r["id"]) for r in index}
        assert len(index) == sum(
            e.organization_id == late.organization_id and e.started_at.date() == old_day
            for e in [*events, late]
        )
        daily = rows[f"log_aggregates/{late.organization_id}/daily/org"]
        assert [r["total_requests"] for r in daily] == [len(index)]
    finally:
        await conn.close()
