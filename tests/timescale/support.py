"""What the TimescaleDB tier runs on both servers: realistic events, the project's batch
transaction with INSERT standing in for COPY, and the project's read queries.

COPY ... FROM STDIN crashes the WebAssembly engine of the test server, so `InsertForCopy` wraps a
connection and turns `copy_records_to_table` (the batch transaction's staging COPY in
sinks/index.py, the usage rows' COPY in sinks/usage.py) into one multi-row INSERT with the same
columns and records. Everything else (the statements, their order, the transaction) is the
project's own code, run unchanged; the same wrapper is used on PostgreSQL 15, so both servers see
the same statements.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any, cast

import asyncpg
import orjson

from consumers.ingest.factory import partition_ensurer
from pipeline.contract import ValidationPolicy, ValidEvent, validate_event
from pipeline.processing.offsets import PartitionRange
from pipeline.processing.store import IndexedEvent, ObjectRecord
from sinks.aggregate_timescale import MCP_USAGE_HOURLY
from sinks.aggregates import AggregatesQuery, build_extensions, query_log_aggregates, query_usage
from sinks.db import Connection
from sinks.index import commit_batch, init_offsets
from sinks.partitions import PartitionCache
from sinks.readpath import QueryFilter, find_pointer, query_index
from sinks.retention import lock_horizon

POLICY = ValidationPolicy(timedelta(days=90), timedelta(hours=1))
GROUP, TOPIC = "timescale-tier", "gateway.requests.v1"
ORGS = [str(uuid.UUID(int=0x7A000 + i)) for i in range(3)]
SERVERS = [None, str(uuid.UUID(int=0x7B001)), str(uuid.UUID(int=0x7B002))]
SESSIONS = [None, str(uuid.UUID(int=0x7C001)), str(uuid.UUID(int=0x7C002))]
METHODS = [None, "tools/call", "resources/read", "initialize"]
PROJECTS = [None, str(uuid.UUID(int=0x7D001))]


class InsertForCopy:
    """A connection whose COPY of records is an INSERT of the same rows (see module docstring)."""

    def __init__(self, conn: asyncpg.Connection[Any]) -> None:
        self._conn = conn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    async def copy_records_to_table(
        self, table_name: str, *, records: Sequence[Sequence[object]], columns: Sequence[str]
    ) -> str:
        width = len(columns)
        cols = ", ".join(f'"{c}"' for c in columns)
        # Chunks keep every statement under PostgreSQL's 65535 bind parameters.
        per_statement = max(1, 60000 // width)
        for first in range(0, len(records), per_statement):
            chunk = records[first : first + per_statement]
            rows = (", ".join(f"${i * width + j + 1}" for j in range(width)) for i in range(len(chunk)))
            values = ", ".join(f"({row})" for row in rows)
            args = [value for record in chunk for value in record]
            await self._conn.execute(f'INSERT INTO "{table_name}" ({cols}) VALUES {values}', *args)
        return f"COPY {len(records)}"


def as_connection(conn: asyncpg.Connection[Any]) -> Connection:
    return cast(Connection, InsertForCopy(conn))


def _stamp(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_event(rng: random.Random, started: datetime, org: str | None = None) -> ValidEvent:
    """A gateway event as the SDK sends it, validated by the project's own validator."""
    status = rng.choice([200, 200, 200, 201, 404, 500])
    body: dict[str, Any] = {
        "event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "organization_id": org or rng.choice(ORGS),
        "started_at": _stamp(started),
        "duration_ms": rng.choice([0, int(rng.lognormvariate(4, 1.2))]),
        "server_id": rng.choice(SERVERS),
        "session_id": rng.choice(SESSIONS),
        "status_code": status,
        "level": "error" if status >= 500 else rng.choice(["info", "info", "debug", "warn"]),
        "bytes_in": rng.randint(0, 5000),
        "bytes_out": rng.randint(0, 90000),
        "rpc_method": rng.choice(METHODS),
        "user_id": f"user-{rng.randint(1, 9)}" if rng.random() < 0.8 else None,
        "remote_ip": rng.choice(["10.0.0.7", "2001:db8::1", None]),
    }
    if rng.random() < 0.6:
        body |= {
            "model": rng.choice(["gpt-x", "claude-y"]),
            "project_id": rng.choice(PROJECTS),
            "input_tokens": rng.randint(0, 2000),
            "output_tokens": rng.randint(0, 900),
            "cost_cents": rng.randint(0, 40),
            "status": rng.choice(["success", "success", "error", "timeout"]),
            "event_type": rng.choice(["api_call", "mcp_tool"]),
        }
        if body["event_type"] == "mcp_tool":
            body["mcp_tool_name"] = rng.choice(["search", "fetch"])
    value = orjson.dumps({k: v for k, v in body.items() if v is not None})
    event = validate_event(value, datetime.now(UTC), POLICY)
    assert isinstance(event, ValidEvent), event
    return event


