"""Rollups a continuous aggregate can express, per backend (see sinks/timescale.py).

Percentile rollups cannot be continuous aggregates without the Timescale Toolkit (a stored
`percentile_cont` cannot be merged into a daily value), and `COUNT(DISTINCT)` is not allowed in
one, so `log_aggregates` and the usage rollups stay tables kept by the merger on both backends
(docs/aggregates.md). What *can* be one is a rollup of plain counts and sums: `mcp_usage_hourly`,
calls per (hour, org, server, tool) from `mcp_usage`.

- TimescaleDB: a continuous aggregate with real-time aggregation on (off by default since 2.13;
  on, the freshness of the rest holds here too), refreshed by a policy whose `start_offset`
  covers the longest accepted lateness (`OMNILOG_MAX_EVENT_AGE_DAYS`), so late events are folded
  in; compressed after 7 days like the raw rows.
- Native PostgreSQL: a plain view with the same name and columns, computed on read. It reads
  as its caller (`security_invoker`), so the row security of `mcp_usage` (migration 0008)
  applies to whoever queries it; as the owner's view it would show every organization.
- TimescaleDB with row security on `mcp_usage`: TimescaleDB refuses a continuous aggregate on a
  hypertable with row security ("cannot create continuous aggregate on hypertable with row
  security"), and 0008 enables it on every uncompressed tenant table. Row security wins: the
  rollup is then the same plain view as on native PostgreSQL, computed on read from the
  (protected) raw rows. Proven on a real TimescaleDB in tests/timescale.

`rollup_statements` generates the statements (parsed with pglast in the unit tests);
`ensure_rollup_views` applies them once (idempotent), from the merger.
"""

from __future__ import annotations

from typing import Final

from sinks.db import Connection
from sinks.timescale import COMPRESS_AFTER_DAYS, Backend

MCP_USAGE_HOURLY: Final = "mcp_usage_hourly"

_SELECT = """
SELECT {bucket} AS bucket, org_id, server_id, tool_name,
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
GROUP BY {group}, org_id, server_id, tool_name
"""


def rollup_statements(backend: Backend, max_event_age_days: int, *, row_security: bool = False) -> list[str]:
    """The statements creating the rollup on `backend`; `row_security`: mcp_usage has it enabled
    (then TimescaleDB cannot aggregate it continuously: the plain view is used there too)."""
    if backend is Backend.NATIVE or row_security:
        select = _SELECT.format(bucket="date_trunc('hour', time)", group="1")
        view = f"CREATE OR REPLACE VIEW {MCP_USAGE_HOURLY} WITH (security_invoker = true)"
        return [f"{view} AS {select.strip()}"]
    select = _SELECT.format(bucket="time_bucket(INTERVAL '1 hour', time)", group="1")
    lateness = max_event_age_days + 1
    return [
        f"CREATE MATERIALIZED VIEW IF NOT EXISTS {MCP_USAGE_HOURLY} "
        "WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS "
        f"{select.strip()} WITH NO DATA",
        f"SELECT add_continuous_aggregate_policy('{MCP_USAGE_HOURLY}', "
        f"start_offset => INTERVAL '{lateness} days', end_offset => INTERVAL '1 hour', "
        "schedule_interval => INTERVAL '5 minutes', if_not_exists => TRUE)",
        f"ALTER MATERIALIZED VIEW {MCP_USAGE_HOURLY} SET (timescaledb.compress = true)",
        f"SELECT add_compression_policy('{MCP_USAGE_HOURLY}', "
        f"compress_after => INTERVAL '{max(COMPRESS_AFTER_DAYS, lateness + 1)} days', if_not_exists => TRUE)",
    ]


_ROW_SECURITY = "SELECT relrowsecurity FROM pg_class WHERE oid = to_regclass($1)"

# pg_advisory_xact_lock key serialising workers that create the views at the same time.
_LOCK_KEY: Final = 0x6F6D6E69766577  # "omniview"


async def ensure_rollup_views(conn: Connection, max_event_age_days: int) -> Backend:
    """Create the continuous aggregate (or the native view) if missing; returns the backend
    recorded by the migrations (a database never mixes the two)."""
    recorded = await conn.fetchval("SELECT backend FROM schema_migrations ORDER BY version LIMIT 1")
    backend = Backend(recorded) if recorded else Backend.NATIVE
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        if await conn.fetchval("SELECT to_regclass($1) IS NULL", MCP_USAGE_HOURLY):
            row_security = bool(await conn.fetchval(_ROW_SECURITY, "mcp_usage"))
            for statement in rollup_statements(backend, max_event_age_days, row_security=row_security):
                await conn.execute(statement)
    return backend
