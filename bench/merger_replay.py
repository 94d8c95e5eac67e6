"""The merger's CPU per event on a fixed stream of deltas, A/B against another source tree.

A drain (bench/merger_drains.py) measures the merger beside a worker on a shared machine: how many
deltas each round finds depends on how fast the worker went, so two drains of the same code differ
by more than the change being measured. Here the deltas are made once, then replayed the same way
for each side, in one process:

1. the backlog of `omnilog bench`'s ordered drain (`traffic.values`, restamped in arrival order) is
   validated and cut into the worker's 20 000-event batches, and each batch's deltas are written
   as the worker's batch extension writes them (sinks/aggregate_parts.py), then set aside;
2. per side and round: the rollups and deltas are emptied, then the batches' deltas are put back
   `--batches-per-round` batches at a time and folded with `merge_until_clean` each time (one
   merger round, as a merger that keeps up with one worker sees them: one batch per round on a
   loaded machine, about three at 15 k events/s); only the process CPU time of the folds counts;
3. after each side's replay the rollup tables are read back in key order (all columns but
   `updated_at`): both sides must leave identical rows, sketches included.

    .venv/bin/python bench/merger_replay.py --events 200000 --rounds 3 --base /tmp/merger-base

`--base SRC`: a source tree whose sinks/merger.py is the "base" side (e.g. `git show
<commit>:sinks/merger.py`); without it only this checkout's merger is measured. Starts its own
embedded stack and removes it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import statistics
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg

from bench.harness import traffic
from bench.harness.env import BenchEnv, own_stack
from bench.harness.sources import load_source
from pipeline.contract.validate import ValidationPolicy, ValidEvent, validate_event
from pipeline.gc_tuning import tune_gc
from pipeline.settings import Settings
from sinks import merger as current_merger
from sinks.aggregate_parts import DELTA_TABLES, AggregateDeltasWriter
from sinks.partitions import ensure_day_partitions

BATCH_EVENTS = 20_000
ROLLUPS = {
    "log_aggregates": "organization_id, window_type, window_start, server_id, rpc_method",
    "usage_hourly": "bucket, org_id, project_id, model",
    "usage_daily": "bucket, org_id, project_id, model, user_id",
    "usage_monthly": "month, org_id, project_id, model",
    "server_stats": "server_id, window_start",
}


def batches(count: int, seed: int) -> list[list[ValidEvent]]:
    """The ordered backlog's events, validated, in batches of the worker's size."""
    end_ms = int(time.time() * 1000)
    now = datetime.now(UTC)
    policy = ValidationPolicy(max_age=timedelta(days=30), max_future_skew=timedelta(minutes=5))
    events: list[ValidEvent] = []
    for position, value in enumerate(traffic.values(count, seed)):
        restamped = traffic.in_arrival_order(value, position, count, end_ms, traffic.ORDER_JITTER_MS)
        event = validate_event(restamped, now, policy)
        if not isinstance(event, ValidEvent):
            raise TypeError(f"the backlog's event {position} is invalid: {event}")
        events.append(event)
    return [events[i : i + BATCH_EVENTS] for i in range(0, len(events), BATCH_EVENTS)]


async def write_deltas(conn: asyncpg.Connection, parts: list[list[ValidEvent]]) -> list[dict[str, int]]:
    """Each batch's deltas, written and then moved to `kept_<table>` (with their ids); returns the
    highest id per table after each batch."""
    writer = AggregateDeltasWriter()
    days = {e.started_at.astimezone(UTC).date() for batch in parts for e in batch}
    for table in ("usage_events", "mcp_usage"):
        await ensure_day_partitions(conn, table, days)
    ends: list[dict[str, int]] = []
    for batch in parts:
        async with conn.transaction():
            await writer.write(conn, batch, 0)
        ends.append(
            {
                t.name: int(await conn.fetchval(f"SELECT coalesce(max(id), 0) FROM {t.name}"))
                for t in DELTA_TABLES
            }
        )
    for t in DELTA_TABLES:
        await conn.execute(f"CREATE TABLE kept_{t.name} AS SELECT * FROM {t.name}")
    return ends


async def rollup_digest(conn: asyncpg.Connection) -> dict[str, str]:
    """A digest of every rollup table's rows (all columns but updated_at), in key order."""
    digests = {}
    for table, key in ROLLUPS.items():
        columns = await conn.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = $1 "
            "AND column_name NOT IN ('updated_at', 'id', 'created_at') ORDER BY ordinal_position",
            table,
        )
        names = ", ".join(r["column_name"] for r in columns)
        rows = await conn.fetch(f"SELECT {names} FROM {table} ORDER BY {key}")
        digest = hashlib.sha256()
        for row in rows:
            digest.update(repr(tuple(row.values())).encode())
        digests[table] = f"{len(rows)}:{digest.hexdigest()[:16]}"
    return digests


