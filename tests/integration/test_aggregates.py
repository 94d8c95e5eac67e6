"""Aggregates against real Tansu, SeaweedFS and PostgreSQL (docs/contract.md §5, docs/aggregates.md).

The oracle is computed here, independently of the worker's code, from the events the test sent:
every rollup row must have exact counts and sums, percentiles within 1 % or 1 ms of
`np.quantile(x, q, method="lower")`, daily rows equal to the merge of their hourly rows, and all
three levels present — after crashes (kill -9 at fail points), restarts, two workers, re-sent
duplicates, events hours and days late, and events on hour and day boundaries.
"""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

from consumers.ingest.factory import build_worker
from pipeline.contract import ValidationPolicy, ValidEvent, validate_event
from pipeline.settings import Settings
from pipeline.sketch import QuantileSketch, merge_all
from sinks import merger
from sinks.aggregate_parts import SLOTS, slot_of
from sinks.aggregate_timescale import ensure_rollup_views
from sinks.aggregates import build_extensions
from sinks.migrate import migrate
from sinks.partitions import ensure_day_partitions
from tests.integration.ingest_support import create_topic, start_worker, wait_caught_up, worker_env

pytestmark = pytest.mark.integration

NIL = "00000000-0000-0000-0000-000000000000"
ORGS = [str(uuid.UUID(int=0xA000 + i)) for i in range(2)]
SERVERS = [None, str(uuid.UUID(int=0xB001)), str(uuid.UUID(int=0xB002))]
METHODS = [None, "", "tools/call", "resources/read"]
PROJECTS = [None, str(uuid.UUID(int=0xC001))]
MODELS = [None, "gpt-x", "claude-y"]
QS = (0.5, 0.95, 0.99)


# ---- traffic and its oracle -----------------------------------------------------------------


def _stamp(t: datetime) -> str:
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_events(count: int, seed: int, now: datetime) -> list[dict[str, Any]]:
    """Gateway events: current, hours late, days late, and on hour/day boundaries."""
    rng = random.Random(seed)
    hour = now.replace(minute=0, second=0, microsecond=0)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    edges = [
        hour - timedelta(milliseconds=1),
        hour,
        midnight - timedelta(milliseconds=1),
        midnight,
        midnight - timedelta(days=1, milliseconds=1),
    ]
    events = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.5:
            started = now - timedelta(seconds=rng.uniform(0, 1800))
        elif roll < 0.7:
            started = now - timedelta(hours=rng.uniform(1, 10))
        elif roll < 0.85:
            started = now - timedelta(days=rng.uniform(1, 3))
        else:
            started = rng.choice(edges)
        status = rng.choice([200, 200, 200, 201, 404, 500])
        duration = rng.choice([0, int(rng.lognormvariate(4, 1.2)), int(rng.paretovariate(1.2) * 20)])
        event: dict[str, Any] = {
            "event_id": str(uuid.UUID(int=rng.getrandbits(128))),
            "organization_id": rng.choice(ORGS),
            "started_at": _stamp(started),
            "duration_ms": min(duration, 2_000_000_000),
            "server_id": rng.choice(SERVERS),
            "status_code": status,
            "bytes_in": rng.randint(0, 5000),
            "bytes_out": rng.randint(0, 90000),
        }
        method = rng.choice(METHODS)
        if method is not None:
            event["rpc_method"] = method
        if rng.random() < 0.8:
            event["user_id"] = f"user-{rng.randint(1, 12)}"
        if rng.random() < 0.5:
            event["model"] = rng.choice(MODELS)
            event["project_id"] = rng.choice(PROJECTS)
            event["input_tokens"] = rng.randint(0, 2000)
            event["output_tokens"] = rng.randint(0, 900)
            event["cache_read_tokens"] = rng.randint(0, 50)
            event["cost_cents"] = rng.randint(0, 40)
            event["status"] = rng.choice(["success", "success", "error", "timeout"])
            event["event_type"] = rng.choice(["api_call", "mcp_tool", "streaming"])
            if event["event_type"] == "mcp_tool":
                event["mcp_tool_name"] = rng.choice(["search", "fetch"])
        events.append({k: v for k, v in event.items() if v is not None})
    return events


async def send(
    settings: Settings, events: list[dict[str, Any]], resend_fraction: float, seed: int
) -> tuple[int, dict[int, int]]:
    """Send every event and re-send a fraction of them (duplicates): (re-sends, end offsets)."""
    rng = random.Random(seed)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, linger_ms=20)
    await producer.start()
    resent = 0
    try:
        futures = []
        for event in events:
            value = orjson.dumps(event)
            futures.append(await producer.send(settings.topic, value=value))
            if rng.random() < resend_fraction:
                futures.append(await producer.send(settings.topic, value=value))
                resent += 1
        end: dict[int, int] = {}
        for future in futures:
            meta = await future
            end[meta.partition] = max(end.get(meta.partition, 0), meta.offset + 1)
    finally:
        await producer.stop()
    return resent, end


