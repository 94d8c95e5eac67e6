"""Insert-only deltas + merger vs direct row merges, under contention on hot organization rows.

Each writer is its own process (as ingest workers are) and commits batches of `--batch` events
of one hot organization (4 servers x 5 methods, 95 % in the current hour, 5 % up to 6 hours
late), one transaction per batch:

- ``deltas``: the batch inserts its log_aggregates deltas (sinks/aggregate_parts.py); a merger
  task (sinks/merger.py) folds them every `--merge-interval` s.
- ``direct``: the batch merges straight into log_aggregates' rows at all three levels, hourly and
  daily: placeholder rows inserted in sorted key order, then ``SELECT ... ORDER BY key FOR UPDATE``
  (sorted, so concurrent writers cannot deadlock), sketches merged in Python, one UPDATE.
- ``full``: what the worker really runs per batch: usage_events/mcp_usage rows, the log and
  usage deltas and the user sets (the merger folds all of them).

Reported per strategy and writer count: the batch transaction's latency (p50 / p95 / max), the
throughput across writers, and with a merger the merge passes and the lag until a batch is
visible in log_aggregates.

    .venv/bin/python bench/aggregate_contention.py --database-url postgresql://... [--batches 8]

``--history-cost`` times the merge pass of one `--batch`-event batch of the hot organization
(its rollup rows exist already) over growing histories of other organizations' rollup rows
(`--history` rows, comma-separated), and counts the rollup rows the pass fetched and scanned
(pg_stat_user_tables): a pass should cost the same whatever the history.

``--loop-lag`` measures how late a 1 ms sleep wakes up on an event loop while a merger folds
`--batches` full batches' deltas, the merger running on that loop vs on its own thread
(`MergerThread`, how a worker runs its in-process merger).

``--isolation-cost`` times merge passes over `--batch` log keys with deltas, clean and with one
key whose delta's sketch is corrupt (the pass bisects down to it, isolates it and folds the rest).

``--extension-rate`` times every batch extension's ``write`` (usage rows and aggregate deltas, as
`bench.harness.aggregates_stage.extension_rate` does) over `--batches` load-generator batches of
`--batch` events, one writer, and reports µs per event: wall time and this process's CPU (the
worker's share; PostgreSQL's is not in it). To compare with an older revision in alternating runs,
run this script with ``PYTHONPATH`` set to a worktree of that revision (its sinks are then used).

A scratch database is created next to the given one and dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import statistics
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
from prometheus_client import CollectorRegistry

from bench.harness import ceilings, traffic
from pipeline.contract import ValidationPolicy, ValidEvent, validate_event
from pipeline.metrics import WorkerMetrics
from pipeline.sketch import QuantileSketch
from sinks.aggregate_parts import LOG_DELTAS, Acc, AggregateDeltasWriter, PartKey, insert_deltas, log_parts
from sinks.aggregates import build_extensions
from sinks.merger import (
    MergerLoop,
    MergerThread,
    daily_from_hourly,
    log_values,
    merge_pass,
    merge_until_clean,
    org_level,
    pending_deltas,
    server_level,
)
from sinks.migrate import migrate
from sinks.partitions import ensure_day_partitions
from sinks.usage import UsageRowsWriter

HOT_ORG = str(uuid.UUID(int=0xFEED))
SERVERS = [str(uuid.UUID(int=0x5E00 + i)) for i in range(4)]
METHODS = ["tools/call", "tools/list", "resources/read", "prompts/get", "initialize"]
POLICY = ValidationPolicy(timedelta(days=90), timedelta(hours=1))


def make_batch(rng: random.Random, size: int, now: datetime) -> list[ValidEvent]:
    out = []
    for _ in range(size):
        late = rng.random() < 0.05
        started = (
            now - timedelta(hours=rng.uniform(1, 6)) if late else now - timedelta(seconds=rng.uniform(0, 60))
        )
        body: dict[str, Any] = {
            "event_id": str(uuid.UUID(int=rng.getrandbits(128))),
            "organization_id": HOT_ORG,
            "started_at": started.isoformat(),
            "duration_ms": int(rng.lognormvariate(4, 1)),
            "server_id": rng.choice(SERVERS),
            "rpc_method": rng.choice(METHODS),
            "status_code": rng.choice([200, 200, 200, 500]),
            "bytes_in": rng.randint(0, 4000),
            "bytes_out": rng.randint(0, 40000),
            "user_id": f"user-{rng.randint(1, 200)}",
        }
        if rng.random() < 0.4:
            body |= {"model": rng.choice(["a", "b"]), "input_tokens": rng.randint(1, 900), "cost_cents": 1}
            if rng.random() < 0.3:
                body |= {"event_type": "mcp_tool", "mcp_tool_name": "search"}
        event = validate_event(orjson.dumps(body), now, POLICY)
        assert isinstance(event, ValidEvent)
        out.append(event)
    return out


# ---- the direct strategy ------------------------------------------------------------------------

_PLACEHOLDERS = """
INSERT INTO log_aggregates (organization_id, server_id, rpc_method, window_type, window_start)
SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::aggregation_window_enum[], $5::timestamptz[])
ON CONFLICT ON CONSTRAINT log_aggregates_key DO NOTHING
"""
_LOCK = """
SELECT a.id, k.i, a.total_requests, a.error_requests, a.total_bytes_in, a.total_bytes_out, a.duration_sketch
FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::aggregation_window_enum[], $5::timestamptz[])
    WITH ORDINALITY AS k(o, s, m, w, t, i)
