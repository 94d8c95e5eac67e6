"""The aggregate-delta writer of this checkout against a baseline revision's, interleaved in one process.

`AggregateDeltasWriter.write` (sinks/aggregate_parts.py, with the sketch codec it uses) of git
revision `--baseline` is loaded beside the current one; both write the same `--batch`-event batches
of load-generator traffic (a 20 k slice from the middle of a 200 k backlog in arrival order, as the
ordered drain, and one spread at random over the hour) into a migrated database, each write in a
transaction rolled back afterwards (so every write finds the same empty user, day and session sets:
a first batch). Rounds alternate the order of the two. Reported per traffic: the median µs/event of
this process's CPU and of wall time for each, and whether both left identical rows in every deltas
table and set (compared before the rollback, ids aside: sequences differ).

    .venv/bin/python bench/aggregate_writer_ab.py --baseline f8dcaa4 [--rounds 7] [--database-url ...]

Without --database-url an embedded stack is started (bench.harness.env.own_stack) and removed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from types import ModuleType
from typing import Any

import asyncpg

from bench.harness import ceilings, traffic
from bench.harness.env import BenchEnv, own_stack
from bench.harness.sources import load_text, source_at
from pipeline.contract import ValidEvent
from sinks import aggregate_parts

# Everything the writer leaves: its deltas and the sets it inserts into.
TABLES = (
    "log_aggregate_deltas",
    "usage_deltas",
    "usage_user_deltas",
    "usage_monthly_deltas",
    "server_stats_deltas",
    "usage_hour_users",
    "usage_day_users",
    "usage_month_users",
    "usage_active_days",
    "server_window_sessions",
)
Write = Callable[[asyncpg.Connection, Sequence[ValidEvent], int], Awaitable[None]]


def _module_at(revision: str, path: str, name: str, replace: tuple[str, str] | None = None) -> ModuleType:
    """`path` as it is at `revision`, imported as module `name` (`replace`: one text substitution)."""
    source = source_at(revision, path)
    if replace is not None:
        source = source.replace(*replace)
    return load_text(source, name)


def baseline_writer(revision: str) -> Any:
    """The revision's AggregateDeltasWriter, using the revision's sketch codec."""
    _module_at(revision, "pipeline/sketch.py", "_baseline_sketch")
    parts = _module_at(
        revision,
        "sinks/aggregate_parts.py",
        "_baseline_aggregate_parts",
        ("from pipeline.sketch import", "from _baseline_sketch import"),
    )
    return parts.AggregateDeltasWriter()


def traffics(size: int) -> dict[str, list[ValidEvent]]:
    backlog = 10 * size
    end_ms = int(time.time() * 1000)
    values = traffic.values(size, seed=11)
    middle = backlog // 2  # the batch a worker takes halfway through an ordered drain
    ordered = [
        traffic.in_arrival_order(v, middle + i, backlog, end_ms, traffic.ORDER_JITTER_MS)
        for i, v in enumerate(values)
    ]
    return {"ordered": ceilings.validated(ordered), "spread": ceilings.validated(values)}


async def _rows(conn: asyncpg.Connection) -> dict[str, list[str]]:
    out = {}
    for table in TABLES:
        # Deltas in insert order (their ids), sets in key order; ids differ from run to run.
        records = await conn.fetch(
            f"SELECT (to_jsonb(t) - 'id')::text AS r FROM {table} t ORDER BY "
            + ("t.id" if table.endswith("deltas") else "1")
        )
        out[table] = [r["r"] for r in records]
    return out


async def _timed(
    conn: asyncpg.Connection, write: Write, events: list[ValidEvent]
) -> tuple[float, float, Any]:
    tx = conn.transaction()
    await tx.start()
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        await write(conn, events, 0)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        rows = await _rows(conn)
    finally:
        await tx.rollback()
    return cpu / len(events) * 1e6, wall / len(events) * 1e6, rows


async def compare(url: str, revision: str, size: int, rounds: int) -> list[dict[str, Any]]:
    writers: dict[str, Write] = {
        "baseline": baseline_writer(revision).write,
        "current": aggregate_parts.AggregateDeltasWriter().write,
    }
    batches = traffics(size)
    gc.collect()
    gc.freeze()  # the batches stay out of the collector's scans, as a worker's start-up objects
    conn = await asyncpg.connect(url)
    results = []
    try:
        for name, events in batches.items():
            cpu: dict[str, list[float]] = {label: [] for label in writers}
            wall: dict[str, list[float]] = {label: [] for label in writers}
            rows: dict[str, Any] = {}
            for round_ in range(rounds + 1):  # round 0 warms both up and is not counted
                order = list(writers) if round_ % 2 else list(reversed(writers))
                for label in order:
                    c, w, rows[label] = await _timed(conn, writers[label], events)
                    if round_:
                        cpu[label].append(c)
                        wall[label].append(w)
            result = {
                "traffic": name,
                "batch": size,
                "rounds": rounds,
                "delta_rows": sum(len(v) for k, v in rows["current"].items() if k.endswith("deltas")),
                "rows_identical": rows["baseline"] == rows["current"],
                **{f"{label}_cpu_us_per_event": round(statistics.median(v), 2) for label, v in cpu.items()},
                **{f"{label}_wall_us_per_event": round(statistics.median(v), 2) for label, v in wall.items()},
            }
            result["cpu_ratio"] = round(
                result["current_cpu_us_per_event"] / result["baseline_cpu_us_per_event"], 3
            )
            print(json.dumps(result), flush=True)
            results.append(result)
    finally:
        await conn.close()
        gc.unfreeze()
    return results


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="git revision whose writer is the baseline")
    parser.add_argument("--database-url", default=os.environ.get("OMNILOG_DATABASE_URL"))
    parser.add_argument("--batch", type=int, default=20_000, help="events per batch (the worker's default)")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if args.database_url:
        await compare(args.database_url, args.baseline, args.batch, args.rounds)
        return
    with own_stack(None) as info:
        env = BenchEnv(info)
        try:
            await compare(await env.new_database("writer_ab"), args.baseline, args.batch, args.rounds)
        finally:
            await env.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