def _hour(t: datetime) -> datetime:
    return t.replace(minute=0, second=0, microsecond=0)


def _day(t: datetime) -> datetime:
    return t.replace(hour=0, minute=0, second=0, microsecond=0)


_USAGE_FIELDS = (
    "project_id",
    "api_key_id",
    "model",
    "event_type",
    "status",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cost_cents",
    "time_to_first_token_ms",
)


class Oracle:
    """Expected rollups, from the events' JSON only."""

    def __init__(self, events: Iterable[dict[str, Any]]) -> None:
        self.log: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
        self.usage_hourly: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
        self.usage_daily: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
        self.usage_events = 0
        self.mcp_calls = 0
        for e in events:
            t = datetime.fromisoformat(e["started_at"]).astimezone(UTC)
            org, server, method = e["organization_id"], e.get("server_id") or NIL, e.get("rpc_method") or ""
            for window, start in (("hourly", _hour(t)), ("daily", _day(t))):
                for key in ((org, server, method), (org, server, None), (org, None, None)):
                    self.log[(window, start, *key)].append(e)
            if any(f in e for f in _USAGE_FIELDS):
                self.usage_events += 1
                ukey = (org, e.get("project_id") or NIL, e.get("model") or "")
                self.usage_hourly[(_hour(t), *ukey)].append(e)
                self.usage_daily[(_day(t), *ukey, None)].append(e)
                self.usage_daily[(_day(t), *ukey, e.get("user_id") or "")].append(e)
            if (e.get("event_type") == "mcp_tool" or "mcp_tool_name" in e) and e.get("server_id"):
                self.mcp_calls += 1


def _close(estimate: float, values: list[int], q: float, what: str) -> None:
    exact = float(np.quantile(np.array(values), q, method="lower"))
    assert abs(estimate - exact) <= max(0.01 * exact, 1.0), f"{what} q={q}: {estimate} vs exact {exact}"


def _usage_status(e: dict[str, Any]) -> str:
    return str(e.get("status") or ("error" if e["status_code"] >= 400 else "success"))


async def verify_rollups(database_url: str, oracle: Oracle) -> dict[str, int]:
    conn = await asyncpg.connect(database_url)
    try:
        pending = await merger.pending_deltas(conn)
        rows = await conn.fetch("SELECT *, window_type::text AS wt FROM log_aggregates")
        hourly_usage = await conn.fetch("SELECT * FROM usage_hourly")
        daily_usage = await conn.fetch("SELECT * FROM usage_daily")
        usage_events = await conn.fetchval("SELECT count(*) FROM usage_events")
        mcp_rows = await conn.fetchval("SELECT count(*) FROM mcp_usage")
        usage_ids = await conn.fetchval("SELECT count(DISTINCT request_id) FROM usage_events")
        # The plain-counts rollup (a view natively, a continuous aggregate with TimescaleDB).
        mcp_hourly = await conn.fetchval("SELECT coalesce(sum(calls), 0) FROM mcp_usage_hourly")
    finally:
        await conn.close()
    assert pending == 0, f"{pending} deltas left unfolded"

    def key_of(r: asyncpg.Record) -> tuple[Any, ...]:
        server = None if r["server_id"] is None else str(r["server_id"])
        return (r["wt"], r["window_start"], str(r["organization_id"]), server, r["rpc_method"])

    got = {key_of(r): r for r in rows}
    assert set(got) == set(oracle.log), (
        f"missing {sorted(set(oracle.log) - set(got), key=str)[:5]}, "
        f"unexpected {sorted(set(got) - set(oracle.log), key=str)[:5]}"
    )
    for key, events in oracle.log.items():
        r = got[key]
        durations = [e["duration_ms"] for e in events]
        errors = sum(1 for e in events if e["status_code"] >= 400)
        assert r["total_requests"] == len(events), key
        assert (r["error_requests"], r["success_requests"]) == (errors, len(events) - errors), key
        assert r["total_bytes_in"] == sum(e["bytes_in"] for e in events), key
        assert r["total_bytes_out"] == sum(e["bytes_out"] for e in events), key
        assert r["avg_duration_ms"] == pytest.approx(np.mean(durations), rel=1e-9), key
        for q, column in zip(QS, ("p50_duration_ms", "p95_duration_ms", "p99_duration_ms"), strict=True):
            _close(r[column], durations, q, f"{key} {column}")
    # Daily rows are the merge of their day's hourly rows (the stored sketches, byte for byte).
    by_day: dict[tuple[Any, ...], list[QuantileSketch]] = defaultdict(list)
    for (wt, start, org, server, method), r in got.items():
        if wt == "hourly":
            by_day[(_day(start), org, server, method)].append(QuantileSketch.from_bytes(r["duration_sketch"]))
    for (wt, start, org, server, method), r in got.items():
        if wt == "daily":
            parts = by_day[(start, org, server, method)]
            merged = merge_all(parts, alpha=parts[0].alpha)
            assert merged.to_bytes() == bytes(r["duration_sketch"]), (start, org, server, method)

    assert usage_events == usage_ids == oracle.usage_events
    assert mcp_rows == mcp_hourly == oracle.mcp_calls
    _verify_usage(
        {(r["bucket"], str(r["org_id"]), str(r["project_id"]), r["model"]): r for r in hourly_usage},
        oracle.usage_hourly,
        daily=False,
    )
    _verify_usage(
        {
            (r["bucket"], str(r["org_id"]), str(r["project_id"]), r["model"], r["user_id"]): r
            for r in daily_usage
        },
        oracle.usage_daily,
        daily=True,
    )
    return {"log_rows": len(rows), "usage_hourly": len(hourly_usage), "usage_daily": len(daily_usage)}


