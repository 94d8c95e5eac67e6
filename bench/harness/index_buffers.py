"""What `INSERT INTO log_index ... ON CONFLICT` costs per row by arrival order, shared_buffers and
insert order: servers side by side, fed the same batches in turn.

A shared machine's load swamps drain-to-drain differences (one 1 M drain takes minutes; the
neighbours change in between). Here every arm is its own embedded PostgreSQL (the stack's
settings, `shared_buffers` per arm), started together; each batch of the same backlog goes to
every arm in turn (the order rotating per batch), one transaction each, as the worker's batch
transaction loads the index (sinks/index.py: COPY into the temporary stage, then INSERT ...
SELECT ... ON CONFLICT DO NOTHING RETURNING id). Load on the machine hits every arm alike.
Without the rest of the batch (offsets, objects, usage, aggregate parts), so the buffers hold
log_index alone: a lower bound of the pressure a drain puts on them.

Reported per arm: µs per row of the INSERT (median over batches of each fifth of the backlog, and
the whole), and pg_stat_statements' block counters (shared blocks read from outside the buffers
per row, read time), which are not CPU timings, so the machine's load leaves them alone.

    .venv/bin/python -m bench.harness.index_buffers 1000000 --arm 256MB --arm 2GB --arm 256MB:sorted
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from bench.harness import traffic
from bench.harness.ceilings import index_rows, validated
from bench.harness.env import BenchEnv, own_stack
from pipeline.devtools.stack import Stack, StackInfo, postgres
from sinks.index import LOG_INDEX_COLUMNS
from sinks.partitions import ensure_day_partitions

BATCH = 20_000  # about a worker's batch (OMNILOG_BATCH_MAX_MESSAGES)
# The batch transaction's index statements (sinks/index.py at the time of writing), spelled out
# here so the measurement does not move when the stage's layout does: what is measured is the
# INSERT's cost in log_index, which the stage does not change.
_COLS = ", ".join(LOG_INDEX_COLUMNS)
_STAGE = "bench_log_index_stage"
_CREATE_STAGE = (
    f"CREATE TEMP TABLE IF NOT EXISTS {_STAGE} ON COMMIT DELETE ROWS AS SELECT "
    + ", ".join(f"{c}::text AS {c}" if c == "remote_ip" else c for c in LOG_INDEX_COLUMNS)
    + " FROM log_index WITH NO DATA"
)
_SELECT = ", ".join(f"{c}::inet" if c == "remote_ip" else c for c in LOG_INDEX_COLUMNS)
_INSERT = (
    f"INSERT INTO log_index ({_COLS}) SELECT {_SELECT} FROM {_STAGE} "
    "{order}ON CONFLICT DO NOTHING RETURNING id::text"
)
_INSERT_STATS = """
SELECT sum(calls) AS calls, sum(rows) AS rows, sum(total_exec_time) AS ms,
       sum(shared_blks_hit) AS hit, sum(shared_blks_read) AS read, sum(blk_read_time) AS read_ms,
       sum(shared_blks_dirtied) AS dirtied, sum(shared_blks_written) AS written
  FROM pg_stat_statements WHERE query LIKE 'INSERT INTO log_index%'
"""


@dataclass(frozen=True)
class Arm:
    shared_buffers: str
    sorted_insert: bool

    @classmethod
    def parse(cls, text: str) -> Arm:
        """`256MB` or `2GB:sorted`."""
        size, _, how = text.partition(":")
        if how not in ("", "sorted"):
            raise ValueError(f"not an arm: {text!r} (SIZE or SIZE:sorted)")
        return cls(size, how == "sorted")

    @property
    def name(self) -> str:
        return self.shared_buffers + (":sorted" if self.sorted_insert else "")


def batches(count: int, seed: int, ordered: bool) -> Iterator[list[tuple[object, ...]]]:
    """The backlog `omnilog bench` produces, as index rows, BATCH at a time."""
    values = traffic.values(count, seed, ordered=ordered)
    for start in range(0, count, BATCH):
        events = validated(values[start : start + BATCH])
        yield index_rows(events)


async def load(conn: asyncpg.Connection, rows: list[tuple[object, ...]], sorted_insert: bool) -> float:
    """One batch the worker's way; its seconds."""
    began = time.perf_counter()
    async with conn.transaction():
        await conn.execute(_CREATE_STAGE)
        await conn.copy_records_to_table(_STAGE, records=rows, columns=LOG_INDEX_COLUMNS)
        inserted = await conn.fetch(_INSERT.format(order="ORDER BY id, started_at " if sorted_insert else ""))
    if len(inserted) != len(rows):
        raise RuntimeError(f"{len(inserted)} of {len(rows)} rows inserted")
    return time.perf_counter() - began