def make_events(seed: int, count: int, days: float, now: datetime) -> list[ValidEvent]:
    """`count` events spread over the last `days` days (and the current hour), 3 organizations."""
    rng = random.Random(seed)
    return [make_event(rng, now - timedelta(seconds=rng.uniform(0, days * 86400))) for _ in range(count)]


class Batches:
    """Feeds events through the project's batch transaction (`commit_batch` with the usage rows
    and aggregate parts extensions), advancing one partition's stored offset per batch."""

    def __init__(self, partition: int = 0) -> None:
        self.partition = partition
        self.next_offset = 0
        # The worker's own step before a batch: the days' partitions exist (a no-op on hypertables).
        self.ensure_partitions = partition_ensurer(PartitionCache())

    async def write(self, conn: asyncpg.Connection[Any], events: Sequence[ValidEvent]) -> int:
        """Commit one batch; returns how many events were duplicates."""
        db = as_connection(conn)
        await self.ensure_partitions(db, {e.started_at.astimezone(UTC).date() for e in events})
        if self.next_offset == 0:
            await init_offsets(db, GROUP, TOPIC, {self.partition: 0})
        uri = f"s3://omnilog/org/x/date=d/s/{self.partition}-{self.next_offset}.jsonl.gz"
        indexed = [IndexedEvent(e, uri, 100 * i, 100) for i, e in enumerate(events)]
        first = events[0]
        objects = [ObjectRecord(uri, first.organization_id, first.started_at.date(), len(events), 100)]
        end = self.next_offset + len(events)
        outcome = await commit_batch(
            db,
            consumer_group=GROUP,
            topic=TOPIC,
            ranges=[PartitionRange(self.partition, self.next_offset, end)],
            indexed=indexed,
            objects=objects,
            extensions=build_extensions(),
            lock_horizon=lock_horizon,
        )
        self.next_offset = end
        return outcome.duplicates


async def snapshot(conn: asyncpg.Connection[Any], since: datetime, until: datetime) -> dict[str, Any]:
    """Everything the read side shows for ORGS in [since, until): rollups, usage, index pages,
    pointers and the MCP usage rollup, in a form comparable across servers."""
    out: dict[str, Any] = {}
    for org in ORGS:
        for window in ("hourly", "daily"):
            for level in ("org", "server", "method"):
                rows = await query_log_aggregates(
                    conn,
                    AggregatesQuery(org, window, since, until, level),
                )
                out[f"log_aggregates/{org}/{window}/{level}"] = [_comparable(r) for r in rows]
            out[f"usage/{org}/{window}"] = await query_usage(conn, org, window, since, until)
        for flt in (
            QueryFilter(organization_id=org, since=since, until=until),
            QueryFilter(organization_id=org, errors_only=True),
            QueryFilter(organization_id=org, server_id=SERVERS[1], rpc_method="tools/call"),
            QueryFilter(organization_id=org, session_id=SESSIONS[2], level="error"),
        ):
            out[f"index/{org}/{flt}"] = await _all_pages(conn, flt)
    out["pointers"] = [
        await find_pointer(conn, str(row["id"]))
        for row in await conn.fetch("SELECT id FROM log_index ORDER BY started_at, id LIMIT 20")
    ]
    out["mcp_usage_hourly"] = [
        dict(r)
        for r in await conn.fetch(
            f"SELECT * FROM {MCP_USAGE_HOURLY} WHERE bucket >= $1 AND bucket < $2 "
            "ORDER BY bucket, org_id, server_id, tool_name",
            since,
            until,
        )
    ]
    out["counts"] = {
        table: await conn.fetchval(f"SELECT count(*) FROM {table}")
        for table in ("log_index", "usage_events", "mcp_usage", "ingest_objects")
    }
    return out


def _comparable(row: dict[str, Any]) -> dict[str, Any]:
    # updated_at is the merge's clock, different on each server by nature.
    return {k: v for k, v in row.items() if k != "updated_at"}


async def _all_pages(conn: Connection, flt: QueryFilter, page: int = 50) -> list[dict[str, Any]]:
    rows, cursor = await query_index(conn, flt, page)
    while cursor is not None:
        more, cursor = await query_index(conn, flt, page, cursor)
        rows += more
    return rows


def day_start(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)