def _verify_usage(
    got: dict[tuple[Any, ...], asyncpg.Record], want: dict[tuple[Any, ...], list[dict[str, Any]]], daily: bool
) -> None:
    assert set(got) == set(want), (
        f"usage keys: missing {set(want) - set(got)}, unexpected {set(got) - set(want)}"
    )
    for key, events in want.items():
        r = got[key]
        latency = [e["duration_ms"] for e in events]
        statuses = [_usage_status(e) for e in events]
        assert r["request_count"] == len(events), key
        assert r["success_count"] == statuses.count("success"), key
        assert r["error_count"] == statuses.count("error"), key
        for column, field in (
            ("total_input_tokens", "input_tokens"),
            ("total_output_tokens", "output_tokens"),
            ("total_cache_read_tokens", "cache_read_tokens"),
            ("total_cost_cents", "cost_cents"),
        ):
            assert r[column] == sum(e.get(field, 0) for e in events), (key, column)
        users = {e["user_id"] for e in events if e.get("user_id")}
        assert r["unique_users"] == len(users), key
        assert r["avg_latency_ms"] == pytest.approx(np.mean(latency), rel=1e-9)
        for q, column in zip(QS, ("p50_latency_ms", "p95_latency_ms", "p99_latency_ms"), strict=True):
            _close(r[column], latency, q, f"usage {key} {column}")


# ---- tests ------------------------------------------------------------------------------------