async def replay(
    conn: asyncpg.Connection, merger: ModuleType, ends: list[dict[str, int]], per_round: int
) -> float:
    """CPU seconds of folding the batches' deltas `per_round` batches at a time, from empty rollups."""
    names = ", ".join([*ROLLUPS, *(t.name for t in DELTA_TABLES)])
    await conn.execute(f"TRUNCATE {names}")
    cpu = 0.0
    previous = {t.name: 0 for t in DELTA_TABLES}
    for end in ends[per_round - 1 :: per_round] + ([ends[-1]] if len(ends) % per_round else []):
        for t in DELTA_TABLES:
            await conn.execute(
                f"INSERT INTO {t.name} OVERRIDING SYSTEM VALUE "
                f"SELECT * FROM kept_{t.name} WHERE id > $1 AND id <= $2",
                previous[t.name],
                end[t.name],
            )
        previous = end
        started = time.process_time()
        await merger.merge_until_clean(conn)
        cpu += time.process_time() - started
    return cpu


def load_merger(source: Path) -> ModuleType:
    """`source`/sinks/merger.py as a module of its own (its imports are this checkout's)."""
    return load_source(source / "sinks" / "merger.py", "merger_base")


async def run(count: int, rounds: int, base: Path | None, per_round: int) -> dict[str, Any]:
    sides: list[tuple[str, ModuleType]] = [("new", current_merger)]
    if base is not None:
        sides = [("base", load_merger(base)), *sides]
    parts = batches(count, seed=11)
    batch_count = len(parts)
    cpu: dict[str, list[float]] = {side: [] for side, _ in sides}
    digests: dict[str, dict[str, str]] = {}
    with own_stack(None) as info:
        env = BenchEnv(info)
        db_name, url = await env.new_named_database("merger_replay")
        conn = await asyncpg.connect(url)
        try:
            ends = await write_deltas(conn, parts)
            deltas = sum(ends[-1].values())
            # The merger process's collector settings, without the backlog's events to scan.
            del parts
            gc.collect()
            tune_gc(Settings.model_fields["gc_gen0_threshold"].default)
            for round_no in range(rounds):
                for side, module in sides if round_no % 2 == 0 else sides[::-1]:
                    seconds = await replay(conn, module, ends, per_round)
                    cpu[side].append(seconds)
                    digests[side] = await rollup_digest(conn)
                    figures = {"cpu_s": round(seconds, 3), "us_per_event": round(seconds * 1e6 / count, 2)}
                    print(json.dumps({"side": side, "round": round_no, **figures}), flush=True)
        finally:
            await conn.close()
            await env.drop_named_database(db_name)
            await env.cleanup()
    summary = {
        "events": count,
        "batches": batch_count,
        "batches_per_round": per_round,
        "deltas": deltas,
        "median_us_per_event": {s: round(statistics.median(v) * 1e6 / count, 2) for s, v in cpu.items()},
        "rollups": digests,
        "identical_rollups": len({json.dumps(d, sort_keys=True) for d in digests.values()}) == 1,
    }
    print(json.dumps(summary), flush=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--batches-per-round",
        type=int,
        default=1,
        help="batches whose deltas one merger round finds (a worker at 15 k events/s makes 3 in 4 s)",
    )
    parser.add_argument("--base", type=Path, help="source tree whose sinks/merger.py is the base side")
    args = parser.parse_args()
    asyncio.run(run(args.events, args.rounds, args.base, args.batches_per_round))


if __name__ == "__main__":
    main()
