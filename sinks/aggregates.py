"""Aggregates: the pieces the ingest worker plugs in, and the read side of the rollups.

- `build_extensions()`: the batch extensions (usage rows, aggregate deltas), run inside the batch
  transaction on the events seen for the first time (sinks/usage.py, sinks/aggregate_parts.py);
- `build_merger_loop(settings)`: the merger loop of `omnilog merge` (sinks/merger.py);
- `build_merger(settings)`: a worker's in-process merger, on a thread of its own;
- `query_log_aggregates` / `query_usage` / `query_server_stats` / `query_usage_monthly`: rows for
  `omnilog aggregates show | usage | servers | monthly`.

Design, key sentinels, error bounds and measurements: docs/aggregates.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

import asyncpg

from pipeline.settings import Settings
from sinks.aggregate_parts import (
    DEFAULT_SERVER_WINDOW_S,
    NO_METHOD,
    NO_PROJECT,
    NO_SERVER,
    NO_USER,
    AggregateDeltasWriter,
)
from sinks.db import Connection
from sinks.index import BatchExtension
from sinks.merger import MergerLoop, MergerThread, merge_pass, merge_until_clean, shards_of
from sinks.usage import UsageRowsWriter

__all__ = [
    "NO_METHOD",
    "NO_PROJECT",
    "NO_SERVER",
    "NO_USER",
    "AggregatesQuery",
    "build_extensions",
    "build_merger",
    "build_merger_loop",
    "merge_pass",
    "merge_until_clean",
    "query_log_aggregates",
    "query_server_stats",
    "query_usage",
    "query_usage_monthly",
]

Window = Literal["hourly", "daily"]
Level = Literal["org", "server", "method"]


def build_extensions(server_window_s: int = DEFAULT_SERVER_WINDOW_S) -> list[BatchExtension]:
    """ValueError for a server window that does not divide a day."""
    return [UsageRowsWriter(), AggregateDeltasWriter(server_window_s)]


def build_merger_loop(settings: Settings) -> MergerLoop:
    """The merger loop of the settings' shard (OMNILOG_MERGE_SHARD of OMNILOG_MERGE_SHARDS), or of
    every shard in turn when no shard index is set. ValueError for an index out of range."""
    return MergerLoop(
        settings.merge_interval_s,
        settings.max_event_age_days,
        retry_max_s=settings.retry_max_s,
        shards=shards_of(settings.merge_shards, settings.merge_shard),
    )


def build_merger(settings: Settings) -> MergerThread:
    """A worker's background merger: the loop on a thread and event loop of its own."""
    return MergerThread(build_merger_loop(settings), settings.database_url.get_secret_value())


@dataclass(frozen=True, slots=True)
class AggregatesQuery:
    organization_id: str
    window: Window
    since: datetime
    until: datetime
    level: Level = "org"
    server_id: str | None = None  # a server, or NO_SERVER for events without one
    rpc_method: str | None = None  # a method, or NO_METHOD for events without one


_LOG_SELECT = """
SELECT window_start, organization_id::text AS organization_id, server_id::text AS server_id,
       rpc_method, total_requests, success_requests, error_requests, p50_duration_ms,
       p95_duration_ms, p99_duration_ms, avg_duration_ms, total_bytes_in, total_bytes_out, updated_at
FROM log_aggregates
WHERE organization_id = $1 AND window_type = $2::aggregation_window_enum
  AND window_start >= $3 AND window_start < $4
"""


def log_query_sql(query: AggregatesQuery) -> tuple[str, list[Any]]:
    """The SELECT of `query`'s rows: the level fixes which key columns are NULL ("all")."""
    sql = _LOG_SELECT
    args: list[Any] = [query.organization_id, query.window, query.since, query.until]
    if query.level == "org":
        sql += " AND server_id IS NULL AND rpc_method IS NULL"
    elif query.level == "server":
        sql += " AND server_id IS NOT NULL AND rpc_method IS NULL"
    else:
        sql += " AND server_id IS NOT NULL AND rpc_method IS NOT NULL"
    if query.server_id is not None and query.level != "org":
        args.append(query.server_id)
        sql += f" AND server_id = ${len(args)}::uuid"
    if query.rpc_method is not None and query.level == "method":
        args.append(query.rpc_method)
        sql += f" AND rpc_method = ${len(args)}"
    return sql + " ORDER BY window_start, server_id NULLS FIRST, rpc_method NULLS FIRST", args


def _plain_rows(rows: Iterable[asyncpg.Record]) -> list[dict[str, Any]]:
    """Rows as dicts, the NUMERIC(38,0) sums as ints (JSON numbers, not Decimal strings)."""
    return [
        {k: int(v) if isinstance(v, Decimal) and v == v.to_integral_value() else v for k, v in row.items()}
        for row in rows
    ]


async def query_log_aggregates(conn: Connection, query: AggregatesQuery) -> list[dict[str, Any]]:
    sql, args = log_query_sql(query)
    return _plain_rows(await conn.fetch(sql, *args))


async def query_usage(
    conn: Connection, organization_id: str, window: Window, since: datetime, until: datetime
) -> list[dict[str, Any]]:
    """Usage rollup rows of an organization (daily: the all-users rows)."""
    table, users = ("usage_hourly", "") if window == "hourly" else ("usage_daily", " AND user_id IS NULL")
    rows = await conn.fetch(
        f"SELECT bucket, project_id::text AS project_id, model, request_count, success_count, error_count, "
        "total_input_tokens, total_output_tokens, total_cache_read_tokens, total_cost_cents, "
        "avg_latency_ms, p50_latency_ms, p95_latency_ms, p99_latency_ms, unique_users "
        f"FROM {table} WHERE org_id = $1 AND bucket >= $2 AND bucket < $3{users} "
        "ORDER BY bucket, project_id, model",
        organization_id,
        since,
        until,
    )
    return _plain_rows(rows)


async def query_server_stats(
    conn: Connection, organization_id: str, since: datetime, until: datetime, server_id: str | None = None
) -> list[dict[str, Any]]:
    """server_stats windows of an organization's registered servers (or one of them)."""
    rows = await conn.fetch(
        "SELECT s.window_start, s.window_end, s.server_id::text AS server_id, m.name AS server_name, "
        "s.total_requests, s.success_requests, s.error_requests, s.active_sessions, "
        "s.avg_response_time_ms, s.min_response_time_ms, s.max_response_time_ms "
        "FROM server_stats s JOIN mcp_servers m ON m.id = s.server_id "
        "WHERE m.organization_id = $1 AND s.window_start >= $2 AND s.window_start < $3 "
        "AND ($4::uuid IS NULL OR s.server_id = $4::uuid) ORDER BY s.window_start, m.name, s.server_id",
        organization_id,
        since,
        until,
        server_id,
    )
    return _plain_rows(rows)


async def query_usage_monthly(
    conn: Connection, organization_id: str, since: datetime, until: datetime
) -> list[dict[str, Any]]:
    """usage_monthly rows of an organization whose month starts in [since's month, until)."""
    rows = await conn.fetch(
        "SELECT month, project_id::text AS project_id, model, request_count, success_count, error_count, "
        "total_input_tokens, total_output_tokens, total_cache_read_tokens, total_cost_cents, unique_users, "
        "active_days, avg_latency_ms, p50_latency_ms, p95_latency_ms, p99_latency_ms FROM usage_monthly "
        "WHERE org_id = $1 AND month >= date_trunc('month', $2::timestamptz, 'UTC') AND month < $3 "
        "ORDER BY month, project_id, model",
        organization_id,
        since,
        until,
    )
    return _plain_rows(rows)
