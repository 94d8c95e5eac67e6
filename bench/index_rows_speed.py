"""A/B of the batch transaction's rows: `log_index` (sinks/index.py) and the usage rows
(sinks/usage.py) as this checkout writes them, against the same files at a git revision.

    .venv/bin/python bench/index_rows_speed.py --database-url postgresql://... --against f8dcaa4 \
        [--events 20000] [--rounds 9]

The database must be migrated (`omnilog migrate`). One batch of the benchmark's traffic
(bench.harness.traffic, validated, grouped into objects as the flush groups them) goes through
`commit_batch` with the `UsageRowsWriter` extension of each version, on one connection, inside an
outer transaction that is rolled back: every round writes the same rows into the same tables.
The versions alternate round by round, so a busy machine slows both alike; the garbage collector
runs with the worker's settings (pipeline/gc_tuning.py).

First, both versions must store the same rows: each writes every other event of the batch, then
the whole batch twice; the `log_index`, `usage_events` and `mcp_usage` rows of its events are read
back, and any difference, in them or in the first sightings and duplicates each write reported,
stops the run.
Then, per event (medians over the rounds): the worker's CPU in `commit_batch`
(`time.process_time`: row building and asyncpg's encoding), PostgreSQL's CPU for the same work (the
connection's backend process, from /proc when the server runs on this machine; 10 ms ticks, so
it is summed over all rounds) and the wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg

from bench.harness.ceilings import validated
from bench.harness.sources import load_text, source_at
from bench.harness.traffic import values
from pipeline.contract import ValidEvent
from pipeline.gc_tuning import tune_gc
from pipeline.processing.layout import encode_lines
from pipeline.processing.offsets import PartitionRange
from pipeline.processing.store import IndexedEvent
from pipeline.settings import Settings
from sinks.partitions import ensure_day_partitions

_WRITE_TIME = {"created_at"}  # log_index's now() at insert: differs between any two writes
_GROUP = f"bench-index-rows-{os.getpid()}"
_FILES = {"index": "sinks/index.py", "usage": "sinks/usage.py"}
_READ_BACK = {
    "log_index": "SELECT * FROM log_index WHERE id = ANY($1::uuid[]) ORDER BY id, started_at",
    "usage_events": "SELECT * FROM usage_events WHERE request_id = ANY($1::uuid[]) ORDER BY request_id",
    "mcp_usage": "SELECT * FROM mcp_usage WHERE request_id = ANY($1::uuid[]) ORDER BY request_id",
}


@dataclass
class Version:
    label: str
    index: ModuleType
    usage: ModuleType
    worker_us: list[float] = field(default_factory=list)
    wall_us: list[float] = field(default_factory=list)
    server_ticks: int = 0


def _load(label: str, revision: str | None) -> Version:
    """This checkout's modules, or the files as they were at `revision` (loaded under other names)."""
    if revision is None:
        import sinks.index
        import sinks.usage

        return Version(label, sinks.index, sinks.usage)
    modules = {
        name: load_text(source_at(revision, path), f"_bench_{name}_{revision}")
        for name, path in _FILES.items()
    }
    return Version(label, modules["index"], modules["usage"])


def batch_of(events: Sequence[ValidEvent]) -> list[IndexedEvent]:
    """The events as the flush hands them to the index: grouped by (org, day, server) into objects,
    each a run of gzip members (pipeline/processing/flush.py `_encode`)."""
    groups: dict[tuple[str, date, str | None], list[ValidEvent]] = defaultdict(list)
    for e in events:
        groups[(e.organization_id, e.started_at.date(), e.server_id)].append(e)
    indexed = []
    for n, ((org, day, server), members) in enumerate(groups.items()):
        encoded = encode_lines([e.line for e in members])
        uri = f"s3://bench/org/{org}/date={day.isoformat()}/{server or '_'}/bench-{n:04d}.jsonl.gz"
        indexed += [IndexedEvent(e, uri, o, n) for e, (o, n) in zip(members, encoded.pointers, strict=True)]
    return indexed


def _server_ticks(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15 of stat)


