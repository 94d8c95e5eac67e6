"""What each secondary index of the seed's log_index costs the ingest hot path.

For every variant (primary key only; the primary key plus one seed index; all seed indexes; the
chosen set) it builds a fresh day-partitioned copy of log_index in a scratch schema and loads the
same realistic rows the way sinks/index.py does: COPY a batch into a temporary staging table,
then INSERT ... SELECT ... ON CONFLICT DO NOTHING, one transaction per batch. Reports rows/s.

    .venv/bin/python bench/index_cost.py --database-url postgresql://...  [--rows 200000]

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
from datetime import UTC, datetime, timedelta

import asyncpg
import uuid_utils

from sinks.index import LOG_INDEX_COLUMNS

SCHEMA = "bench_index_cost"

# The seed's log_index indexes, verbatim apart from the table name (idx_log_index_cleanup is left
# out: its NOW() predicate is rejected by PostgreSQL, and day partitions make it pointless).
SEED_INDEXES: dict[str, str] = {
    "org_time": "(organization_id, started_at DESC)",
    "server_time": "(server_id, started_at DESC) WHERE server_id IS NOT NULL",
    "session": "(session_id, started_at DESC) WHERE session_id IS NOT NULL",
    "method_time": "(rpc_method, started_at DESC)",
    "errors": "(organization_id, started_at DESC) WHERE error_flag = true",
    "org_level_time": "(organization_id, level, started_at DESC)",
    "org_method_time": "(organization_id, rpc_method, started_at DESC)",
    "client_id": "(client_id) WHERE client_id IS NOT NULL",
}
# Not in the seed: a block-range index for time-only scans (no organization filter).
EXTRA_INDEXES: dict[str, str] = {"brin_time": "USING brin (started_at)"}
ALL_INDEXES = SEED_INDEXES | EXTRA_INDEXES
# The set 0001_omnimesh.sql creates (docs/schema.md explains the choice).
CHOSEN = ["org_time", "server_time", "session", "errors", "client_id", "brin_time"]

# The columns the ingest path writes, in its order.
COLUMNS = LOG_INDEX_COLUMNS
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


def make_rows(n: int, seed: int = 7) -> list[tuple[object, ...]]:
    """Gateway-like rows: 20 orgs (skewed), 200 servers, 5 000 sessions, time-ordered ids."""
    rng = random.Random(seed)
    orgs = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(20)]
    org_weights = [1.0 / (i + 1) for i in range(len(orgs))]
    servers = [(uuid.UUID(int=rng.getrandbits(128)), rng.choice(orgs)) for _ in range(200)]
    by_org: dict[uuid.UUID, list[uuid.UUID]] = {}
    for server, org in servers:
        by_org.setdefault(org, []).append(server)
    sessions = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(5000)]
    clients = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(10000)]
    methods, method_w = zip(*METHODS, strict=True)
    levels, level_w = zip(*LEVELS, strict=True)
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    rows: list[tuple[object, ...]] = []
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


async def load(conn: asyncpg.Connection, rows: list[tuple[object, ...]], batch: int) -> float:
    cols = ", ".join(COLUMNS)
    insert = f"INSERT INTO {SCHEMA}.log_index ({cols}) SELECT {cols} FROM stage ON CONFLICT DO NOTHING"
    began = time.perf_counter()
    for lo in range(0, len(rows), batch):
        async with conn.transaction():
            await conn.copy_records_to_table("stage", records=rows[lo : lo + batch], columns=COLUMNS)
            await conn.execute(insert)
    return len(rows) / (time.perf_counter() - began)


async def variant(
    conn: asyncpg.Connection, indexes: list[str], rows: list[tuple[object, ...]], batch: int
) -> float:
    day = rows[0][6]
    assert isinstance(day, datetime)
    lo = day.replace(hour=0, minute=0, second=0, microsecond=0)
    await conn.execute(f"DROP TABLE IF EXISTS {SCHEMA}.log_index")
    await conn.execute(
        f"CREATE TABLE {SCHEMA}.log_index (LIKE public.log_index INCLUDING DEFAULTS INCLUDING CONSTRAINTS,"
        " PRIMARY KEY (id, started_at)) PARTITION BY RANGE (started_at)"
    )
    await conn.execute(
        f"CREATE TABLE {SCHEMA}.log_index_p PARTITION OF {SCHEMA}.log_index "
        f"FOR VALUES FROM ('{lo - timedelta(days=1):%Y-%m-%d} 00:00:00+00') "
        f"TO ('{lo + timedelta(days=2):%Y-%m-%d} 00:00:00+00')"
    )
    for name in indexes:
        await conn.execute(f"CREATE INDEX ON {SCHEMA}.log_index {ALL_INDEXES[name]}")
    await conn.execute("CHECKPOINT")
    return await load(conn, rows, batch)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=os.environ.get("OMNILOG_DATABASE_URL"))
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant; the median is reported")
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    args = parser.parse_args()
    if not args.database_url:
        sys.exit("--database-url or OMNILOG_DATABASE_URL is required")
    rows = make_rows(args.rows)
    variants: dict[str, list[str]] = {"pk_only": []}
    variants |= {f"+{name}": [name] for name in ALL_INDEXES}
    variants["seed_all"] = list(SEED_INDEXES)
    variants["chosen"] = CHOSEN
    # Marginal costs: the chosen set without each of its members, and with each dropped one.
    variants |= {f"chosen-{name}": [i for i in CHOSEN if i != name] for name in CHOSEN}
    variants |= {f"chosen+{name}": [*CHOSEN, name] for name in SEED_INDEXES if name not in CHOSEN}
    if args.only:
        variants = {name: variants[name] for name in ["pk_only", *args.only] if name in variants}
    conn = await asyncpg.connect(args.database_url)
    results: dict[str, float] = {}
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE; CREATE SCHEMA {SCHEMA}")
        await conn.execute(
            "CREATE TEMP TABLE stage (LIKE public.log_index INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        runs: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeat):  # interleaved, so background load hits every variant alike
            for name, indexes in variants.items():
                runs[name].append(await variant(conn, indexes, rows, args.batch))
        results = {name: statistics.median(r) for name, r in runs.items()}
    finally:
        await conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        await conn.close()
    base = results["pk_only"]
    print(f"{'variant':<18} {'rows/s':>10} {'vs pk only':>10}")
    for name, rate in results.items():
        print(f"{name:<18} {rate:>10,.0f} {rate / base:>10.2f}")
    print(
        json.dumps(
            {"rows": args.rows, "batch": args.batch, "rows_per_s": {k: round(v) for k, v in results.items()}}
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
