"""The migration runner against a real PostgreSQL: full schema from empty, idempotence,
concurrent runs, checksum guard, per-file transactions and the backend choice."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from sinks.migrate import MIGRATIONS_DIR, MigrationError, migrate
from sinks.partitions import create_ahead
from sinks.timescale import Backend

pytestmark = pytest.mark.integration

# Typed out from the seeds (000 Omnimesh, 001 MindWeave usage) plus the documented additions,
# deliberately not derived from the SQL files: column -> udt_name in information_schema.
SEED_TABLES: dict[str, dict[str, str]] = {
    "organizations": {
        "id": "uuid",
        "name": "varchar",
        "slug": "citext",
        "created_at": "timestamptz",
        "updated_at": "timestamptz",
        "is_active": "bool",
        "plan_type": "plan_type_enum",
        "max_servers": "int4",
        "max_sessions": "int4",
        "log_retention_days": "int4",
    },
    "mcp_servers": {
        "id": "uuid",
        "organization_id": "uuid",
        "name": "varchar",
        "description": "text",
        "protocol": "protocol_enum",
        "url": "varchar",
        "command": "varchar",
        "args": "_text",
        "environment": "_text",
        "working_dir": "varchar",
        "version": "varchar",
        "weight": "int4",
        "timeout_seconds": "int4",
        "max_retries": "int4",
        "status": "server_status_enum",
        "health_check_url": "varchar",
        "is_active": "bool",
        "metadata": "jsonb",
        "tags": "_text",
        "created_at": "timestamptz",
        "updated_at": "timestamptz",
    },
    "mcp_sessions": {
        "id": "uuid",
        "organization_id": "uuid",
        "server_id": "uuid",
        "status": "session_status_enum",
        "protocol": "protocol_enum",
        "client_id": "uuid",
        "connection_id": "uuid",
        "process_pid": "int4",
        "process_status": "proc_status_enum",
        "process_exit_code": "int4",
        "process_error": "text",
        "started_at": "timestamptz",
        "last_activity": "timestamptz",
        "ended_at": "timestamptz",
        "metadata": "jsonb",
        "user_id": "varchar",
        "created_at": "timestamptz",
        "updated_at": "timestamptz",
    },
    "virtual_servers": {
        "id": "uuid",
        "organization_id": "uuid",
        "name": "varchar",
        "description": "text",
        "adapter_type": "adapter_type_enum",
        "tools": "jsonb",
        "is_active": "bool",
        "metadata": "jsonb",
        "created_at": "timestamptz",
        "updated_at": "timestamptz",
    },
    "health_checks": {
        "id": "uuid",
        "server_id": "uuid",
        "status": "health_status_enum",
        "response_time_ms": "int4",
        "response_body": "text",
        "error_message": "text",
        "checked_at": "timestamptz",
    },
    "server_stats": {
        "id": "uuid",
        "server_id": "uuid",
        "total_requests": "int8",
        "success_requests": "int8",
        "error_requests": "int8",
        "active_sessions": "int4",
        "avg_response_time_ms": "float8",
        "min_response_time_ms": "int4",
        "max_response_time_ms": "int4",
        "window_start": "timestamptz",
        "window_end": "timestamptz",
        "created_at": "timestamptz",
        "updated_at": "timestamptz",
    },
    "log_index": {
        "id": "uuid",
        "organization_id": "uuid",
        "server_id": "uuid",
        "session_id": "uuid",
        "rpc_method": "varchar",
        "level": "log_level_enum",
        "started_at": "timestamptz",
        "duration_ms": "int4",
        "status_code": "int4",
        "error_flag": "bool",
        "storage_provider": "storage_provider_enum",
        "object_uri": "text",
        "byte_offset": "int8",
        "user_id": "varchar",
        "remote_ip": "inet",
        "client_id": "uuid",
        "connection_id": "uuid",
        "created_at": "timestamptz",
        # additions (docs/contract.md §4, seed "PII Safety")
        "byte_length": "int4",
        "redaction_version": "int4",
    },
    "audit_logs": {
        "id": "uuid",
        "organization_id": "uuid",
        "action": "varchar",
        "resource_type": "varchar",
        "resource_id": "uuid",
        "actor_id": "varchar",
        "actor_ip": "inet",
        "old_values": "jsonb",
        "new_values": "jsonb",
        "metadata": "jsonb",
        "created_at": "timestamptz",
        "virtual_server_id": "uuid",
    },
    "rate_limits": {
        "id": "uuid",
        "organization_id": "uuid",
        "scope": "rate_limit_scope_enum",
        "scope_id": "varchar",
        "requests_per_minute": "int4",
        "requests_per_hour": "int4",
        "requests_per_day": "int4",
        "burst_limit": "int4",
        "is_active": "bool",
        "created_at": "timestamptz",
        "updated_at": "timestamptz",
    },
    "rate_limit_usage": {
        "id": "uuid",
        "organization_id": "uuid",
        "rate_limit_id": "uuid",
        "identifier": "varchar",
        "window_start": "timestamptz",
        "request_count": "int4",
        "expires_at": "timestamptz",
        "created_at": "timestamptz",
        "updated_at": "timestamptz",
    },
    "log_aggregates": {
        "id": "uuid",
        "organization_id": "uuid",
        "server_id": "uuid",
        "window_type": "aggregation_window_enum",
        "window_start": "timestamptz",
        "rpc_method": "varchar",
        "total_requests": "int8",
        "success_requests": "int8",
        "error_requests": "int8",
        "p50_duration_ms": "int4",
        "p95_duration_ms": "int4",
        "p99_duration_ms": "int4",
        "avg_duration_ms": "float8",
        "total_bytes_in": "numeric",  # NUMERIC(38,0) since 0005: sums past 2^63 stay exact
        "total_bytes_out": "numeric",
        "created_at": "timestamptz",
        "updated_at": "timestamptz",
        "duration_sketch": "bytea",  # addition
    },
    "usage_events": {
        "time": "timestamptz",
        "org_id": "uuid",
        "project_id": "uuid",
        "user_id": "varchar",
        "api_key_id": "uuid",
        "request_id": "uuid",
        "event_type": "varchar",
        "model": "varchar",
        "input_tokens": "int4",
        "output_tokens": "int4",
        "cache_read_tokens": "int4",
        "cache_write_tokens": "int4",
        "cost_cents": "int4",
        "latency_ms": "int4",
        "time_to_first_token_ms": "int4",
        "mcp_server_id": "uuid",
        "mcp_tool_name": "varchar",
        "status": "varchar",
        "error_code": "varchar",
        "error_message": "text",
        "metadata": "jsonb",
    },
    "mcp_usage": {
        "time": "timestamptz",
        "org_id": "uuid",
        "project_id": "uuid",
        "user_id": "varchar",
        "server_id": "uuid",
        "tool_name": "varchar",
        "request_id": "uuid",
        "parent_request_id": "uuid",
        "latency_ms": "int4",
        "status": "varchar",
        "error_message": "text",
        "input_size": "int4",
        "output_size": "int4",
        "metadata": "jsonb",
    },
}
_USAGE_METRICS = {
    "request_count": "int8",
    "success_count": "int8",
    "error_count": "int8",
    "total_input_tokens": "numeric",  # NUMERIC(38,0) since 0005
    "total_output_tokens": "numeric",
    "total_cache_read_tokens": "numeric",
    "total_cost_cents": "numeric",
    "avg_latency_ms": "float8",
    "p50_latency_ms": "float8",
    "p95_latency_ms": "float8",
    "p99_latency_ms": "float8",
    "unique_users": "int8",
    "latency_sketch": "bytea",
}
SEED_TABLES["usage_hourly"] = {
    "bucket": "timestamptz",
    "org_id": "uuid",
    "project_id": "uuid",
    "model": "varchar",
    **_USAGE_METRICS,
}
SEED_TABLES["usage_daily"] = {
    "bucket": "timestamptz",
    "org_id": "uuid",
    "project_id": "uuid",
    "model": "varchar",
    "user_id": "varchar",
    **_USAGE_METRICS,
}

SEED_ENUMS = {
    "protocol_enum": ["stdio", "http", "https", "websocket", "sse"],
    "server_status_enum": ["active", "inactive", "unhealthy", "maintenance"],
    "session_status_enum": ["initializing", "active", "closed", "error"],
    "proc_status_enum": ["starting", "running", "stopped", "error"],
    "health_status_enum": ["healthy", "unhealthy", "timeout", "error"],
    "storage_provider_enum": ["s3", "gcs", "azure", "cloudwatch", "loki", "elastic", "clickhouse"],
    "log_level_enum": ["trace", "debug", "info", "warn", "error", "fatal"],
    "plan_type_enum": ["free", "pro", "enterprise"],
    "rate_limit_scope_enum": ["global", "server", "user", "ip"],
    "aggregation_window_enum": ["hourly", "daily"],
    "adapter_type_enum": ["REST", "GraphQL", "gRPC", "SOAP"],
}
SEED_TRIGGERS = {
    ("organizations", "organizations_updated_at"),
    ("mcp_servers", "mcp_servers_updated_at"),
    ("mcp_sessions", "mcp_sessions_updated_at"),
    ("virtual_servers", "virtual_servers_updated_at"),
    ("server_stats", "server_stats_updated_at"),
    ("rate_limits", "rate_limits_updated_at"),
    ("rate_limit_usage", "rate_limit_usage_updated_at"),
    ("log_aggregates", "log_aggregates_updated_at"),
}
# Every seed index except those docs/schema.md drops with a reason (the NOW()-predicate cleanup
# indexes, the log_index ones not worth their insert cost, and the usage tables' that no query
# reads: migration 0012).
SEED_INDEXES = {
    "idx_health_checks_server_time",
    "idx_audit_logs_org_time",
    "idx_audit_logs_resource",
    "idx_audit_logs_virtual_server",
    "idx_log_aggregates_org_window",
    "idx_log_aggregates_server_window",
    "idx_mcp_servers_org_active",
    "idx_mcp_servers_org_status",
    "idx_mcp_sessions_server_status",
    "idx_mcp_sessions_org_active",
    "idx_virtual_servers_org_active",
    "idx_virtual_servers_adapter_type",
    "idx_virtual_servers_name",
    "idx_rate_limit_usage_cleanup",
    "idx_log_aggregates_dashboard",
    "idx_mcp_sessions_client_id",
    "idx_log_index_org_time",
    "idx_log_index_server_time",
    "idx_log_index_session",
    "idx_log_index_errors",
    "idx_log_index_client_id",
    "idx_usage_events_org_time",
}
# Migration 0012: the raw usage tables keep one index each, the one the organization's retention
# delete and the mcp_usage_hourly view read (docs/schema.md "Usage indexes").
USAGE_INDEXES = {
    "usage_events": ("idx_usage_events_org_time", 'btree (org_id, "time" DESC)'),
    "mcp_usage": ("idx_mcp_usage_org_time", 'btree (org_id, "time" DESC)'),
}
DEFAULT_ORG = "00000000-0000-0000-0000-000000000000"


def _all_migration_names() -> list[str]:
    return sorted(p.stem for p in MIGRATIONS_DIR.glob("*.sql"))


async def test_empty_database_gets_the_full_schema(fresh_database_url: str) -> None:
    began = time.perf_counter()
    applied = await migrate(fresh_database_url)
    elapsed = time.perf_counter() - began
    print(f"migrate on an empty database: {elapsed:.2f} s")  # reported with -s
    assert applied == _all_migration_names()
    assert applied[:2] == ["0001_omnimesh", "0002_usage"]

    conn = await asyncpg.connect(fresh_database_url)
    try:
        rows = await conn.fetch(
            "SELECT table_name, column_name, udt_name FROM information_schema.columns "
            "WHERE table_schema = 'public'"
        )
        actual: dict[str, dict[str, str]] = {}
        for row in rows:
            actual.setdefault(row["table_name"], {})[row["column_name"]] = row["udt_name"]
        for table, columns in SEED_TABLES.items():
            assert table in actual, f"missing table {table}"
            for column, udt in columns.items():
                assert actual[table].get(column) == udt, (
                    f"{table}.{column}: {actual[table].get(column)} != {udt}"
                )

        enums = await conn.fetch(
            "SELECT t.typname, array_agg(e.enumlabel ORDER BY e.enumsortorder) AS labels "
            "FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid GROUP BY t.typname"
        )
        assert {r["typname"]: list(r["labels"]) for r in enums} == SEED_ENUMS

        triggers = await conn.fetch(
            "SELECT tgrelid::regclass::text AS t, tgname FROM pg_trigger WHERE NOT tgisinternal"
        )
        assert {(r["t"], r["tgname"]) for r in triggers} >= SEED_TRIGGERS

        indexes = {
            r["indexname"]
            for r in await conn.fetch("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")
        }
        assert indexes >= SEED_INDEXES, SEED_INDEXES - indexes

        views = {
            r["table_name"]
            for r in await conn.fetch(
                "SELECT table_name FROM information_schema.views WHERE table_schema = 'public'"
            )
        }
        assert {"active_sessions", "server_health_summary"} <= views
        await conn.fetch("SELECT * FROM active_sessions")
        await conn.fetch("SELECT * FROM server_health_summary")

        extensions = {r["extname"] for r in await conn.fetch("SELECT extname FROM pg_extension")}
        assert {"uuid-ossp", "pgcrypto", "citext"} <= extensions

        org = await conn.fetchrow("SELECT * FROM organizations WHERE id = $1", DEFAULT_ORG)
        assert org is not None
        assert (
            org["slug"],
            org["plan_type"],
            org["max_servers"],
            org["max_sessions"],
            org["log_retention_days"],
        ) == (
            "default-org",
            "enterprise",
            1000,
            10000,
            365,
        )
        limit = await conn.fetchrow("SELECT * FROM rate_limits WHERE organization_id = $1", DEFAULT_ORG)
        assert limit is not None
        assert (
            limit["scope"],
            limit["requests_per_minute"],
            limit["requests_per_hour"],
            limit["requests_per_day"],
        ) == (
            "global",
            1000,
            10000,
            100000,
        )

        partitioned = {
            r["t"]: r["key"]
            for r in await conn.fetch(
                "SELECT partrelid::regclass::text AS t, pg_get_partkeydef(partrelid) AS key "
                "FROM pg_partitioned_table"
            )
        }
        assert partitioned == {
            "log_index": "RANGE (started_at)",
            "usage_events": 'RANGE ("time")',
            "mcp_usage": 'RANGE ("time")',
            "health_checks": "RANGE (checked_at)",
        }
        pk = await conn.fetchval(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = 'log_index'::regclass AND contype = 'p'"
        )
        assert pk == "PRIMARY KEY (id, started_at)"
        ledger = await conn.fetch(
            "SELECT version, name, checksum, backend FROM schema_migrations ORDER BY version"
        )
        assert [r["name"] for r in ledger] == applied
        assert {r["backend"] for r in ledger} == {Backend.NATIVE.value}
        assert all(len(r["checksum"]) == 64 for r in ledger)
    finally:
        await conn.close()


async def test_null_means_all_rollup_rows_upsert(fresh_database_url: str) -> None:
    await migrate(fresh_database_url)
    conn = await asyncpg.connect(fresh_database_url)
    try:
        upsert = (
            "INSERT INTO log_aggregates "
            "(organization_id, server_id, rpc_method, window_type, window_start, total_requests) "
            "VALUES ($1, NULL, NULL, 'hourly', '2025-01-01T00:00:00Z', $2) "
            "ON CONFLICT (organization_id, server_id, rpc_method, window_type, window_start) "
            "DO UPDATE SET total_requests = log_aggregates.total_requests + EXCLUDED.total_requests"
        )
        await conn.execute(upsert, DEFAULT_ORG, 3)
        await conn.execute(upsert, DEFAULT_ORG, 4)
        assert await conn.fetchval("SELECT array_agg(total_requests) FROM log_aggregates") == [7]
        for table, key in (
            ("usage_hourly", "bucket, org_id, project_id, model"),
            ("usage_daily", "bucket, org_id, project_id, model, user_id"),
        ):
            statement = (
                f"INSERT INTO {table} (bucket, org_id, request_count) VALUES ('2025-01-01T00:00:00Z', $1, 1) "
                f"ON CONFLICT ({key}) DO UPDATE SET request_count = {table}.request_count + 1"
            )
            await conn.execute(statement, DEFAULT_ORG)
            await conn.execute(statement, DEFAULT_ORG)
            assert await conn.fetchval(f"SELECT array_agg(request_count) FROM {table}") == [2]
    finally:
        await conn.close()


async def test_second_run_is_a_no_op(fresh_database_url: str) -> None:
    await migrate(fresh_database_url)
    conn = await asyncpg.connect(fresh_database_url)
    try:
        before = await conn.fetch("SELECT * FROM schema_migrations ORDER BY version")
        assert await migrate(fresh_database_url) == []
        assert await conn.fetch("SELECT * FROM schema_migrations ORDER BY version") == before
    finally:
        await conn.close()


async def test_concurrent_runs_both_succeed_and_apply_once(fresh_database_url: str) -> None:
    first, second = await asyncio.gather(migrate(fresh_database_url), migrate(fresh_database_url))
    assert sorted([first, second], key=len) == [[], _all_migration_names()]
    conn = await asyncpg.connect(fresh_database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(_all_migration_names())
    finally:
        await conn.close()


def _copy_migrations(tmp_path: Path) -> Path:
    directory = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, directory)
    return directory


async def test_changed_applied_file_is_refused(fresh_database_url: str, tmp_path: Path) -> None:
    directory = _copy_migrations(tmp_path)
    await migrate(fresh_database_url, directory=directory)
    path = directory / "0002_usage.sql"
    path.write_text(path.read_text() + "\n-- edited after it was applied\n")
    (directory / "0099_new.sql").write_text("CREATE TABLE must_not_appear (x int);")
    with pytest.raises(MigrationError, match=r"0002_usage\.sql changed after it was applied"):
        await migrate(fresh_database_url, directory=directory)
    conn = await asyncpg.connect(fresh_database_url)
    try:
        assert await conn.fetchval("SELECT to_regclass('must_not_appear')") is None
    finally:
        await conn.close()


async def test_failed_file_leaves_no_trace_and_earlier_files_stay(
    fresh_database_url: str, tmp_path: Path
) -> None:
    directory = tmp_path / "m"
    directory.mkdir()
    (directory / "0001_ok.sql").write_text("CREATE TABLE first_table (x int);")
    (directory / "0002_broken.sql").write_text(
        "CREATE TABLE second_table (x int);\nSELECT no_such_function();"
    )
    with pytest.raises(MigrationError, match=r"0002_broken\.sql failed"):
        await migrate(fresh_database_url, directory=directory)
    conn = await asyncpg.connect(fresh_database_url)
    try:
        assert await conn.fetchval("SELECT to_regclass('first_table')") is not None
        assert await conn.fetchval("SELECT to_regclass('second_table')") is None
        assert [r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")] == ["0001_ok"]
    finally:
        await conn.close()
    (directory / "0002_broken.sql").write_text("CREATE TABLE second_table (x int);")
    assert await migrate(fresh_database_url, directory=directory) == ["0002_broken"]


async def test_timescale_path_is_taken_when_the_probe_reports_it(fresh_database_url: str) -> None:
    async def timescale_available(conn: asyncpg.Connection) -> Backend:
        return Backend.TIMESCALEDB

    # The extension is not installable here, so choosing the TimescaleDB path must end in
    # CREATE EXTENSION timescaledb failing, with nothing recorded.
    with pytest.raises(MigrationError, match="timescaledb"):
        await migrate(fresh_database_url, probe=timescale_available)
    conn = await asyncpg.connect(fresh_database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == 0
        assert await conn.fetchval("SELECT to_regclass('log_index')") is None
    finally:
        await conn.close()


async def test_real_probe_chooses_native_here_and_the_choice_sticks(
    fresh_database_url: str, tmp_path: Path
) -> None:
    directory = _copy_migrations(tmp_path)
    assert await migrate(fresh_database_url, directory=directory)  # real probe: no timescaledb here

    async def must_not_probe(conn: asyncpg.Connection) -> Backend:
        raise AssertionError("the backend of a migrated database is recorded, not probed again")

    (directory / "0099_more.sql").write_text("CREATE TABLE later_table (x int);")
    assert await migrate(fresh_database_url, directory=directory, probe=must_not_probe) == ["0099_more"]
    conn = await asyncpg.connect(fresh_database_url)
    try:
        assert await conn.fetchval("SELECT count(DISTINCT backend) FROM schema_migrations") == 1
        assert await conn.fetchval("SELECT min(backend) FROM schema_migrations") == "native"
    finally:
        await conn.close()


async def test_migrate_command_applies_then_reports_up_to_date(fresh_database_url: str) -> None:
    env = {**os.environ, "OMNILOG_DATABASE_URL": fresh_database_url}
    outputs = []
    for _ in range(2):
        process = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "omnilog"),
            "migrate",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        assert process.returncode == 0, err.decode()
        outputs.append(out.decode())
    assert [line for line in outputs[0].splitlines() if line.startswith("applied ")] == [
        f"applied {name}" for name in _all_migration_names()
    ]
    assert "schema up to date" in outputs[1]
    assert "created 0 partition(s)" in outputs[1]


def _index_shape(definition: str) -> str:
    """`btree (org_id, "time" DESC)` out of a full CREATE INDEX statement."""
    return definition.split(" USING ", 1)[1]


async def test_usage_tables_keep_only_their_organization_index_on_existing_partitions(
    fresh_database_url: str, tmp_path: Path
) -> None:
    # A database migrated before 0012, with day partitions holding rows, then upgraded: the
    # partitions' indexes follow the parent's (dropped with it, the new one built and attached).
    directory = tmp_path / "before_0012"
    directory.mkdir()
    for path in MIGRATIONS_DIR.glob("*.sql"):
        if int(path.name[:4]) < 12:
            shutil.copy(path, directory / path.name)
    await migrate(fresh_database_url, directory=directory)
    conn = await asyncpg.connect(fresh_database_url)
    try:
        created = await create_ahead(conn, 1)
        day = created["mcp_usage"][0]
        at = datetime(day.year, day.month, day.day, 12, tzinfo=UTC)
        await conn.execute(
            "INSERT INTO mcp_usage (time, org_id, server_id, tool_name, request_id, status) "
            "VALUES ($1, $2, $3, 'search', $4, 'success')",
            at,
            uuid.UUID(DEFAULT_ORG),
            uuid.uuid4(),
            uuid.uuid4(),
        )
        await conn.execute(
            "INSERT INTO usage_events (time, org_id, request_id, model) VALUES ($1, $2, $3, 'gpt-4o')",
            at,
            uuid.UUID(DEFAULT_ORG),
            uuid.uuid4(),
        )
        # 0012 and every migration after it run on the existing partitions.
        later = sorted(p.stem for p in MIGRATIONS_DIR.glob("*.sql") if int(p.name[:4]) >= 12)
        assert await migrate(fresh_database_url) == later

        for table, (name, shape) in USAGE_INDEXES.items():
            parent = await conn.fetch(
                "SELECT c.relname, pg_get_indexdef(i.indexrelid) AS def FROM pg_index i "
                "JOIN pg_class c ON c.oid = i.indexrelid WHERE i.indrelid = $1::regclass",
                table,
            )
            assert [(r["relname"], _index_shape(r["def"])) for r in parent] == [(name, shape)]
            partition = f"{table}_p{day:%Y%m%d}"
            children = await conn.fetch(
                "SELECT pg_get_indexdef(i.indexrelid) AS def, i.indisvalid, "
                "(SELECT inhparent::regclass::text FROM pg_inherits WHERE inhrelid = i.indexrelid) AS parent "
                "FROM pg_index i WHERE i.indrelid = $1::regclass",
                partition,
            )
            assert [(_index_shape(r["def"]), r["indisvalid"], r["parent"]) for r in children] == [
                (shape, True, name)
            ], partition

            # The organization's retention delete (sinks/janitor.py) can read it by index.
            async with conn.transaction():
                await conn.execute("SET LOCAL enable_seqscan = off")
                plan = "\n".join(
                    r[0]
                    for r in await conn.fetch(
                        f"EXPLAIN SELECT tableoid, ctid FROM {table} WHERE org_id = $1 AND time < $2",
                        uuid.UUID(DEFAULT_ORG),
                        at + timedelta(days=1),
                    )
                )
            assert "Seq Scan" not in plan, plan
    finally:
        await conn.close()