async def test_rollups_exact_after_crashes_restarts_two_workers_duplicates_and_late_events(
    fresh_database_url: str, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(
        database_url=fresh_database_url,
        batch_max_events=80,
        batch_max_age_s=0.3,
        rebalance_drain_s=2.0,
        kafka_session_timeout_ms=3000,
    )
    await migrate(fresh_database_url)
    await create_topic(settings, settings.topic, partitions=3)
    events = make_events(2500, seed=41, now=datetime.now(UTC))
    resent, end_offsets = await send(settings, events, resend_fraction=0.08, seed=42)
    assert resent > 100

    # Two workers at a time, each killed (-9) at fail points and restarted, merging as they go.
    await crash_workers_then_finish_clean(settings, fresh_database_url, end_offsets, tmp_path, min_crashes=3)
    try:
        # First the worker's half (each event indexed once), then the deltas' and merger's half: a
        # failure names the half that lost or doubled something.
        await assert_indexed_exactly_once(fresh_database_url, events)
        summary = await verify_rollups(fresh_database_url, Oracle(events))
    except AssertionError as failure:
        raise AssertionError(f"{failure}\n{await crash_diagnostics(fresh_database_url, tmp_path)}") from None
    assert summary["log_rows"] > 300 and summary["usage_daily"] > 50


async def assert_indexed_exactly_once(database_url: str, events: list[dict[str, Any]]) -> None:
    """Every event sent has exactly one log_index row, and no other row is there."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT id::text AS id, count(*) AS n FROM log_index GROUP BY id")
    finally:
        await conn.close()
    indexed = {r["id"]: r["n"] for r in rows}
    sent = {e["event_id"] for e in events}
    missing, unexpected = sent - set(indexed), set(indexed) - sent
    twice = sorted(i for i, n in indexed.items() if n > 1)
    assert not (missing or unexpected or twice), (
        f"log_index: {len(missing)} events missing {sorted(missing)[:5]}, {len(twice)} indexed more "
        f"than once {twice[:5]}, {len(unexpected)} unexpected"
    )


# Worker log messages that mark the moments where an offset or a delta could go astray.
_NOTABLE = ("outside the log", "fenced", "abandoning", "permanent error", "isolated", "Traceback", "error")


async def crash_diagnostics(database_url: str, logs: Path) -> str:
    """What to read when the crash test fails: stored offsets, deltas left per table, isolated keys
    and the notable lines of every worker log (kept under `logs`)."""
    conn = await asyncpg.connect(database_url)
    try:
        offsets = await conn.fetch("SELECT partition, next_offset FROM ingest_offsets ORDER BY partition")
        left = {t.name: await conn.fetchval(f"SELECT count(*) FROM {t.name}") for t in merger.FOLDED_TABLES}
        isolated = await merger.list_isolated(conn)
    finally:
        await conn.close()
    lines = [
        f"{path.name}: {line}"
        for path in sorted(logs.glob("*.log"))
        for line in path.read_text(errors="replace").splitlines()
        if any(mark in line for mark in _NOTABLE)
    ]
    return (
        f"stored offsets {[tuple(r) for r in offsets]}; deltas left {left}; isolated {isolated}; "
        f"worker logs in {logs}, notable lines ({len(lines)}):\n" + "\n".join(lines[:40])
    )


async def _wait_for_log(path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in (path.read_text(errors="replace") if path.exists() else ""):
        assert time.monotonic() < deadline, f"{text!r} not logged in {timeout}s"
        await asyncio.sleep(0.2)


async def _wait_clean(database_url: str, timeout: float) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pending = await merger.pending_deltas(conn)
            if pending == 0:
                return
            await asyncio.sleep(0.3)
        raise AssertionError(f"{pending} deltas still unfolded after {timeout}s")
    finally:
        await conn.close()


async def crash_workers_then_finish_clean(
    settings: Settings, database_url: str, end_offsets: dict[int, int], tmp_path: Path, min_crashes: int
) -> None:
    """Two `omnilog ingest` workers at a time, killed (-9) at fail points (also inside a merge pass)
    and restarted until they caught up; then a clean worker finishes what is left and its merger
    folds the last deltas."""
    # ~0.35 crashes per batch: a few dozen batches crash far more often than `min_crashes` (fewer
    # would happen about once in 150 runs at the former 0.1/0.15). The deadline only bounds a
    # stuck run: on a loaded machine each restart takes seconds, and ending the crash phase early
    # on time is what left too few crashes.
    failpoints = "after_upload:0.15,after_postgres_commit:0.2,merge_before_commit:0.1"
    env = {"OMNILOG_FAILPOINTS": failpoints, "OMNILOG_MERGE_INTERVAL_S": "0.5"}
    workers = [start_worker(settings, tmp_path / f"w{i}.log", **env) for i in range(2)]
    crashes = 0
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            for i, proc in enumerate(workers):
                if proc.poll() is not None:
                    crashes += proc.returncode == -signal.SIGKILL
                    workers[i] = start_worker(settings, tmp_path / f"w{i}.log", **env)
            try:
                await wait_caught_up(database_url, settings, end_offsets, timeout=0.1)
                break
            except AssertionError:
                continue
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
    assert crashes >= min_crashes, f"only {crashes} crashes: the test proved little"

    proc = start_worker(settings, tmp_path / "clean.log", OMNILOG_MERGE_INTERVAL_S="0.5")
    try:
        await _wait_for_log(tmp_path / "clean.log", "partitions assigned", timeout=60)
        await wait_caught_up(database_url, settings, end_offsets, timeout=90)
        await _wait_clean(database_url, timeout=30)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0


async def _row_count(conn: asyncpg.Connection, window: str, event: dict[str, Any]) -> int:
    return int(
        await conn.fetchval(
            "SELECT coalesce(sum(total_requests), 0) FROM log_aggregates WHERE organization_id = $1"
            " AND server_id = $2 AND rpc_method = $3 AND window_type = $4::aggregation_window_enum",
            event["organization_id"],
            event["server_id"],
            event["rpc_method"],
            window,
        )
    )


async def test_a_committed_event_shows_in_hourly_and_daily_rows_within_10s(
    fresh_database_url: str, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(database_url=fresh_database_url)  # default batch age and merge interval
    assert settings.merge_interval_s == 4.0  # the shipped default (pipeline/settings.py)
    await migrate(fresh_database_url)
    await create_topic(settings, settings.topic, partitions=2)
    worker = build_worker(settings, registry=CollectorRegistry())
    task = asyncio.create_task(worker.run())
    conn = await asyncpg.connect(fresh_database_url)
    try:
        await _wait_ready(worker, 60)
        now = datetime.now(UTC)
        fresh = make_events(1, seed=7, now=now)[0] | {
            "started_at": _stamp(now),
            "server_id": SERVERS[1],
            "rpc_method": "fresh/one",
        }
        late = fresh | {"event_id": str(uuid.uuid4()), "started_at": _stamp(now - timedelta(days=2, hours=3))}
        for event in (fresh, late):
            await send(settings, [event], resend_fraction=0.0, seed=1)
            sent = time.monotonic()
            while await _row_count(conn, "hourly", fresh) + await _row_count(conn, "daily", fresh) < (
                2 if event is fresh else 4
            ):
                assert time.monotonic() - sent < 10, "event not in its hourly and daily rows within 10 s"
                await asyncio.sleep(0.1)
        # The late event re-dirtied its own old hour and day, next to the fresh ones.
        windows = await conn.fetch(
            "SELECT window_type::text AS wt, window_start FROM log_aggregates WHERE rpc_method = 'fresh/one'"
        )
        assert len(windows) == 4
    finally:
        await conn.close()
        worker.request_stop()
        assert await asyncio.wait_for(task, 60) == 0


async def _wait_ready(worker: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not worker._readiness()[0]:
        assert time.monotonic() < deadline, "worker not ready"
        await asyncio.sleep(0.2)


# ---- exactly once: races, mergers killed and restarted, shards ---------------------------------

POLICY = ValidationPolicy(timedelta(days=90), timedelta(hours=1))


def _valid(events: list[dict[str, Any]], now: datetime) -> list[ValidEvent]:
    out = []
    for body in events:
        event = validate_event(orjson.dumps(body), now, POLICY)
        assert isinstance(event, ValidEvent), event
        out.append(event)
    return out


def _events(n: int, duration: int) -> list[ValidEvent]:
    now = datetime.now(UTC)
    body = {
        "organization_id": ORGS[0],
        "started_at": _stamp(now),
        "server_id": SERVERS[1],
        "rpc_method": "race",
    }
    return _valid([body | {"event_id": str(uuid.uuid4()), "duration_ms": duration} for _ in range(n)], now)


async def _write_batch(
    url: str,
    events: list[ValidEvent],
    held: asyncio.Event | None = None,
    release: asyncio.Event | None = None,
) -> None:
    """What a batch transaction writes for its new events: usage rows and aggregate deltas (the
    worker's batch extensions), the day partitions they need first."""
    conn = await asyncpg.connect(url)
    try:
        days = {e.started_at.astimezone(UTC).date() for e in events}
        for table in ("usage_events", "mcp_usage"):
            await ensure_day_partitions(conn, table, days)
        async with conn.transaction():
            for extension in build_extensions():
                await extension.write(conn, events, 0)
            if held is not None and release is not None:
                held.set()
                await release.wait()
    finally:
        await conn.close()


async def _leaf(conn: asyncpg.Connection) -> tuple[int, Any]:
    row = await conn.fetchrow(
        "SELECT total_requests, p99_duration_ms FROM log_aggregates"
        " WHERE rpc_method = 'race' AND window_type = 'hourly'"
    )
    assert row is not None
    return row["total_requests"], row["p99_duration_ms"]


async def test_a_pass_folds_what_it_read_once_and_never_waits_for_an_open_batch(
    fresh_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = fresh_database_url
    await migrate(url)
    conn = await asyncpg.connect(url)
    try:
        await _write_batch(url, _events(3, 10))

        # A batch commits new deltas between the pass's read and its delete: the pass deletes only
        # the ids it read, so the new deltas stay for the next pass, counted once.
        original_delete = merger._delete

        async def delete_after_a_commit(c: Any, table: Any, rows: Any) -> int:
            if table.name == "log_aggregate_deltas":
                await _write_batch(url, _events(2, 1000))
            return await original_delete(c, table, rows)

        monkeypatch.setattr(merger, "_delete", delete_after_a_commit)
        stats = await merger.merge_pass(conn)
        assert stats is not None
        assert await _leaf(conn) == (3, 10)  # only what it read
        assert await conn.fetchval("SELECT count(*) FROM log_aggregate_deltas") == 1
        monkeypatch.setattr(merger, "_delete", original_delete)
        await merger.merge_pass(conn)
        assert await _leaf(conn) == (5, pytest.approx(1000, rel=0.01))

        # A batch holds uncommitted deltas during a pass: invisible, not waited for; folded once
        # it commits.
        await _write_batch(url, _events(1, 20))
        held, release = asyncio.Event(), asyncio.Event()
        writer = asyncio.create_task(_write_batch(url, _events(4, 50), held, release))
        await asyncio.wait_for(held.wait(), 10)
        stats = await asyncio.wait_for(merger.merge_pass(conn), 5)
        assert stats is not None and stats.deltas_folded == 1
        assert await _leaf(conn) == (6, pytest.approx(1000, rel=0.01))
        release.set()
        await writer
        await merger.merge_pass(conn)
        assert await _leaf(conn) == (10, pytest.approx(1000, rel=0.01))
        assert await merger.pending_deltas(conn) == 0

        # One merger per slot: while another session holds the organization's slot, a pass over
        # every slot leaves its deltas alone, and a shard of that slot only finds nothing to lock.
        await _write_batch(url, _events(1, 30))
        slot = slot_of(ORGS[0])
        other = await asyncpg.connect(url)
        try:
            async with other.transaction():
                await other.execute("SELECT pg_advisory_xact_lock($1, $2)", merger.SLOT_LOCK_CLASS, slot)
                stats = await merger.merge_pass(conn)
                assert stats is not None and stats.deltas_read == 0
                assert await merger.merge_pass(conn, shard=merger.Shard(slot, SLOTS)) is None
        finally:
            await other.close()
        await merger.merge_pass(conn)
        assert await _leaf(conn) == (11, pytest.approx(1000, rel=0.01))
    finally:
        await conn.close()


async def test_mergers_racing_over_mixed_shards_with_late_events_count_each_event_once(
    fresh_database_url: str,
) -> None:
    """Four mergers on differently sharded slot sets (1, 2 and 4 shards) run while batches commit
    events of the current hour, hours and days late and on hour and day edges; each rollup row
    must equal the oracle of every event sent."""
    url = fresh_database_url
    await migrate(url)
    now = datetime.now(UTC)
    orgs = [str(uuid.UUID(int=0xD000 + i)) for i in range(12)]
    bodies = make_events(1800, seed=5, now=now)
    rng = random.Random(6)
    for body in bodies:
        body["organization_id"] = rng.choice(orgs)
    batches = [_valid(bodies[i : i + 60], now) for i in range(0, len(bodies), 60)]
    assert len({slot_of(o) for o in orgs}) > 4  # the organizations span several slots

    stop = asyncio.Event()
    folded = {"deltas": 0}

    async def merge_forever(shards: list[merger.Shard]) -> None:
        conn = await asyncpg.connect(url)
        try:
            while not stop.is_set():
                for shard in shards:
                    stats = await merger.merge_until_clean(conn, limit=200, shard=shard)
                    folded["deltas"] += stats.deltas_folded if stats is not None else 0
                await asyncio.sleep(0.01)
        finally:
            await conn.close()

    mergers = [
        asyncio.create_task(merge_forever(shards))
        for shards in (
            [merger.ALL_SLOTS],
            [merger.Shard(0, 2)],
            [merger.Shard(1, 2)],
            merger.shards_of(4, None),
        )
    ]
    try:
        for i in range(0, len(batches), 3):
            await asyncio.gather(*(_write_batch(url, batch) for batch in batches[i : i + 3]))
        await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.gather(*mergers)
    conn = await asyncpg.connect(url)
    try:
        await ensure_rollup_views(conn, 90)
        last = await merger.merge_until_clean(conn)
        assert last is not None
    finally:
        await conn.close()
    assert folded["deltas"] > 0  # the racing mergers did fold (not only the last pass)
    await verify_rollups(url, Oracle(bodies))


def _merge_process(settings: Settings, log_path: Path, *args: str, **env: str) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [str(Path(sys.executable).parent / "omnilog"), "merge", *args],
            env=worker_env(settings, OMNILOG_MERGE_INTERVAL_S="0.2", **env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def test_omnilog_merge_killed_mid_pass_then_restarted_as_two_shards_folds_everything_once(
    fresh_database_url: str, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """Deltas pending from batches no merger saw; `omnilog merge` killed (-9) with every write of
    its pass done but not committed; then two `omnilog merge` processes, shards 0 and 1 of 2,
    fold everything and stop on SIGTERM with exit 0: every rollup row equals the oracle."""
    url = fresh_database_url
    settings = make_settings(database_url=url)
    await migrate(url)
    now = datetime.now(UTC)
    bodies = make_events(900, seed=8, now=now)
    for i in range(0, len(bodies), 100):
        await _write_batch(url, _valid(bodies[i : i + 100], now))
    conn = await asyncpg.connect(url)
    try:
        pending = await merger.pending_deltas(conn)
        assert pending > 100

        killed = _merge_process(settings, tmp_path / "killed.log", OMNILOG_FAILPOINTS="merge_before_commit:1")
        assert killed.wait(timeout=60) == -signal.SIGKILL
        assert await merger.pending_deltas(conn) == pending  # the pass rolled back whole
        assert await conn.fetchval("SELECT count(*) FROM log_aggregates") == 0

        shards = [
            _merge_process(settings, tmp_path / f"shard{i}.log", "--shards", "2", "--shard", str(i))
            for i in range(2)
        ]
        try:
            deadline = time.monotonic() + 60
            while await merger.pending_deltas(conn):
                assert time.monotonic() < deadline, "the two shard mergers did not fold every delta"
                assert all(p.poll() is None for p in shards), "a shard merger exited"
                await asyncio.sleep(0.2)
        finally:
            for proc in shards:
                proc.send_signal(signal.SIGTERM)
            codes = [proc.wait(timeout=30) for proc in shards]
        assert codes == [0, 0]
        for i in range(2):
            assert "merger starting" in (tmp_path / f"shard{i}.log").read_text()
    finally:
        await conn.close()
    await verify_rollups(url, Oracle(bodies))


# ---- a pass costs what its deltas cost, whatever the history -------------------------------------

ROLLUPS = ("log_aggregates", "usage_hourly", "usage_daily")


async def _table_reads(
    conn: asyncpg.Connection, merger_conn: asyncpg.Connection
) -> dict[str, tuple[int, ...]]:
    """(seq_scan, seq_tup_read, idx_scan, rows written, idx_tup_fetch) of the rollup tables, with
    the merger's session's counters flushed first (PostgreSQL 15 flushes a session's table
    statistics at most once a second unless asked)."""
    await merger_conn.execute("SELECT pg_stat_force_next_flush()")
    rows = await conn.fetch(
        "SELECT relname, seq_scan, seq_tup_read, coalesce(idx_scan, 0) AS idx_scan,"
        " n_tup_ins + n_tup_upd AS written, coalesce(idx_tup_fetch, 0) AS idx_tup_fetch"
        " FROM pg_stat_user_tables WHERE relname = ANY($1::text[])",
        list(ROLLUPS),
    )
    return {r["relname"]: tuple(list(r.values())[1:]) for r in rows}


def _history(orgs: list[str], days: int, now: datetime, seed: int) -> list[dict[str, Any]]:
    """Events over many hours of many organizations, no two in one hour of one key."""
    rng = random.Random(seed)
    out = []
    for org in orgs:
        for hour in range(0, days * 24, 5):
            out.append(
                {
                    "event_id": str(uuid.UUID(int=rng.getrandbits(128))),
                    "organization_id": org,
                    "started_at": _stamp(now - timedelta(hours=hour + 2)),
                    "duration_ms": rng.randint(1, 500),
                    "server_id": SERVERS[1],
                    "rpc_method": "history",
                    "model": "m",
                    "user_id": f"user-{rng.randint(1, 5)}",
                }
            )
    return out


async def test_a_pass_reads_only_the_rollup_rows_of_its_deltas_whatever_the_history(
    fresh_database_url: str,
) -> None:
    """The same probe batch folded over a history of H rollup rows and over one of about 3H reads
    the same number of rollup rows, all through index probes (no sequential scan)."""
    url = fresh_database_url
    await migrate(url)
    now = datetime.now(UTC)
    probe_org = str(uuid.UUID(int=0xE000))

    def probe() -> list[ValidEvent]:
        body = {"organization_id": probe_org, "server_id": SERVERS[1], "rpc_method": "probe", "model": "p"}
        return _valid(
            [
                body
                | {
                    "event_id": str(uuid.uuid4()),
                    "started_at": _stamp(now - timedelta(hours=h)),
                    "duration_ms": h,
                    "user_id": f"u{h}",
                }
                for h in range(12)
            ],
            now,
        )

    conn = await asyncpg.connect(url)
    merger_conn = await asyncpg.connect(url)
    try:
        for table in ROLLUPS:  # no background reads in the counters; statistics as ANALYZE sees them
            await conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
        # What is under test is that every read of a pass CAN be served by an index on the keys it
        # touches. Whether the planner takes it is a cost estimate: on the first round's small tables
        # (about 1,400 usage_daily rows) a hash join over a sequential scan is sometimes cheaper, and
        # that choice flipped with table sizes and statistics (seen in a full-suite run). Without
        # sequential scans to choose, a read with no usable index still shows up as one.
        await merger_conn.execute("SET enable_seqscan = off")
        reads: list[dict[str, tuple[int, ...]]] = []
        sizes = []
        for round_, orgs in enumerate(
            (
                [str(uuid.UUID(int=0xF000 + i)) for i in range(4)],
                [str(uuid.UUID(int=0xF100 + i)) for i in range(8)],
            )
        ):
            history = _history(orgs, 80, now, seed=round_)
            for i in range(0, len(history), 2000):
                await _write_batch(url, _valid(history[i : i + 2000], now))
            await merger.merge_until_clean(merger_conn)
            if round_ == 0:
                await _write_batch(url, probe())  # the probe's rows exist before both measurements
                await merger.merge_until_clean(merger_conn)
            for table in ROLLUPS:
                await conn.execute(f"ANALYZE {table}")
            sizes.append(await conn.fetchval("SELECT count(*) FROM log_aggregates"))
            await _write_batch(url, probe())
            before = await _table_reads(conn, merger_conn)
            stats = await merger.merge_pass(merger_conn)
            after = await _table_reads(conn, merger_conn)
            # log, usage and per-user deltas: one per probe hour; monthly: one per month it spans
            # (its server is not registered: the server_stats deltas are held, docs/aggregates.md §10)
            months = len({(now - timedelta(hours=h)).strftime("%Y-%m") for h in range(12)})
            assert stats is not None and stats.deltas_folded == 12 + 12 + 12 + months
            reads.append({t: tuple(a - b for a, b in zip(after[t], before[t], strict=True)) for t in ROLLUPS})
        assert sizes[1] > 2.5 * sizes[0] > 4000
        # What the probe touches: 12 hours x 3 levels of hourly rows and 1 day (or 2) x 3 levels of
        # daily rows; 12 usage_hourly rows; the all-users and 12 per-user usage_daily rows per day.
        touched = {t: reads[0][t][3] for t in ROLLUPS}
        assert 36 + 3 <= touched["log_aggregates"] <= 36 + 6 and touched["usage_hourly"] == 12
        for table in ROLLUPS:
            for measured in reads:
                seq_scans, seq_rows, index_scans, written, fetched = measured[table]
                # no sequential scan; one index probe to read and one to upsert each touched row;
                # the rows fetched by the probes are bounded by the probe's keys, not the history
                assert (seq_scans, seq_rows) == (0, 0), (table, reads)
                assert (index_scans, written) == (2 * touched[table], touched[table]), (table, reads)
                assert fetched <= 3 * touched[table], (table, reads)
    finally:
        await merger_conn.close()
        await conn.close()


async def test_migration_0007_keeps_rollups_and_the_unique_users_of_open_windows(
    fresh_database_url: str, tmp_path: Path
) -> None:
    """Upgrading from the parts layout: the rollup rows stay, the user sets are seeded from the
    old hour-user rows (one per partition there), so a user already counted in an open hour or day
    is not counted again by the first batch after the upgrade."""
    from sinks.migrate import MIGRATIONS_DIR

    before = tmp_path / "before"
    before.mkdir()
    for path in sorted(MIGRATIONS_DIR.glob("000[1-6]_*.sql")):
        (before / path.name).write_text(path.read_text())
    url = fresh_database_url
    await migrate(url, directory=before)
    now = datetime.now(UTC)
    hour = now.replace(minute=0, second=0, microsecond=0)
    org, project = ORGS[0], str(uuid.UUID(int=0xC001))
    conn = await asyncpg.connect(url)
    try:
        for partition in (0, 3):  # the old table keyed users by source partition as well
            await conn.execute(
                "INSERT INTO usage_hour_users VALUES ($1, $2, $3, 'm', 'old-user', $4)",
                hour,
                org,
                project,
                partition,
            )
        await conn.execute(
            "INSERT INTO usage_hourly (bucket, org_id, project_id, model, request_count, unique_users, "
            "latency_sketch) VALUES ($1, $2, $3, 'm', 1, 1, $4)",
            hour,
            org,
            project,
            QuantileSketch.from_values([5.0]).to_bytes(),
        )
        assert await migrate(url) == [
            p.stem for p in sorted(MIGRATIONS_DIR.glob("*.sql")) if p.name >= "0007"
        ]
        assert await conn.fetchval("SELECT to_regclass('log_aggregate_parts')") is None
        day = hour.replace(hour=0)
        assert [tuple(r) for r in await conn.fetch("SELECT window_start, user_id FROM usage_day_users")] == [
            (day, "old-user")
        ]
        body = {
            "organization_id": org,
            "project_id": project,
            "model": "m",
            "started_at": _stamp(now),
            "duration_ms": 7,
        }
        events = _valid(
            [body | {"event_id": str(uuid.uuid4()), "user_id": user} for user in ("old-user", "new-user")],
            now,
        )
        await _write_batch(url, events)
        await merger.merge_until_clean(conn)
        assert (
            await conn.fetchval(
                "SELECT (request_count, unique_users)::text FROM usage_hourly"
                " WHERE bucket = $1 AND model = 'm'",
                hour,
            )
            == "(3,2)"
        )
    finally:
        await conn.close()