def fifth_medians(seconds: list[float], rows: int) -> list[float]:
    """µs/row: the median batch of each fifth of the run, in order."""
    n = len(seconds)
    cuts = [round(i * n / 5) for i in range(6)]
    return [
        round(statistics.median(seconds[a:b]) * 1e6 / rows, 2) for a, b in itertools.pairwise(cuts) if b > a
    ]


async def run(count: int, arms: list[Arm], ordered: bool, seed: int) -> dict[str, Any]:
    with contextlib.ExitStack() as stacks:
        infos: list[StackInfo] = []
        for arm in arms:
            postgres.INGEST_SETTINGS["shared_buffers"] = arm.shared_buffers
            info = stacks.enter_context(own_stack(None))
            for idle in ("kafka", "s3"):  # the database alone
                Stack(info.root).stop_service(idle)
            infos.append(info)
        conns = []
        for info in infos:
            url = await BenchEnv(info).new_database("idx")
            conn = await asyncpg.connect(url)
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            conns.append(conn)
        try:
            return await _interleaved(count, arms, conns, ordered, seed)
        finally:
            for conn in conns:
                await conn.close()


async def _interleaved(
    count: int, arms: list[Arm], conns: list[asyncpg.Connection], ordered: bool, seed: int
) -> dict[str, Any]:
    seconds: list[list[float]] = [[] for _ in arms]
    began = time.monotonic()
    for number, rows in enumerate(batches(count, seed, ordered)):
        days = {r[6].date() for r in rows if isinstance(r[6], datetime)}
        for conn in conns:
            await ensure_day_partitions(conn, "log_index", days)
            if number == 0:
                await conn.execute("SELECT pg_stat_statements_reset()")
        order = [(number + i) % len(arms) for i in range(len(arms))]
        for i in order:
            seconds[i].append(await load(conns[i], rows, arms[i].sorted_insert))
    out: dict[str, Any] = {
        "rows": count,
        "batch": BATCH,
        "arrival": traffic.arrival(ordered),
        "seconds": round(time.monotonic() - began, 1),
        "arms": {},
    }
    for arm, conn, per_batch in zip(arms, conns, seconds, strict=True):
        stats = await conn.fetchrow(_INSERT_STATS)
        assert stats is not None
        n = float(stats["rows"] or 0)
        out["arms"][arm.name] = {
            "insert_us_per_row_median_by_fifth": fifth_medians(per_batch, BATCH),
            "batch_us_per_row_median": round(statistics.median(per_batch) * 1e6 / BATCH, 2),
            "insert_statement_us_per_row": round(float(stats["ms"]) * 1000 / n, 2) if n else None,
            "shared_blocks_read_per_row": round(float(stats["read"]) / n, 3) if n else None,
            "shared_blocks_hit_per_row": round(float(stats["hit"]) / n, 2) if n else None,
            "block_read_ms": round(float(stats["read_ms"]), 1),
            "blocks_written_by_backend_per_row": round(float(stats["written"]) / n, 3) if n else None,
            "index_mib_at_end": round(await _index_bytes(conn) / 2**20, 1),
        }
    return out


async def _index_bytes(conn: asyncpg.Connection) -> int:
    return int(
        await conn.fetchval(
            "SELECT coalesce(sum(pg_indexes_size(c.oid)), 0) FROM pg_inherits i"
            " JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'log_index'::regclass"
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", type=int)
    parser.add_argument("--arm", action="append", type=Arm.parse, required=True, help="SIZE or SIZE:sorted")
    parser.add_argument("--arrival", choices=(traffic.ORDERED, traffic.RANDOM), default=traffic.RANDOM)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = asyncio.run(run(args.rows, args.arm, args.arrival == traffic.ORDERED, args.seed))
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
