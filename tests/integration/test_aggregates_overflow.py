"""Sums past 2^63 and keys that cannot be merged, on real PostgreSQL (docs/aggregates.md §8).

- An organization-day whose byte and token sums pass 2^63 - 1 is aggregated exactly (compared
  with Python integers), in the hourly and daily rollups and at every level, folded in two rounds
  (a rollup row past 2^63 keeps growing exactly); the batch transactions writing the deltas never
  fail, and the same pass merges the other tenants.
- A key whose merge fails (a corrupt sketch; a sum no rollup column can hold) is isolated and
  persisted, the other keys' rollups are exact, the gauge, counter and ERROR log show it; later
  passes skip it; releasing it after the fix merges it.
- MergerLoop retries a retriable failure through the retry policy (attempts counted) and ends
  with a PermanentError on a fatal one; a worker's MergerThread runs it on its own thread and
  hands that error back.
- `omnilog aggregates isolated` lists the isolated keys, `release --org` releases some of them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry

from pipeline.contract import ValidationPolicy, ValidEvent, validate_event
from pipeline.metrics import WorkerMetrics
from pipeline.processing.retry import ErrorKind, PermanentError
from pipeline.sketch import DEFAULT_ALPHA, QuantileSketch
from sinks import merger
from sinks.aggregate_parts import (
    LOG_DELTAS,
    USAGE_DELTAS,
    USAGE_USER_DELTAS,
    Acc,
    AggregateDeltasWriter,
    DeltaTable,
    PartKey,
    insert_deltas,
    log_parts,
)
from sinks.migrate import migrate

pytestmark = pytest.mark.integration

INT64_MAX = 2**63 - 1
BYTES_MAX = 2**40
INT32_MAX = 2**31 - 1
BIG_ORG, OTHER_ORG = str(uuid.UUID(int=0xB16)), str(uuid.UUID(int=0x0E))
SERVER = str(uuid.UUID(int=0x5E))
PROJECT = str(uuid.UUID(int=0x9A))
POLICY = ValidationPolicy(timedelta(days=90), timedelta(hours=1))
DAY = (datetime.now(UTC) - timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
H1, H2 = DAY + timedelta(hours=10), DAY + timedelta(hours=11)


def _stamp(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _event(org: str, started: datetime, **fields: Any) -> ValidEvent:
    body = {
        "event_id": str(uuid.uuid4()),
        "organization_id": org,
        "started_at": _stamp(started),
        "duration_ms": 100,
        "server_id": SERVER,
        "rpc_method": "tools/call",
        **fields,
    }
    event = validate_event(orjson.dumps(body), datetime.now(UTC), POLICY)
    assert isinstance(event, ValidEvent), event
    return event


def _huge_events(count: int, hour: datetime, seed: int) -> list[ValidEvent]:
    """Events at (or just under) the largest accepted byte counts."""
    rng = random.Random(seed)
    return [
        _event(
            BIG_ORG,
            hour + timedelta(seconds=rng.uniform(0, 3599)),
            bytes_in=BYTES_MAX - rng.randint(0, 1000),
            bytes_out=BYTES_MAX,
            status_code=rng.choice([200, 500]),
            duration_ms=rng.randint(1, 5000),
        )
        for _ in range(count)
    ]


def _copy(parts: dict[PartKey, Acc]) -> dict[PartKey, Acc]:
    return {k: a.copy() for k, a in parts.items()}


async def _batch(conn: asyncpg.Connection, table: DeltaTable, parts: dict[PartKey, Acc]) -> None:
    """What a batch transaction does with its parts (sinks.aggregate_parts.insert_deltas)."""
    async with conn.transaction():
        await insert_deltas(conn, table, _copy(parts))


@pytest.fixture
async def db(fresh_database_url: str) -> AsyncIterator[asyncpg.Connection]:
    await migrate(fresh_database_url)
    conn = await asyncpg.connect(fresh_database_url)
    try:
        yield conn
    finally:
        await conn.close()


async def _log_row(conn: asyncpg.Connection, org: str, window: str, start: datetime, level: str) -> Any:
    server, method = {"method": (SERVER, "tools/call"), "server": (SERVER, None), "org": (None, None)}[level]
    return await conn.fetchrow(
        "SELECT total_requests, error_requests, total_bytes_in, total_bytes_out, p50_duration_ms "
        "FROM log_aggregates WHERE organization_id = $1 AND window_type = $2::aggregation_window_enum "
        "AND window_start = $3 AND server_id IS NOT DISTINCT FROM $4::uuid "
        "AND rpc_method IS NOT DISTINCT FROM $5",
        org,
        window,
        start,
        server,
        method,
    )


async def test_an_org_day_past_2_63_bytes_and_tokens_is_exact_and_fails_nobody(
    db: asyncpg.Connection,
) -> None:
    # 2^16 events of ~2^40 bytes: one batch's delta adds ~2^56; 130 batches pass 2^63 and are
    # folded; 10 more fold onto that row; plus an hour of 2^12 such events 5 times.
    h1_events, h2_events = _huge_events(2**16, H1, 1), _huge_events(2**12, H2, 2)
    h1_parts, h2_parts = log_parts(h1_events), log_parts(h2_events)
    # The real batch extension for the first batch, then the same parts again.
    async with db.transaction():
        await AggregateDeltasWriter().write(db, h1_events, 0)
    for _ in range(129):
        await _batch(db, LOG_DELTAS, h1_parts)
    first = await merger.merge_until_clean(db)
    assert first is not None and first.deltas_folded == 130 and not first.isolated
    first_row = await _log_row(db, BIG_ORG, "hourly", H1, "method")
    assert first_row["total_bytes_out"] == 130 * sum(e.bytes_out for e in h1_events) > INT64_MAX
    for parts, batches in ((h1_parts, 10), (h2_parts, 5)):
        for _ in range(batches):
            await _batch(db, LOG_DELTAS, parts)

    # Usage: parts written directly with token and cost sums of 2^62 each, in three partitions.
    n = 1000
    latencies = np.arange(1, n + 1, dtype=np.float64)
    usage_sums = [n, n - 10, 10, 2**62 + 1, 2**62 + 3, 2**61 + 5, 2**62 + 7]
    usage_key = (H1, BIG_ORG, PROJECT, "model-x")
    user_key = (DAY, BIG_ORG, PROJECT, "model-x", "user-1")
    for _ in range(3):
        sketch = QuantileSketch(DEFAULT_ALPHA)
        sketch.add_many(latencies)
        # usage_deltas carry two more sums: users new to the hour and to the day (here: one)
        await _batch(db, USAGE_DELTAS, {usage_key: Acc([*usage_sums, 1, 1], sketch)})
        await _batch(db, USAGE_USER_DELTAS, {user_key: Acc(list(usage_sums), sketch.copy())})

    # Another tenant, ordinary traffic, in the same hour: merged by the same pass.
    small = [_event(OTHER_ORG, H1, bytes_in=i, bytes_out=2 * i, status_code=200) for i in range(1, 51)]
    async with db.transaction():
        await AggregateDeltasWriter().write(db, small, 3)

    stats = await merger.merge_until_clean(db)
    assert stats is not None and not stats.isolated

    def exact(events: list[ValidEvent], batches: int) -> tuple[int, int, int, int]:
        return (
            batches * len(events),
            batches * sum(e.error for e in events),
            batches * sum(e.bytes_in for e in events),
            batches * sum(e.bytes_out for e in events),
        )

    h1 = exact(h1_events, 140)
    h2 = exact(h2_events, 5)
    day = tuple(a + b for a, b in zip(h1, h2, strict=True))
    assert h1[2] > INT64_MAX and day[3] > INT64_MAX  # beyond any BIGINT column
    for level in ("method", "server", "org"):
        assert tuple((await _log_row(db, BIG_ORG, "hourly", H1, level))[:4]) == h1
        assert tuple((await _log_row(db, BIG_ORG, "hourly", H2, level))[:4]) == h2
        assert tuple((await _log_row(db, BIG_ORG, "daily", DAY, level))[:4]) == day
        assert tuple((await _log_row(db, OTHER_ORG, "hourly", H1, level))[:4]) == exact(small, 1)

    token_sums = [3 * v for v in usage_sums]
    columns = (
        "request_count, success_count, error_count, total_input_tokens, total_output_tokens, "
        "total_cache_read_tokens, total_cost_cents"
    )
    hourly = await db.fetchrow(f"SELECT {columns} FROM usage_hourly WHERE org_id = $1", BIG_ORG)
    assert hourly is not None and [int(v) for v in hourly.values()] == token_sums
    daily = await db.fetch(
        f"SELECT user_id, {columns} FROM usage_daily WHERE org_id = $1 ORDER BY user_id NULLS FIRST", BIG_ORG
    )
    assert [(r["user_id"], [int(v) for v in list(r.values())[1:]]) for r in daily] == [
        (None, token_sums),
        ("user-1", token_sums),
    ]
    assert await db.fetchval("SELECT unique_users FROM usage_hourly WHERE org_id = $1", BIG_ORG) == 3
    assert await merger.pending_deltas(db) == 0


# ---- key isolation -----------------------------------------------------------------------------


def _metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@pytest.fixture
async def pool(fresh_database_url: str, db: asyncpg.Connection) -> AsyncIterator[asyncpg.Pool]:
    created = await asyncpg.create_pool(fresh_database_url, min_size=1, max_size=2)
    assert created is not None
    try:
        yield created
    finally:
        await created.close()


def _method_events(org: str, method: str, count: int, seed: int) -> list[ValidEvent]:
    rng = random.Random(seed)
    return [
        _event(
            org,
            H1,
            rpc_method=method,
            bytes_in=rng.randint(0, BYTES_MAX),
            bytes_out=rng.randint(0, 9999),
            duration_ms=rng.randint(0, 3000),
            status_code=rng.choice([200, 404, 500]),
        )
        for _ in range(count)
    ]


async def test_a_key_that_cannot_be_merged_is_isolated_and_the_others_go_on(
    db: asyncpg.Connection, pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    good = {m: _method_events(BIG_ORG, m, 40, i) for i, m in enumerate(("a", "b", "c", "d", "e"))}
    other = _method_events(OTHER_ORG, "a", 30, 9)
    corrupt = _method_events(BIG_ORG, "corrupt", 5, 10)
    async with db.transaction():
        await AggregateDeltasWriter().write(db, [e for es in good.values() for e in es] + other + corrupt, 0)
    # One part's sketch is damaged on disk (the CRC catches it), and one usage key carries a sum
    # that no rollup column can hold (NUMERIC(38,0) rejects 10^40: a PostgreSQL data error).
    await db.execute(
        "UPDATE log_aggregate_deltas SET sketch = overlay(sketch placing '\\xff'::bytea from 12) "
        "WHERE rpc_method = 'corrupt'"
    )
    sketch = QuantileSketch(DEFAULT_ALPHA)
    sketch.add_many(np.array([5.0, 7.0]))
    overflowing = (H1, BIG_ORG, PROJECT, "too-big")
    await _batch(db, USAGE_DELTAS, {overflowing: Acc([2, 2, 0, 10**40, 0, 0, 0, 0, 0], sketch)})
    fine_usage = (H1, OTHER_ORG, PROJECT, "fine")
    await _batch(db, USAGE_DELTAS, {fine_usage: Acc([2, 2, 0, 123, 4, 5, 6, 0, 0], sketch.copy())})

    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    loop = merger.MergerLoop(interval_s=0.1, max_event_age_days=90)
    with caplog.at_level(logging.ERROR, logger="omnilog.merger"):
        stats = await loop.run_once(pool, metrics)
    assert stats is not None
    isolated = {(i.parts_table, tuple(str(v) for v in i.key[1:])) for i in stats.isolated}
    assert isolated == {
        ("log_aggregate_deltas", (BIG_ORG, SERVER, "corrupt")),
        ("usage_deltas", (BIG_ORG, PROJECT, "too-big")),
    }
    assert _metric(registry, "omnilog_aggregate_keys_isolated") == 2
    logged = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert {tuple(r.__dict__["key"][1:]) for r in logged} == {
        (BIG_ORG, SERVER, "corrupt"),
        (BIG_ORG, PROJECT, "too-big"),
    }

    # The other keys' rollups are exact; the isolated keys have none and their deltas stay.
    for method, events in good.items():
        row = await db.fetchrow(
            "SELECT total_requests, error_requests, total_bytes_in, total_bytes_out FROM log_aggregates "
            "WHERE organization_id = $1 AND rpc_method = $2 AND window_type = 'hourly'",
            BIG_ORG,
            method,
        )
        assert row is not None and tuple(row) == (
            len(events),
            sum(e.error for e in events),
            sum(e.bytes_in for e in events),
            sum(e.bytes_out for e in events),
        )
    assert tuple((await _log_row(db, OTHER_ORG, "daily", DAY, "org"))[:2]) == (
        30,
        sum(e.error for e in other),
    )
    org_total = await _log_row(db, BIG_ORG, "hourly", H1, "org")
    assert org_total["total_requests"] == 200  # the good methods only: the corrupt one is held aside
    assert await db.fetchval("SELECT count(*) FROM log_aggregates WHERE rpc_method = 'corrupt'") == 0
    assert await db.fetchval("SELECT count(*) FROM usage_hourly WHERE model = 'too-big'") == 0
    assert await db.fetchval("SELECT total_input_tokens FROM usage_hourly WHERE model = 'fine'") == 123
    pending = await db.fetch(
        "SELECT rpc_method FROM log_aggregate_deltas UNION ALL SELECT model FROM usage_deltas"
    )
    assert sorted(r[0] for r in pending) == ["corrupt", "too-big"]

    # Persisted: a later pass (any worker, after a restart) skips them without failing again.
    async with db.transaction():
        await AggregateDeltasWriter().write(db, _method_events(BIG_ORG, "a", 3, 11), 1)
    stats = await loop.run_once(pool, metrics)
    assert stats is not None and stats.isolated == [] and stats.deltas_read == 1  # the new delta only
    assert (await _log_row(db, BIG_ORG, "hourly", H1, "org"))["total_requests"] == 203
    assert _metric(registry, "omnilog_aggregate_keys_isolated") == 2

    # Fixed and released: the key merges. The usage key is still broken and goes back aside.
    await db.execute(
        "UPDATE log_aggregate_deltas SET sketch = $1 WHERE rpc_method = 'corrupt'",
        QuantileSketch.from_values([e.duration_ms for e in corrupt], alpha=LOG_DELTAS.alpha).to_bytes(),
    )
    assert await merger.release_isolated(db) == 2
    stats = await loop.run_once(pool, metrics)
    assert stats is not None
    assert [(i.parts_table, i.key[3]) for i in stats.isolated] == [("usage_deltas", "too-big")]
    assert _metric(registry, "omnilog_aggregate_keys_isolated") == 1
    row = await db.fetchrow(
        "SELECT total_requests, total_bytes_in FROM log_aggregates WHERE rpc_method = 'corrupt'"
        " AND window_type = 'hourly'"
    )
    assert row is not None and tuple(row) == (5, sum(e.bytes_in for e in corrupt))
    assert (await _log_row(db, BIG_ORG, "hourly", H1, "org"))["total_requests"] == 208
    assert [r["key_values"] for r in await merger.list_isolated(db)] == [[BIG_ORG, PROJECT, "too-big"]]


async def test_merger_loop_retries_retriable_errors_and_stops_on_fatal_ones(
    db: asyncpg.Connection, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with db.transaction():
        await AggregateDeltasWriter().write(db, _method_events(BIG_ORG, "a", 10, 1), 0)
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    real: Callable[..., Any] = merger.merge_until_clean
    failures = [asyncpg.exceptions.SerializationError("could not serialize access")] * 2

    async def flaky(conn: asyncpg.Connection, limit: int = merger.DEFAULT_LIMIT, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return await real(conn, limit, **kwargs)

    monkeypatch.setattr(merger, "merge_until_clean", flaky)
    task = asyncio.create_task(merger.MergerLoop(interval_s=0.05, max_event_age_days=90)(pool, metrics))
    try:
        for _ in range(200):
            if await db.fetchval("SELECT count(*) FROM log_aggregates") and not failures:
                break
            await asyncio.sleep(0.05)
        assert not task.done(), task
        assert await merger.pending_deltas(db) == 0
        assert _metric(registry, "omnilog_retry_attempts_total", operation="merge") == 2
        assert _metric(registry, "omnilog_aggregate_merge_failures_total", kind="retriable") == 2

        # Fatal: the table of isolated keys is gone (a broken deploy). No retry, no silence.
        await db.execute("DROP TABLE aggregate_isolated_keys")
        async with db.transaction():
            await AggregateDeltasWriter().write(db, _method_events(BIG_ORG, "b", 3, 2), 0)
        with pytest.raises(PermanentError) as ended:
            await asyncio.wait_for(task, 10)
        assert ended.value.kind is ErrorKind.FATAL and ended.value.operation == "merge"
        assert isinstance(ended.value.cause, asyncpg.exceptions.UndefinedTableError)
        assert _metric(registry, "omnilog_retry_attempts_total", operation="merge") == 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _omnilog(url: str, *args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "omnilog"),
        "aggregates",
        *args,
        env={**os.environ, "OMNILOG_DATABASE_URL": url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_operators_list_and_release_isolated_keys_from_the_command_line(
    fresh_database_url: str, db: asyncpg.Connection
) -> None:
    corrupt = _method_events(BIG_ORG, "corrupt", 3, 1)
    async with db.transaction():
        await AggregateDeltasWriter().write(db, corrupt + _method_events(OTHER_ORG, "corrupt", 2, 2), 0)
    await db.execute("UPDATE log_aggregate_deltas SET sketch = '\\x01'::bytea")
    stats = await merger.merge_until_clean(db)
    assert stats is not None and len(stats.isolated) == 2

    printed = await _omnilog(fresh_database_url, "isolated", "--json")
    listed = [orjson.loads(line) for line in printed.splitlines()]
    assert sorted(r["key_values"] for r in listed) == sorted(
        f"{org} {SERVER} corrupt" for org in (BIG_ORG, OTHER_ORG)
    )
    assert all("SketchDecodeError" in r["error"] for r in listed)
    out = await _omnilog(fresh_database_url, "release", "--org", BIG_ORG)
    assert out.strip() == "released 1 isolated aggregate keys"
    assert [r["key_values"][0] for r in await merger.list_isolated(db)] == [OTHER_ORG]


async def test_a_workers_merger_thread_folds_off_its_loop_and_hands_back_a_fatal_error(
    fresh_database_url: str, db: asyncpg.Connection
) -> None:
    """`MergerThread` (a worker's in-process merger): the passes run on a thread of its own, a
    cancelled job stops and joins that thread, and a permanent error of the loop ends the job with
    that error (which the worker turns into its own fatal stop)."""
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    async with db.transaction():
        await AggregateDeltasWriter().write(db, _method_events(BIG_ORG, "a", 10, 1), 0)

    def merger_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "omnilog-merger"]

    job = merger.MergerThread(merger.MergerLoop(interval_s=0.05, max_event_age_days=90), fresh_database_url)
    task = asyncio.create_task(job(None, metrics))  # type: ignore[arg-type]  # the worker's pool is not used
    for _ in range(200):
        if await db.fetchval("SELECT count(*) FROM log_aggregates"):
            break
        await asyncio.sleep(0.05)
    assert len(merger_threads()) == 1 and not task.done()
    assert await merger.pending_deltas(db) == 0
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert merger_threads() == []

    await db.execute("DROP TABLE aggregate_isolated_keys")
    async with db.transaction():
        await AggregateDeltasWriter().write(db, _method_events(BIG_ORG, "b", 3, 2), 0)
    fatal = asyncio.create_task(job(None, metrics))  # type: ignore[arg-type]
    with pytest.raises(PermanentError) as ended:
        await asyncio.wait_for(fatal, 20)
    assert ended.value.kind is ErrorKind.FATAL and ended.value.operation == "merge"
    assert merger_threads() == []
