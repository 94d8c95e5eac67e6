"""What each secondary index of the hot-path tables costs the ingest path.

For each table (`log_index`, `usage_events`, `mcp_usage`) and each variant of its index set (no
secondary index; that plus one index; the seed's set; the chosen set; the chosen set without or
with one index) it builds a fresh day-partitioned copy of the table in a scratch schema and loads
the same rows the way the batch transaction does, one transaction per batch:

- `log_index` (sinks/index.py): COPY into a temporary stage, then INSERT ... SELECT ... ON
  CONFLICT DO NOTHING on the primary key. Rows: 20 orgs (skewed), 200 servers, 5 000 sessions.
- `usage_events`, `mcp_usage` (sinks/usage.py): binary COPY straight into the table (no key).
  Rows: the benchmark's gateway traffic (pipeline.devtools.loadgen, as `omnilog bench` sends it)
  validated and mapped by sinks/usage.py, so the columns' values are the worker's.

Reports per variant (medians of interleaved runs) the rows/s, what the indexes add per row
(µs/row = 1/rate − 1/base rate) and the WAL written per row, which shared-CPU noise leaves alone.

    .venv/bin/python bench/index_cost.py --database-url postgresql://... [--table mcp_usage] [--rows N]

The database must be migrated (`omnilog migrate`); the scratch schema is dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import uuid_utils

from bench.harness.ceilings import validated
from bench.harness.traffic import values
from sinks.index import LOG_INDEX_COLUMNS
from sinks.usage import (
    MCP_USAGE_COLUMNS,
    USAGE_EVENT_COLUMNS,
    is_mcp_call,
    mcp_usage_row,
    usage_event_row,
)

# One scratch schema per run: two runs on one database must not drop each other's tables.
SCHEMA = f"bench_index_cost_{os.getpid()}"

Row = tuple[object, ...]


@dataclass(frozen=True)
class Table:
    """One hot-path table: its indexes (seed and candidates), the chosen set, how a batch loads it."""

    name: str
    time_column: str
    columns: tuple[str, ...]
    seed: dict[str, str]  # the seed's secondary indexes, verbatim apart from the table name
    extra: dict[str, str]  # candidates not in the seed
    chosen: list[str]  # the set the migrations leave (docs/schema.md explains the choice)
    primary_key: str | None  # log_index dedups on it; the usage tables have none
    staged: bool  # COPY to a stage + INSERT ... ON CONFLICT (log_index) or COPY straight in
    rows: Callable[[int], list[Row]]

    @property
    def base(self) -> str:
        return "pk_only" if self.primary_key else "no_index"

    @property
    def indexes(self) -> dict[str, str]:
        return self.seed | self.extra

    def variants(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {self.base: []}
        out |= {f"+{name}": [name] for name in self.indexes}
        out["seed_all"] = list(self.seed)
        out["chosen"] = self.chosen
        # Marginal costs: the chosen set without each of its members, and with each dropped one.
        if len(self.chosen) > 1:
            out |= {f"chosen-{name}": [i for i in self.chosen if i != name] for name in self.chosen}
        out |= {f"chosen+{name}": [*self.chosen, name] for name in self.seed if name not in self.chosen}
        return out


METHODS = [
    ("tools/call", 40),
    ("tools/list", 12),
    ("resources/read", 12),
    ("resources/list", 6),
    ("prompts/get", 5),
    ("prompts/list", 3),
    ("initialize", 4),
    ("ping", 8),
    ("notifications/initialized", 4),
    ("completion/complete", 3),
    ("sampling/createMessage", 2),
    ("logging/setLevel", 1),
]
LEVELS = [("info", 85), ("warn", 7), ("error", 4), ("debug", 3), ("fatal", 1)]


def log_index_rows(n: int, seed: int = 7) -> list[Row]:
    """Gateway-like rows: 20 orgs (skewed), 200 servers, 5 000 sessions, time-ordered ids."""
    rng = random.Random(seed)
    orgs = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(20)]
    org_weights = [1.0 / (i + 1) for i in range(len(orgs))]
    servers = [(uuid.UUID(int=rng.getrandbits(128)), rng.choice(orgs)) for _ in range(200)]
    by_org: dict[uuid.UUID, list[uuid.UUID]] = {}
    for server_id, owner in servers:
        by_org.setdefault(owner, []).append(server_id)
    sessions = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(5000)]
    clients = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(10000)]
    methods, method_w = zip(*METHODS, strict=True)
    levels, level_w = zip(*LEVELS, strict=True)
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    rows: list[Row] = []
    offset = 0
    uri = ""
    for i in range(n):
        org = rng.choices(orgs, org_weights)[0]
        server = rng.choice(by_org[org]) if org in by_org and rng.random() < 0.95 else None
        level = rng.choices(levels, level_w)[0]
        status = 500 if level in ("error", "fatal") else (404 if rng.random() < 0.02 else 200)
        # Arrival order with a little jitter: mostly increasing started_at within the hour.
        started = start + timedelta(seconds=i * 3000 / n + rng.uniform(-2, 2))
        if i % 500 == 0:
            prefix = f"s3://omnilog/org/{org}/date={started:%Y-%m-%d}/{server or '_'}"
            uri = f"{prefix}/gateway.requests.v1-{i}.jsonl.gz"
            offset = 0
        length = rng.randint(20000, 70000)
        rows.append(
            (
                uuid.UUID(str(uuid_utils.uuid7())),
                org,
                server,
                rng.choice(sessions) if rng.random() < 0.7 else None,
                rng.choices(methods, method_w)[0],
                level,
                started,
                rng.randint(1, 3000),
                status,
                status >= 400,
                "s3",
                uri,
                offset,
                length,
                f"user-{rng.randint(1, 2000)}",
                f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
                rng.choice(clients) if rng.random() < 0.9 else None,
                uuid.UUID(int=rng.getrandbits(128)),
                1,
            )
        )
        offset += length
    return rows


def _usage_rows(n: int, mcp: bool) -> list[Row]:
    """`n` rows of one usage table, mapped by sinks/usage.py from the benchmark's gateway traffic
    (about half of its events carry usage fields, 42 % are MCP tool calls): generated in steps
    until `n` rows exist, so every row is one the worker would write."""
    rows: list[Row] = []
    events = int(2.6 * n) + 1000
    while len(rows) < n:
        valid = validated(values(events, seed=7))
        if mcp:
            rows = [mcp_usage_row(e) for e in valid if e.server_id is not None and is_mcp_call(e)]
        else:
            rows = [usage_event_row(e) for e in valid if e.has_usage]
        events *= 2
    return rows[:n]


TABLES: dict[str, Table] = {
    "log_index": Table(
        name="log_index",
        time_column="started_at",
        columns=LOG_INDEX_COLUMNS,
        # idx_log_index_cleanup is left out: its NOW() predicate is rejected by PostgreSQL, and
        # day partitions make it pointless.
        seed={
            "org_time": "(organization_id, started_at DESC)",
            "server_time": "(server_id, started_at DESC) WHERE server_id IS NOT NULL",
            "session": "(session_id, started_at DESC) WHERE session_id IS NOT NULL",
            "method_time": "(rpc_method, started_at DESC)",
            "errors": "(organization_id, started_at DESC) WHERE error_flag = true",
            "org_level_time": "(organization_id, level, started_at DESC)",
            "org_method_time": "(organization_id, rpc_method, started_at DESC)",
            "client_id": "(client_id) WHERE client_id IS NOT NULL",
        },
        # A block-range index for time-only scans (no organization filter).
        extra={"brin_time": "USING brin (started_at)"},
        chosen=["org_time", "server_time", "session", "errors", "client_id", "brin_time"],
        primary_key="(id, started_at)",
        staged=True,
        rows=log_index_rows,
    ),
    "usage_events": Table(
        name="usage_events",
        time_column="time",
        columns=USAGE_EVENT_COLUMNS,
        seed={
            "org_time": "(org_id, time DESC)",
            "project_time": "(project_id, time DESC)",
            "user_time": "(user_id, time DESC) WHERE user_id IS NOT NULL",
            "model": "(model, time DESC)",
            "mcp": "(mcp_server_id, time DESC) WHERE mcp_server_id IS NOT NULL",
        },
        extra={},
        chosen=["org_time"],
        primary_key=None,
        staged=False,
        rows=lambda n: _usage_rows(n, mcp=False),
    ),
    "mcp_usage": Table(
        name="mcp_usage",
        time_column="time",
        columns=MCP_USAGE_COLUMNS,
        seed={
            "server": "(server_id, time DESC)",
            "tool": "(server_id, tool_name, time DESC)",
            "project": "(project_id, time DESC)",
        },
        # What the organization's retention delete and the mcp_usage_hourly view filter on.
        extra={"org_time": "(org_id, time DESC)"},
        chosen=["org_time"],
        primary_key=None,
        staged=False,
        rows=lambda n: _usage_rows(n, mcp=True),
    ),
}


@dataclass(frozen=True)
class Loaded:
    """One load of a variant: its rate, and the WAL it wrote (unlike time, not shared-CPU noise)."""

    rows_per_s: float
    wal_bytes_per_row: float


async def load(conn: asyncpg.Connection, table: Table, rows: Sequence[Row], batch: int) -> Loaded:
    """Loading `rows` in batches of `batch`, one transaction each, as the worker does."""
    cols = ", ".join(table.columns)
    insert = (
        f"INSERT INTO {SCHEMA}.{table.name} ({cols}) SELECT {cols} FROM stage_{table.name} "
        "ON CONFLICT DO NOTHING"
    )
    wal_before = await conn.fetchval("SELECT pg_current_wal_insert_lsn()")
    began = time.perf_counter()
    for lo in range(0, len(rows), batch):
        records = rows[lo : lo + batch]
        async with conn.transaction():
            if table.staged:
                await conn.copy_records_to_table(
                    f"stage_{table.name}", records=records, columns=table.columns
                )
                await conn.execute(insert)
            else:
                await conn.copy_records_to_table(
                    table.name, schema_name=SCHEMA, records=records, columns=table.columns
                )
    seconds = time.perf_counter() - began
    wal = await conn.fetchval("SELECT pg_current_wal_insert_lsn() - $1::pg_lsn", wal_before)
    return Loaded(len(rows) / seconds, float(wal) / len(rows))


async def variant(
    conn: asyncpg.Connection, table: Table, indexes: list[str], rows: Sequence[Row], batch: int
) -> Loaded:
    """A fresh partitioned copy of `table` with `indexes`, loaded with `rows`."""
    at = table.columns.index(table.time_column)
    times = [t for r in rows if isinstance(t := r[at], datetime)]
    lo, hi = min(times), max(times)
    key = f", PRIMARY KEY {table.primary_key}" if table.primary_key else ""
    await conn.execute(f"DROP TABLE IF EXISTS {SCHEMA}.{table.name}")
    await conn.execute(
        f"CREATE TABLE {SCHEMA}.{table.name} (LIKE public.{table.name} INCLUDING DEFAULTS"
        f" INCLUDING CONSTRAINTS{key}) PARTITION BY RANGE ({table.time_column})"
    )
    await conn.execute(
        f"CREATE TABLE {SCHEMA}.{table.name}_p PARTITION OF {SCHEMA}.{table.name} "
        f"FOR VALUES FROM ('{lo - timedelta(days=1):%Y-%m-%d} 00:00:00+00') "
        f"TO ('{hi + timedelta(days=2):%Y-%m-%d} 00:00:00+00')"
    )
    for name in indexes:
        await conn.execute(f"CREATE INDEX ON {SCHEMA}.{table.name} {table.indexes[name]}")
    # Every variant starts right after a checkpoint, so each pays the same full-page images.
    await conn.execute("CHECKPOINT")
    return await load(conn, table, rows, batch)


async def measure(
    conn: asyncpg.Connection, table: Table, rows: int, batch: int, repeat: int, only: list[str] | None
) -> dict[str, Loaded]:
    """The median rate and WAL per row of each variant, over `repeat` interleaved rounds."""
    variants = table.variants()
    if only:
        variants = {name: variants[name] for name in [table.base, *only] if name in variants}
    data = table.rows(rows)
    if table.staged:
        await conn.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS stage_{table.name}"
            f" (LIKE public.{table.name} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
    runs: dict[str, list[Loaded]] = {name: [] for name in variants}
    for _ in range(repeat):  # interleaved, so background load hits every variant alike
        for name, indexes in variants.items():
            runs[name].append(await variant(conn, table, indexes, data, batch))
    return {
        name: Loaded(
            statistics.median(r.rows_per_s for r in loads),
            statistics.median(r.wal_bytes_per_row for r in loads),
        )
        for name, loads in runs.items()
    }


def report(table: Table, results: dict[str, Loaded]) -> None:
    base = results[table.base]
    print(f"\n{table.name}")
    print(f"{'variant':<22} {'rows/s':>10} {'vs base':>8} {'µs/row added':>13} {'WAL B/row':>10}")
    for name, result in results.items():
        rate = result.rows_per_s
        added = (1 / rate - 1 / base.rows_per_s) * 1e6
        print(
            f"{name:<22} {rate:>10,.0f} {rate / base.rows_per_s:>8.2f} {added:>13.1f}"
            f" {result.wal_bytes_per_row:>10,.0f}"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--database-url", default=os.environ.get("OMNILOG_DATABASE_URL"))
    parser.add_argument("--table", choices=[*TABLES, "all"], default="all")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant; the median is reported")
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    args = parser.parse_args()
    if not args.database_url:
        sys.exit("--database-url or OMNILOG_DATABASE_URL is required")
    tables = list(TABLES.values()) if args.table == "all" else [TABLES[args.table]]
    conn = await asyncpg.connect(args.database_url)
    results: dict[str, dict[str, Loaded]] = {}
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE; CREATE SCHEMA {SCHEMA}")
        for table in tables:
            results[table.name] = await measure(conn, table, args.rows, args.batch, args.repeat, args.only)
            report(table, results[table.name])
    finally:
        await conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        await conn.close()
    print(
        json.dumps(
            {
                "rows": args.rows,
                "batch": args.batch,
                "repeat": args.repeat,
                "rows_per_s": {t: {k: round(v.rows_per_s) for k, v in r.items()} for t, r in results.items()},
                "wal_bytes_per_row": {
                    t: {k: round(v.wal_bytes_per_row) for k, v in r.items()} for t, r in results.items()
                },
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
