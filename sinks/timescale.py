"""The TimescaleDB variant of the time-partitioned tables: detection and generated statements.

Every statement of this path is generated here as text: parsed with a PostgreSQL parser in
tests/unit/test_timescale_sql.py, and executed on a real TimescaleDB (2.23, compiled to
WebAssembly, PostgreSQL 17) in tests/timescale, whose results are compared with native
partitions on PostgreSQL 15 (docs/schema.md, "The TimescaleDB test tier"). The runner's choice
between this and native partitions is made by one probe (`detect_backend`) that tests can replace.
"""

from __future__ import annotations

import enum
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING

from sinks.db import Connection

if TYPE_CHECKING:
    from sinks.partitions import TimePartitioned

# Raw rows are compressed once no longer hot (the seed's MindWeave policy: after 7 days). Late
# events can still be inserted into compressed chunks (TimescaleDB >= 2.11), only slower.
COMPRESS_AFTER_DAYS = 7

# The background retention policy drops chunks without advancing the retention horizon
# (sinks/retention.py), so for the tables that follow the horizon it keeps this many days more
# than the retention: `omnilog maintain` (hourly) advances the horizon and drops those days
# itself first, and the policy only acts, one day behind, if maintenance stops.
POLICY_LAG_DAYS = 1


class Backend(enum.Enum):
    NATIVE = "native"
    TIMESCALEDB = "timescaledb"


_PROBE = """
SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') AS available,
       EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') AS installed,
       current_setting('shared_preload_libraries') AS preload
"""


def choose_backend(available: bool, installed: bool, preload: str) -> Backend:
    """TimescaleDB when it is installed, or available and preloaded (CREATE EXTENSION would fail
    otherwise: the library must be in shared_preload_libraries); native partitions if not."""
    if installed:
        return Backend.TIMESCALEDB
    preloaded = "timescaledb" in {p.strip().strip('"') for p in preload.split(",")}
    return Backend.TIMESCALEDB if available and preloaded else Backend.NATIVE


async def detect_backend(conn: Connection) -> Backend:
    row = await conn.fetchrow(_PROBE)
    assert row is not None
    return choose_backend(bool(row["available"]), bool(row["installed"]), str(row["preload"] or ""))


CREATE_EXTENSION = "CREATE EXTENSION IF NOT EXISTS timescaledb"


def _interval(days: int) -> str:
    return f"INTERVAL '{days} days'" if days != 1 else "INTERVAL '1 day'"


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def policy_retention_days(spec: TimePartitioned, retention_days: int) -> int:
    """What the background retention policy of `spec` keeps (a fixed retention is kept as is)."""
    if spec.fixed_retention_days is not None:
        return spec.fixed_retention_days
    return retention_days + POLICY_LAG_DAYS


def hypertable_statements(spec: TimePartitioned, retention_days: int) -> list[str]:
    """Turn the (empty, plain) table of `spec` into a hypertable with its policies."""
    table = _literal(spec.table)
    chunk = "INTERVAL '1 day'" if spec.period == "day" else "INTERVAL '1 month'"
    keep = policy_retention_days(spec, retention_days)
    statements = [
        f"SELECT create_hypertable({table}, {_literal(spec.column)}, "
        f"chunk_time_interval => {chunk}, if_not_exists => TRUE)",
    ]
    if spec.compress_segment_by:
        segment_by = ", ".join(spec.compress_segment_by)
        statements += [
            f'ALTER TABLE "{spec.table}" SET (timescaledb.compress, '
            f"timescaledb.compress_segmentby = {_literal(segment_by)}, "
            f"timescaledb.compress_orderby = {_literal(spec.column + ' DESC')})",
            f"SELECT add_compression_policy({table}, {_interval(COMPRESS_AFTER_DAYS)}, "
            "if_not_exists => TRUE)",
        ]
    statements.append(f"SELECT add_retention_policy({table}, {_interval(keep)}, if_not_exists => TRUE)")
    return statements


def retention_policy_statements(spec: TimePartitioned, retention_days: int) -> list[str]:
    """Replace the table's retention policy (used by `omnilog maintain` when retention changes)."""
    table = _literal(spec.table)
    keep = policy_retention_days(spec, retention_days)
    return [
        f"SELECT remove_retention_policy({table}, if_exists => TRUE)",
        f"SELECT add_retention_policy({table}, {_interval(keep)}, if_not_exists => TRUE)",
    ]


CHUNKS_BEFORE = """
SELECT range_start, range_end FROM timescaledb_information.chunks
WHERE hypertable_name = $1 AND range_end <= $2
"""
DROP_CHUNKS = "SELECT drop_chunks($1::regclass, older_than => $2::timestamptz)"


async def drop_chunks_before(conn: Connection, table: str, cutoff: date) -> list[date]:
    """Drop the chunks entirely before `cutoff` (UTC midnight); return the days they covered.

    For the tables that follow the retention horizon the caller passes the horizon in force, after
    committing it (sinks.partitions.drop_expired): a chunk is dropped only once no batch can write
    into it again, since an insert would otherwise silently create it anew."""
    limit = datetime.combine(cutoff, time(), tzinfo=UTC)
    rows = await conn.fetch(CHUNKS_BEFORE, table, limit)
    await conn.execute(DROP_CHUNKS, table, limit)
    days: set[date] = set()
    for row in rows:
        day = row["range_start"].astimezone(UTC).date()
        while datetime.combine(day, time(), tzinfo=UTC) < row["range_end"]:
            days.add(day)
            day += timedelta(days=1)
    return sorted(days)