async def _write(
    conn: asyncpg.Connection, version: Version, indexed: Sequence[IndexedEvent], first: int = 0
) -> Any:
    """One batch transaction (its offsets from `first`); the caller's transaction rolls it back."""
    if first == 0:  # a partition whose stored offset the batches advance, as a worker's would
        await conn.execute(
            "INSERT INTO ingest_offsets (consumer_group, topic, partition, next_offset)"
            " VALUES ($1, $1, 0, 0)",
            _GROUP,
        )
    return await version.index.commit_batch(
        conn,
        consumer_group=_GROUP,
        topic=_GROUP,
        ranges=[PartitionRange(0, first, first + len(indexed))],
        indexed=indexed,
        objects=[],
        extensions=[version.usage.UsageRowsWriter()],
    )


async def _stored(
    conn: asyncpg.Connection, version: Version, indexed: Sequence[IndexedEvent]
) -> dict[str, Any]:
    """What the version stores for the batch, and its outcome when every other event of the batch
    was indexed before (first sightings and duplicates), then when all were."""
    ids = [i.event.event_id for i in indexed]
    transaction = conn.transaction()
    await transaction.start()
    try:
        await _write(conn, version, indexed[::2])
        again = await _write(conn, version, indexed, first=len(indexed[::2]))
        twice = await _write(conn, version, indexed, first=len(indexed[::2]) + len(indexed))
        rows: dict[str, Any] = {
            table: [
                tuple(v for k, v in r.items() if k not in _WRITE_TIME) for r in await conn.fetch(sql, ids)
            ]
            for table, sql in _READ_BACK.items()
        }
        for name, outcome in (("half indexed before", again), ("all indexed before", twice)):
            rows[name] = ([e.event_id for e in outcome.new_events], outcome.duplicates)
        return rows
    finally:
        await transaction.rollback()


async def _round(conn: asyncpg.Connection, version: Version, indexed: Sequence[IndexedEvent]) -> None:
    pid = conn.get_server_pid()
    transaction = conn.transaction()
    await transaction.start()
    try:
        ticks = _server_ticks(pid)
        wall, cpu = time.perf_counter(), time.process_time()
        await _write(conn, version, indexed)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        after = _server_ticks(pid)
    finally:
        await transaction.rollback()
    version.worker_us.append(cpu / len(indexed) * 1e6)
    version.wall_us.append(wall / len(indexed) * 1e6)
    if ticks is not None and after is not None:
        version.server_ticks += after - ticks


async def run(database_url: str, against: str, events: int, rounds: int) -> None:
    tune_gc(Settings.model_fields["gc_gen0_threshold"].default)  # the worker's collector settings
    versions = [_load(f"at {against}", against), _load("this checkout", None)]
    indexed = batch_of(validated(values(events, 11, ordered=True)))
    conn = await asyncpg.connect(database_url)
    try:
        await ensure_day_partitions(conn, "log_index", {i.event.started_at.date() for i in indexed})
        for table in ("usage_events", "mcp_usage"):
            await ensure_day_partitions(conn, table, {i.event.started_at.date() for i in indexed})
        stored = [await _stored(conn, v, indexed) for v in versions]
        for table in stored[0]:
            if stored[0][table] != stored[1][table]:
                differ = [(a, b) for a, b in zip(stored[0][table], stored[1][table], strict=False) if a != b]
                raise SystemExit(
                    f"{table}: the versions store different rows ({len(stored[0][table])} and "
                    f"{len(stored[1][table])}; {len(differ)} differ, the first: {differ[:1]})"
                )
        counts = ", ".join(f"{len(stored[0][table])} {table}" for table in _READ_BACK)
        print(f"same rows stored by both ({counts})")
        for _ in range(rounds):
            for version in versions:
                await _round(conn, version, indexed)
    finally:
        await conn.close()
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    print(f"{len(indexed)} events per batch, {rounds} rounds interleaved, µs per event:")
    for v in versions:
        server = v.server_ticks / ticks_per_s / (rounds * len(indexed)) * 1e6
        print(
            f"  {v.label:16s} worker CPU median {statistics.median(v.worker_us):5.2f} "
            f"(best {min(v.worker_us):5.2f})   PostgreSQL CPU {server:5.2f}   "
            f"wall median {statistics.median(v.wall_us):6.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url", default=os.environ.get("OMNILOG_DATABASE_URL"))
    parser.add_argument("--against", required=True, help="the git revision to compare with")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    if not args.database_url:
        raise SystemExit("--database-url or OMNILOG_DATABASE_URL is required")
    asyncio.run(run(args.database_url, args.against, args.events, args.rounds))


if __name__ == "__main__":
    main()