JOIN log_aggregates a ON a.organization_id = k.o AND a.server_id IS NOT DISTINCT FROM k.s
 AND a.rpc_method IS NOT DISTINCT FROM k.m AND a.window_type = k.w AND a.window_start = k.t
ORDER BY a.organization_id, a.server_id NULLS FIRST, a.rpc_method NULLS FIRST, a.window_type, a.window_start
FOR UPDATE OF a
"""
_UPDATE = """
UPDATE log_aggregates a SET total_requests = v.total, success_requests = v.success,
    error_requests = v.errors, p50_duration_ms = v.p50, p95_duration_ms = v.p95,
    p99_duration_ms = v.p99, avg_duration_ms = v.avg, total_bytes_in = v.bin,
    total_bytes_out = v.bout, duration_sketch = v.sketch
FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[], $5::int[], $6::int[], $7::int[],
    $8::float8[], $9::numeric[], $10::numeric[], $11::bytea[])
    AS v(id, total, success, errors, p50, p95, p99, avg, bin, bout, sketch)
WHERE a.id = v.id
"""


def _sort_key(key: tuple[Any, ...]) -> tuple[Any, ...]:
    window_type, start, org, server, method = key
    return (org, server is not None, server or "", method is not None, method or "", window_type, start)


async def direct_write(conn: asyncpg.Connection, events: list[ValidEvent]) -> None:
    leaves = log_parts(events)
    servers = server_level(leaves.items())
    orgs = org_level(servers.items())
    hourly: dict[tuple[Any, ...], Acc] = {**leaves, **servers, **orgs}
    rows: dict[tuple[Any, ...], Acc] = {("hourly", *k): a for k, a in hourly.items()}
    rows |= {("daily", *k): a for k, a in daily_from_hourly(hourly.items()).items()}
    keys = sorted(rows, key=_sort_key)
    columns = [
        [k[2] for k in keys],
        [k[3] for k in keys],
        [k[4] for k in keys],
        [k[0] for k in keys],
        [k[1] for k in keys],
    ]
    await conn.execute(_PLACEHOLDERS, *columns)
    locked = await conn.fetch(_LOCK, *columns)
    ids, values = [], []
    for row in locked:
        acc = rows[keys[row["i"] - 1]]
        if row["duration_sketch"] is not None:
            acc.merge(
                Acc.decode(
                    [
                        row["total_requests"],
                        row["error_requests"],
                        row["total_bytes_in"],
                        row["total_bytes_out"],
                    ],
                    row["duration_sketch"],
                )
            )
        ids.append(row["id"])
        values.append(log_values(acc))
    await conn.execute(
        _UPDATE,
        ids,
        [v.total for v in values],
        [v.success for v in values],
        [v.errors for v in values],
        [v.p50 for v in values],
        [v.p95 for v in values],
        [v.p99 for v in values],
        [v.avg for v in values],
        [v.bytes_in for v in values],
        [v.bytes_out for v in values],
        [v.sketch for v in values],
    )


# ---- one writer process ---------------------------------------------------------------------------


async def _writer(
    url: str, strategy: str, partition: int, batches: int, size: int, start_at: float
) -> dict[str, Any]:
    rng = random.Random(1000 + partition)
    now = datetime.now(UTC)
    prepared = [make_batch(rng, size, now) for _ in range(batches)]
    conn = await asyncpg.connect(url)
    deltas, usage = AggregateDeltasWriter(), UsageRowsWriter()
    latencies: list[float] = []
    committed: list[float] = []
    try:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        for batch in prepared:
            t0 = time.perf_counter()
            async with conn.transaction():
                if strategy == "direct":
                    await direct_write(conn, batch)
                elif strategy == "deltas":
                    await insert_deltas(conn, LOG_DELTAS, log_parts(batch))
                else:
                    await usage.write(conn, batch, partition)
                    await deltas.write(conn, batch, partition)
            latencies.append(time.perf_counter() - t0)
            committed.append(time.time())
    finally:
        await conn.close()
    return {"latencies": latencies, "committed": committed}


def _writer_process(
    url: str, strategy: str, partition: int, batches: int, size: int, start_at: float
) -> dict[str, Any]:
    return asyncio.run(_writer(url, strategy, partition, batches, size, start_at))


async def _merger(
    url: str, interval: float, stop: asyncio.Event, passes: list[tuple[float, float, int]]
) -> None:
    conn = await asyncpg.connect(url)
    try:
        while not stop.is_set():
            t0 = time.perf_counter()
            stats = await merge_until_clean(conn)
            if stats is not None and stats.deltas_read:
                passes.append((time.time(), time.perf_counter() - t0, stats.deltas_read))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
    finally:
        await conn.close()


def _ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1)))]


async def run_case(
    admin_url: str, strategy: str, writers: int, batches: int, size: int, merge_interval: float
) -> dict[str, Any]:
    name = f"bench_agg_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    try:
        await migrate(url)
        conn = await asyncpg.connect(url)
        today = datetime.now(UTC).date()
        for table in ("usage_events", "mcp_usage"):
            await ensure_day_partitions(conn, table, [today - timedelta(days=1), today])
        await conn.close()
        stop = asyncio.Event()
        passes: list[tuple[float, float, int]] = []
        merging = (
            asyncio.create_task(_merger(url, merge_interval, stop, passes)) if strategy != "direct" else None
        )
        start_at = time.time() + 3.0  # all writers start together, after generating their batches
        loop = asyncio.get_running_loop()
        with ProcessPoolExecutor(writers) as pool:
            futures = [
                loop.run_in_executor(pool, _writer_process, url, strategy, p, batches, size, start_at)
                for p in range(writers)
            ]
            results = await asyncio.gather(*futures)
        finished = time.time()
        if merging is not None:
            await asyncio.sleep(merge_interval * 1.5)
            stop.set()
            await merging
        latencies = [x for r in results for x in r["latencies"]]
        last_commit = max(c for r in results for c in r["committed"])
        visible_after = [t for t, _, _ in passes if t >= last_commit]
        return {
            "strategy": strategy,
            "writers": writers,
            "batches": len(latencies),
            "events_per_s": round(len(latencies) * size / (finished - start_at)),
            "batch_ms_p50": round(_ms(latencies, 0.5), 1),
            "batch_ms_p95": round(_ms(latencies, 0.95), 1),
            "batch_ms_max": round(_ms(latencies, 1.0), 1),
            "merge_passes": len(passes),
            "merge_ms_p50": round(statistics.median(d for _, d, _ in passes) * 1000, 1) if passes else None,
            "merge_ms_max": round(max(d for _, d, _ in passes) * 1000, 1) if passes else None,
            "last_batch_visible_s": round(visible_after[0] - last_commit, 2) if visible_after else None,
        }
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def _scratch(admin_url: str, prefix: str) -> tuple[asyncpg.Connection, str, str]:
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    return admin, name, admin_url.rsplit("/", 1)[0] + "/" + name


_READS = """
SELECT coalesce(sum(seq_tup_read), 0) AS seq_rows, coalesce(sum(idx_tup_fetch), 0) AS fetched
FROM pg_stat_user_tables WHERE relname IN ('log_aggregates', 'usage_hourly', 'usage_daily')
"""


def _history_deltas(rows: int, first: int) -> dict[PartKey, Acc]:
    """Log deltas that make about `rows` new rollup rows: one method of one server per
    organization and hour (3 hourly rows each), over 80 days."""
    sketch = QuantileSketch.from_values([10.0, 20.0], alpha=LOG_DELTAS.alpha)
    hour0 = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    out: dict[PartKey, Acc] = {}
    for i in range(first, first + rows // 3):
        org, hour = divmod(i, 80 * 24)
        key = (hour0 - timedelta(hours=hour), str(uuid.UUID(int=0xA0000 + org)), SERVERS[0], "history")
        out[key] = Acc([2, 0, 7, 9], sketch.copy())
    return out


async def history_cost(admin_url: str, histories: list[int], size: int, repeats: int) -> list[dict[str, Any]]:
    admin, name, url = await _scratch(admin_url, "bench_hist")
    results = []
    try:
        await migrate(url)
        conn = await asyncpg.connect(url)
        stats_conn = await asyncpg.connect(url)
        rng = random.Random(3)
        now = datetime.now(UTC)
        probe = make_batch(rng, size, now)
        async with conn.transaction():
            await insert_deltas(conn, LOG_DELTAS, log_parts(probe))
        await merge_until_clean(conn)  # the probe's rollup rows exist before every measurement
        made = 0
        for target in histories:
            while made < target:
                step = min(30_000, target - made)
                async with conn.transaction():
                    await insert_deltas(conn, LOG_DELTAS, _history_deltas(step, made // 3))
                await merge_until_clean(conn)
                made += step
            await conn.execute("ANALYZE log_aggregates")
            rollup_rows = await conn.fetchval("SELECT count(*) FROM log_aggregates")
            timings, reads = [], []
            folded = written = 0
            for _ in range(repeats):
                async with conn.transaction():
                    await insert_deltas(conn, LOG_DELTAS, log_parts(probe))
                await conn.execute("SELECT pg_stat_force_next_flush()")
                before = await stats_conn.fetchrow(_READS)
                t0 = time.perf_counter()
                stats = await merge_pass(conn)
                timings.append(time.perf_counter() - t0)
                await conn.execute("SELECT pg_stat_force_next_flush()")
                after = await stats_conn.fetchrow(_READS)
                assert stats is not None and stats.deltas_read > 0 and before and after
                folded, written = stats.deltas_folded, stats.log_rows
                reads.append(
                    (int(after["seq_rows"] - before["seq_rows"]), int(after["fetched"] - before["fetched"]))
                )
            results.append(
                {
                    "compare": "merge pass of one batch over a growing history",
                    "batch": size,
                    "log_aggregates_rows": rollup_rows,
                    "deltas_folded": folded,
                    "rollup_rows_written": written,
                    "pass_ms_p50": round(_ms(timings, 0.5), 1),
                    "pass_ms_min": round(_ms(timings, 0.0), 1),
                    "rollup_rows_seq_scanned": sorted({r[0] for r in reads}),
                    "rollup_rows_index_fetched": sorted({r[1] for r in reads}),
                }
            )
        await stats_conn.close()
        await conn.close()
        return results
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def _ticks(stop: asyncio.Event, lags: list[float]) -> None:
    """How late a 1 ms sleep wakes up: the stalls an ingest loop would see."""
    while not stop.is_set():
        t0 = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append(time.perf_counter() - t0 - 0.001)


async def loop_lag(admin_url: str, batches: int, size: int, repeats: int) -> list[dict[str, Any]]:
    """Event-loop stalls while a merger folds `batches` full batches' deltas: the merger on the
    measured loop itself vs on its own thread and loop (`MergerThread`, a worker's in-process
    merger)."""
    admin, name, url = await _scratch(admin_url, "bench_lag")
    results = []
    try:
        await migrate(url)
        conn = await asyncpg.connect(url)
        now = datetime.now(UTC)
        for table in ("usage_events", "mcp_usage"):
            await ensure_day_partitions(conn, table, [now.date() - timedelta(days=1), now.date()])
        rng = random.Random(1)
        for _ in range(repeats):
            for mode in ("same loop", "own thread"):
                for _ in range(batches):
                    batch = make_batch(rng, size, now)
                    async with conn.transaction():
                        await UsageRowsWriter().write(conn, batch, 0)
                        await AggregateDeltasWriter().write(conn, batch, 0)
                stop, lags = asyncio.Event(), list[float]()
                ticker = asyncio.create_task(_ticks(stop, lags))
                merger_loop = MergerLoop(0.05, 90)
                metrics = WorkerMetrics(CollectorRegistry())
                t0 = time.perf_counter()
                pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
                assert pool is not None
                job = asyncio.create_task(
                    merger_loop(pool, metrics)
                    if mode == "same loop"
                    else MergerThread(merger_loop, url)(pool, metrics)
                )
                while await pending_deltas(conn):  # noqa: ASYNC110 - polls the database, not an event
                    await asyncio.sleep(0.02)
                took = time.perf_counter() - t0
                job.cancel()
                await asyncio.gather(job, return_exceptions=True)
                await pool.close()
                stop.set()
                await ticker
                results.append(
                    {
                        "compare": "event-loop stalls while the merger folds",
                        "merger": mode,
                        "batches": batches,
                        "fold_s": round(took, 2),
                        "lag_ms_p50": round(_ms(lags, 0.5), 2),
                        "lag_ms_p99": round(_ms(lags, 0.99), 1),
                        "lag_ms_max": round(_ms(lags, 1.0), 1),
                    }
                )
        await conn.close()
        return results
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def isolation_cost(admin_url: str, keys: int, repeats: int) -> dict[str, Any]:
    name = f"bench_iso_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    sketch = QuantileSketch.from_values([10.0, 20.0], alpha=LOG_DELTAS.alpha)
    parts = {
        (hour, HOT_ORG, str(uuid.UUID(int=0x5E00 + i // 50)), f"method-{i % 50}"): Acc([2, 0, 7, 9], sketch)
        for i in range(keys)
    }
    seconds: dict[str, list[float]] = {"clean": [], "one_bad_key": []}
    try:
        await migrate(url)
        conn = await asyncpg.connect(url)
        for _ in range(repeats):
            for case, timings in seconds.items():
                await conn.execute("TRUNCATE log_aggregate_deltas, log_aggregates, aggregate_isolated_keys")
                async with conn.transaction():
                    await insert_deltas(conn, LOG_DELTAS, {k: a.copy() for k, a in parts.items()})
                if case == "one_bad_key":
                    await conn.execute(
                        "UPDATE log_aggregate_deltas SET sketch = overlay(sketch placing '\\xff'::bytea "
                        "from 12) WHERE rpc_method = 'method-7' AND server_id = $1",
                        str(uuid.UUID(int=0x5E00 + 3)),
                    )
                t0 = time.perf_counter()
                stats = await merge_until_clean(conn)
                timings.append(time.perf_counter() - t0)
                assert stats is not None and len(stats.isolated) == (case == "one_bad_key")
        await conn.close()
        return {
            "compare": "merge pass over log keys with deltas: clean vs one corrupt key (bisected, isolated)",
            "keys": keys,
            **{f"{case}_ms_p50": round(_ms(values, 0.5), 1) for case, values in seconds.items()},
        }
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def extension_rate(admin_url: str, batches: int, size: int) -> dict[str, Any]:
    """µs/event (wall and process CPU) of the batch extensions, median over the batches after a
    first warm-up batch; every batch is fresh load-generator traffic (new users and sessions)."""
    admin, name, url = await _scratch(admin_url, "bench_ext")
    try:
        await migrate(url)
        chunks = [ceilings.validated(traffic.values(size, seed=10 + b)) for b in range(batches + 1)]
        # The prepared batches leave the collector's scans, as a worker's long-lived objects do
        # (gc.freeze at start-up): a worker holds one or two batches, not all of them at once.
        gc.collect()
        gc.freeze()
        conn = await asyncpg.connect(url)
        try:
            for table in ("usage_events", "mcp_usage"):
                await ensure_day_partitions(conn, table, {e.started_at.date() for c in chunks for e in c})
            extensions = build_extensions()
            wall: list[float] = []
            cpu: list[float] = []
            for chunk in chunks:
                started, cpu_started = time.perf_counter(), time.process_time()
                async with conn.transaction():
                    for extension in extensions:
                        await extension.write(conn, chunk, 0)
                wall.append((time.perf_counter() - started) / len(chunk) * 1e6)
                cpu.append((time.process_time() - cpu_started) / len(chunk) * 1e6)
        finally:
            await conn.close()
    finally:
        gc.unfreeze()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    return {
        "batches": batches,
        "batch": size,
        "us_per_event_wall": round(statistics.median(wall[1:]), 1),
        "us_per_event_cpu": round(statistics.median(cpu[1:]), 1),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default=os.environ.get("OMNILOG_DATABASE_URL"))
    parser.add_argument("--batches", type=int, default=8, help="batches per writer")
    parser.add_argument("--batch", type=int, default=5000, help="events per batch")
    parser.add_argument("--merge-interval", type=float, default=2.0)
    parser.add_argument("--strategies", default="deltas,direct,full")
    parser.add_argument("--writers", default="1,3")
    parser.add_argument(
        "--history-cost", action="store_true", help="time a merge pass of one batch over growing histories"
    )
    parser.add_argument("--history", default="0,30000,90000,270000", help="rollup rows of history")
    parser.add_argument(
        "--loop-lag", action="store_true", help="event-loop stalls: merger on the loop vs on its thread"
    )
    parser.add_argument(
        "--isolation-cost", action="store_true", help="time merge passes with one key to isolate"
    )
    parser.add_argument(
        "--extension-rate", action="store_true", help="µs/event of the batch extensions (wall and CPU)"
    )
    args = parser.parse_args()
    if not args.database_url:
        parser.error("--database-url or OMNILOG_DATABASE_URL is required")
    if args.extension_rate:
        print(json.dumps(await extension_rate(args.database_url, args.batches, args.batch)), flush=True)
        return
    if args.isolation_cost:
        print(json.dumps(await isolation_cost(args.database_url, args.batch, args.batches)), flush=True)
        return
    if args.loop_lag:
        for result in await loop_lag(args.database_url, args.batches, args.batch, repeats=2):
            print(json.dumps(result), flush=True)
        return
    if args.history_cost:
        histories = [int(h) for h in args.history.split(",")]
        for result in await history_cost(args.database_url, histories, args.batch, args.batches):
            print(json.dumps(result), flush=True)
        return
    for writers in (int(w) for w in args.writers.split(",")):
        for strategy in args.strategies.split(","):
            result = await run_case(
                args.database_url, strategy, writers, args.batches, args.batch, args.merge_interval
            )
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
