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
from sinks.aggregate_parts import AggregatePartsWriter
from sinks.migrate import migrate
from tests.integration.ingest_support import create_topic, start_worker, wait_caught_up

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
        dirty = await conn.fetchval(
            "SELECT (SELECT count(*) FROM log_aggregate_parts WHERE version <> merged_version)"
            " + (SELECT count(*) FROM usage_parts WHERE version <> merged_version)"
            " + (SELECT count(*) FROM usage_user_parts WHERE version <> merged_version)"
        )
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
    assert dirty == 0, f"{dirty} parts left unmerged"

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
    failpoints = "after_upload:0.1,after_postgres_commit:0.15"
    env = {"OMNILOG_FAILPOINTS": failpoints, "OMNILOG_MERGE_INTERVAL_S": "0.5"}
    workers = [start_worker(settings, tmp_path / f"w{i}.log", **env) for i in range(2)]
    crashes = 0
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            for i, proc in enumerate(workers):
                if proc.poll() is not None:
                    crashes += proc.returncode == -signal.SIGKILL
                    workers[i] = start_worker(settings, tmp_path / f"w{i}.log", **env)
            try:
                await wait_caught_up(fresh_database_url, settings, end_offsets, timeout=0.1)
                break
            except AssertionError:
                continue
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
    assert crashes >= 3, f"only {crashes} crashes: the test proved little"

    # A clean worker finishes what is left; its merger (0.5 s) folds the last parts.
    proc = start_worker(settings, tmp_path / "clean.log", OMNILOG_MERGE_INTERVAL_S="0.5")
    try:
        await _wait_for_log(tmp_path / "clean.log", "partitions assigned", timeout=60)
        await wait_caught_up(fresh_database_url, settings, end_offsets, timeout=90)
        await _wait_clean(fresh_database_url, timeout=30)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0
    summary = await verify_rollups(fresh_database_url, Oracle(events))
    assert summary["log_rows"] > 300 and summary["usage_daily"] > 50


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
            dirty = await conn.fetchval(
                "SELECT count(*) FROM (SELECT 1 FROM log_aggregate_parts WHERE version <> merged_version"
                " UNION ALL SELECT 1 FROM usage_parts WHERE version <> merged_version"
                " UNION ALL SELECT 1 FROM usage_user_parts WHERE version <> merged_version) d"
            )
            if dirty == 0:
                return
            await asyncio.sleep(0.3)
        raise AssertionError(f"{dirty} parts still unmerged after {timeout}s")
    finally:
        await conn.close()


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


# ---- the merger's race protection, with real transactions -------------------------------------

POLICY = ValidationPolicy(timedelta(days=90), timedelta(hours=1))


def _events(n: int, duration: int) -> list[ValidEvent]:
    now = datetime.now(UTC)
    out = []
    for _ in range(n):
        value = orjson.dumps(
            {
                "event_id": str(uuid.uuid4()),
                "organization_id": ORGS[0],
                "started_at": _stamp(now),
                "duration_ms": duration,
                "server_id": SERVERS[1],
                "rpc_method": "race",
            }
        )
        event = validate_event(value, now, POLICY)
        assert isinstance(event, ValidEvent)
        out.append(event)
    return out


async def _write(
    url: str,
    events: list[ValidEvent],
    written: asyncio.Event | None = None,
    commit: asyncio.Event | None = None,
) -> None:
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await AggregatePartsWriter().write(conn, events, 0)
            if written is not None and commit is not None:
                written.set()
                await commit.wait()
    finally:
        await conn.close()


async def _leaf(conn: asyncpg.Connection) -> tuple[int, Any]:
    row = await conn.fetchrow(
        "SELECT total_requests, p99_duration_ms FROM log_aggregates"
        " WHERE rpc_method = 'race' AND window_type = 'hourly'"
    )
    assert row is not None
    return row["total_requests"], row["p99_duration_ms"]


async def test_merger_never_marks_a_part_written_after_it_read_it(
    fresh_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await migrate(fresh_database_url)
    conn = await asyncpg.connect(fresh_database_url)
    try:
        await _write(fresh_database_url, _events(3, 10))

        # Interleaving 1: a batch commits a new version of the part between the merger's read and
        # its mark. The pass reflects what it read; the part must stay dirty.
        original_mark = merger._mark

        async def mark_after_a_commit(c: Any, table: Any, loaded: Any) -> int:
            if table.name == "log_aggregate_parts":
                await _write(fresh_database_url, _events(2, 1000))
            return await original_mark(c, table, loaded)

        monkeypatch.setattr(merger, "_mark", mark_after_a_commit)
        stats = await merger.merge_pass(conn)
        assert stats is not None
        assert await _leaf(conn) == (3, 10)  # only what it read
        assert (
            await conn.fetchval("SELECT count(*) FROM log_aggregate_parts WHERE version <> merged_version")
            == 1
        )
        monkeypatch.setattr(merger, "_mark", original_mark)
        await merger.merge_pass(conn)
        assert await _leaf(conn) == (5, pytest.approx(1000, rel=0.01))

        # Interleaving 2: a batch holds a dirty part (uncommitted new version) while the merger
        # marks: the mark must neither wait for it nor mark it; the next pass has the new version.
        await _write(fresh_database_url, _events(1, 20))
        written, commit = asyncio.Event(), asyncio.Event()
        writer = asyncio.create_task(_write(fresh_database_url, _events(4, 50), written, commit))
        await asyncio.wait_for(written.wait(), 10)
        stats = await asyncio.wait_for(merger.merge_pass(conn), 5)
        assert stats is not None and (stats.parts_read, stats.parts_marked) == (1, 0)
        assert await _leaf(conn) == (6, pytest.approx(1000, rel=0.01))
        commit.set()
        await writer
        await merger.merge_pass(conn)
        assert await _leaf(conn) == (10, pytest.approx(1000, rel=0.01))
        assert (
            await conn.fetchval("SELECT count(*) FROM log_aggregate_parts WHERE version <> merged_version")
            == 0
        )

        # One merger at a time: a pass finds the lock taken and does nothing.
        other = await asyncpg.connect(fresh_database_url)
        try:
            async with other.transaction():
                await other.execute("SELECT pg_advisory_xact_lock($1)", merger.MERGER_LOCK_KEY)
                assert await merger.merge_pass(conn) is None
        finally:
            await other.close()
    finally:
        await conn.close()
