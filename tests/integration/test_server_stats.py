"""server_stats and usage_monthly against real Tansu, SeaweedFS and PostgreSQL (docs/aggregates.md
§10-§11).

The oracle is computed from the JSON of the events the test sent, independently of the worker:
after two workers killed (-9) at fail points and restarted, with re-sent duplicates and events
hours and days late, every server_stats window of a registered server and every usage_monthly row
is exact (counts, sums, distinct sessions, users and days; min/max/avg durations), usage_monthly
agrees with usage_daily, and server_health_summary shows each server's latest window. Events of a
server not registered yet are held, not lost: registering it folds them; events naming another
organization's server stay held and never touch its rows.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from pipeline.contract import ValidationPolicy, ValidEvent, validate_event
from pipeline.settings import Settings
from sinks import merger
from sinks.aggregate_parts import DEFAULT_SERVER_WINDOW_S, AggregateDeltasWriter
from sinks.migrate import migrate
from tests.integration.ingest_support import create_topic
from tests.integration.test_aggregates import (
    _USAGE_FIELDS,
    NIL,
    ORGS,
    SERVERS,
    _usage_status,
    crash_workers_then_finish_clean,
    make_events,
    send,
)

pytestmark = pytest.mark.integration

POLICY = ValidationPolicy(timedelta(days=90), timedelta(hours=1))

SESSIONS = [str(uuid.UUID(int=0xD000 + i)) for i in range(6)]
REGISTERED = (str(SERVERS[1]), ORGS[0])  # registered before the traffic
LATE = (str(SERVERS[2]), ORGS[1])  # registered once every event is in: held until then


def _with_sessions(events: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    for event in events:
        if rng.random() < 0.7:
            event["session_id"] = rng.choice(SESSIONS)
    return events


def _when(e: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(e["started_at"]).astimezone(UTC)


def _server_window(t: datetime) -> datetime:
    epoch = int(t.timestamp()) // DEFAULT_SERVER_WINDOW_S * DEFAULT_SERVER_WINDOW_S
    return datetime.fromtimestamp(epoch, UTC)


def _is_error(e: dict[str, Any]) -> bool:
    # the contract's derivation when `error` is absent: status_code >= 400 (no level is sent here)
    return bool(e.get("status_code", 0) >= 400)


def server_oracle(
    events: Iterable[dict[str, Any]], owners: set[tuple[str, str]]
) -> dict[tuple[Any, ...], Any]:
    """(server, window start) -> the events of that server's own organization in that window."""
    windows: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        if (e.get("server_id"), e["organization_id"]) in owners:
            windows[(e["server_id"], _server_window(_when(e)))].append(e)
    return windows


def month_oracle(events: Iterable[dict[str, Any]]) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    months: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        if any(f in e for f in _USAGE_FIELDS):
            t = _when(e)
            month = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
            months[(month, e["organization_id"], e.get("project_id") or NIL, e.get("model") or "")].append(e)
    return months


async def _register(conn: asyncpg.Connection, server: str, org: str) -> None:
    await conn.execute(
        "INSERT INTO organizations (id, name, slug) VALUES ($1::text::uuid, $1::text, $1::text) "
        "ON CONFLICT DO NOTHING",
        org,
    )
    await conn.execute(
        "INSERT INTO mcp_servers (id, organization_id, name, protocol) "
        "VALUES ($1::text::uuid, $2, $1::text, 'http')",
        server,
        org,
    )


async def _omnilog(url: str, *args: str) -> tuple[str, str]:
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
    return out.decode(), err.decode()


async def check_commands(url: str, conn: asyncpg.Connection) -> None:
    """`omnilog aggregates servers|monthly --json` print exactly the stored rows of the organization."""
    out, err = await _omnilog(url, "servers", "--org", ORGS[1], "--since", "5d", "--json")
    shown = [orjson.loads(line) for line in out.splitlines()]
    stored = await conn.fetch(
        "SELECT s.total_requests, s.active_sessions FROM server_stats s "
        "JOIN mcp_servers m ON m.id = s.server_id WHERE m.organization_id = $1 ORDER BY s.window_start",
        ORGS[1],
    )
    assert [(r["total_requests"], r["active_sessions"]) for r in shown] == [tuple(r) for r in stored]
    assert len(shown) > 20 and {r["server_id"] for r in shown} == {LATE[0]}
    held = await merger.held_server_deltas(conn, ORGS[1])
    assert held > 0 and f"{held} server_stats deltas held" in err
    out, _ = await _omnilog(url, "monthly", "--org", ORGS[0], "--since", "40d", "--json")
    shown = [orjson.loads(line) for line in out.splitlines()]
    stored = await conn.fetch(
        "SELECT request_count, unique_users, active_days FROM usage_monthly WHERE org_id = $1 "
        "ORDER BY month, project_id, model",
        ORGS[0],
    )
    assert len(shown) >= 2
    assert [(r["request_count"], r["unique_users"], r["active_days"]) for r in shown] == [
        tuple(r) for r in stored
    ]


async def _held_requests(conn: asyncpg.Connection) -> int:
    return int(
        await conn.fetchval(
            "SELECT coalesce(sum(d.sums[1]), 0) FROM server_stats_deltas d WHERE NOT EXISTS ("
            "SELECT 1 FROM mcp_servers m WHERE m.id = d.server_id AND m.organization_id = d.organization_id)"
        )
    )


async def verify_server_stats(
    conn: asyncpg.Connection, events: list[dict[str, Any]], owners: set[tuple[str, str]]
) -> int:
    want = server_oracle(events, owners)
    rows = await conn.fetch("SELECT *, server_id::text AS server FROM server_stats")
    got = {(r["server"], r["window_start"]): r for r in rows}
    assert set(got) == set(want), f"missing {set(want) - set(got)}, unexpected {set(got) - set(want)}"
    for key, es in want.items():
        r = got[key]
        durations = [e["duration_ms"] for e in es]
        errors = sum(_is_error(e) for e in es)
        assert r["window_end"] - r["window_start"] == timedelta(seconds=DEFAULT_SERVER_WINDOW_S), key
        assert (r["total_requests"], r["error_requests"], r["success_requests"]) == (
            len(es),
            errors,
            len(es) - errors,
        ), key
        assert r["active_sessions"] == len({e["session_id"] for e in es if "session_id" in e}), key
        assert (r["min_response_time_ms"], r["max_response_time_ms"]) == (min(durations), max(durations)), key
        assert r["avg_response_time_ms"] == pytest.approx(sum(durations) / len(durations), rel=1e-12), key
    # The seed's view: each registered server's latest window (by window_end).
    summary = {
        r["id"]: r
        for r in await conn.fetch(
            "SELECT id::text AS id, total_requests, active_sessions FROM server_health_summary"
        )
    }
    for server, _org in owners:
        mine = [k for k in want if k[0] == server]
        if not mine:
            assert summary[server]["total_requests"] == 0
            continue
        latest = want[max(mine, key=lambda k: k[1])]
        assert summary[server]["total_requests"] == len(latest), server
        assert summary[server]["active_sessions"] == len(
            {e["session_id"] for e in latest if "session_id" in e}
        )
    return len(want)


async def verify_usage_monthly(conn: asyncpg.Connection, events: list[dict[str, Any]]) -> int:
    want = month_oracle(events)
    rows = await conn.fetch("SELECT *, org_id::text AS org, project_id::text AS project FROM usage_monthly")
    got = {(r["month"], r["org"], r["project"], r["model"]): r for r in rows}
    assert set(got) == set(want), f"missing {set(want) - set(got)}, unexpected {set(got) - set(want)}"
    for key, es in want.items():
        r = got[key]
        statuses = [_usage_status(e) for e in es]
        assert r["request_count"] == len(es), key
        assert (r["success_count"], r["error_count"]) == (
            statuses.count("success"),
            statuses.count("error"),
        ), key
        for column, field in (
            ("total_input_tokens", "input_tokens"),
            ("total_output_tokens", "output_tokens"),
            ("total_cache_read_tokens", "cache_read_tokens"),
            ("total_cost_cents", "cost_cents"),
        ):
            assert r[column] == sum(e.get(field, 0) for e in es), (key, column)
        assert r["unique_users"] == len({e["user_id"] for e in es if e.get("user_id")}), key
        assert r["active_days"] == len({_when(e).date() for e in es}), key
    # Consistent with usage_daily: the month's all-users daily rows add up to the monthly row.
    daily = await conn.fetch(
        "SELECT date_trunc('month', bucket, 'UTC') AS month, org_id::text AS org, "
        "project_id::text AS project, model, sum(request_count) AS requests, "
        "sum(total_input_tokens) AS input, "
        "sum(total_cost_cents) AS cost, count(*) AS days FROM usage_daily WHERE user_id IS NULL "
        "GROUP BY 1, 2, 3, 4"
    )
    assert len(daily) == len(got)
    for d in daily:
        r = got[(d["month"], d["org"], d["project"], d["model"])]
        assert (d["requests"], d["input"], d["cost"], d["days"]) == (
            r["request_count"],
            r["total_input_tokens"],
            r["total_cost_cents"],
            r["active_days"],
        )
    return len(want)


async def test_server_stats_and_usage_monthly_exact_after_crashes_duplicates_late_events_and_held_servers(
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
    conn = await asyncpg.connect(fresh_database_url)
    try:
        await _register(conn, *REGISTERED)
        events = _with_sessions(make_events(1500, seed=51, now=datetime.now(UTC)), seed=52)
        resent, end_offsets = await send(settings, events, resend_fraction=0.08, seed=53)
        assert resent > 60

        await crash_workers_then_finish_clean(
            settings, fresh_database_url, end_offsets, tmp_path, min_crashes=2
        )

        named = [e for e in events if e.get("server_id")]
        assert await verify_server_stats(conn, events, {REGISTERED}) > 50
        assert await _held_requests(conn) == sum(
            1 for e in named if (e["server_id"], e["organization_id"]) != REGISTERED
        )
        assert await verify_usage_monthly(conn, events) >= 4

        # Registering the held server folds its own organization's events, exactly; the other
        # organization's events naming it stay held and never touch its rows.
        await _register(conn, *LATE)
        await merger.merge_until_clean(conn)
        assert await verify_server_stats(conn, events, {REGISTERED, LATE}) > 100
        assert await _held_requests(conn) == sum(
            1 for e in named if (e["server_id"], e["organization_id"]) not in {REGISTERED, LATE}
        )
        assert await merger.held_server_deltas(conn) > 0
        await check_commands(fresh_database_url, conn)

        # The hourly prune keeps every set an accepted event can still reach (all of these), and
        # drops those past the lateness limit (all of them, seen from 200 days on).
        sets = ("server_window_sessions", "usage_month_users", "usage_active_days")
        before = [await conn.fetchval(f"SELECT count(*) FROM {table}") for table in sets]
        await merger.prune_user_sets(conn, 90)
        assert [await conn.fetchval(f"SELECT count(*) FROM {table}") for table in sets] == before
        assert min(before) > 0
        await merger.prune_user_sets(conn, 90, now=datetime.now(UTC) + timedelta(days=200))
        assert [await conn.fetchval(f"SELECT count(*) FROM {table}") for table in sets] == [0, 0, 0]
    finally:
        await conn.close()


def _valid_events(bodies: list[dict[str, Any]]) -> list[ValidEvent]:
    out = []
    for body in bodies:
        event = validate_event(orjson.dumps(body), datetime.now(UTC), POLICY)
        assert isinstance(event, ValidEvent), event
        out.append(event)
    return out


async def test_a_window_of_another_width_is_isolated_never_mixed_and_widths_must_divide_a_day(
    fresh_database_url: str,
) -> None:
    with pytest.raises(ValueError, match="divide a day"):
        AggregateDeltasWriter(7)
    await migrate(fresh_database_url)
    conn = await asyncpg.connect(fresh_database_url)
    try:
        server, other = REGISTERED[0], str(uuid.UUID(int=0xB0FF))
        await _register(conn, server, ORGS[0])
        await _register(conn, other, ORGS[0])
        window = (datetime.now(UTC) - timedelta(hours=1)).replace(minute=0, second=0, microsecond=0)

        def events(srv: str, n: int) -> list[ValidEvent]:
            stamp = window.isoformat(timespec="milliseconds").replace("+00:00", "Z")
            return _valid_events(
                [
                    {
                        "event_id": str(uuid.uuid4()),
                        "organization_id": ORGS[0],
                        "started_at": stamp,
                        "duration_ms": 10 * (i + 1),
                        "server_id": srv,
                    }
                    for i in range(n)
                ]
            )

        async with conn.transaction():
            await AggregateDeltasWriter(60).write(conn, events(server, 3), 0)
        await merger.merge_until_clean(conn)
        # The same window start at 120 s: not added to the 60 s row; the other server goes on.
        async with conn.transaction():
            await AggregateDeltasWriter(120).write(conn, events(server, 2) + events(other, 4), 0)
        stats = await merger.merge_until_clean(conn)
        assert stats is not None and [k.parts_table for k in stats.isolated] == ["server_stats_deltas"]
        assert "120" in stats.isolated[0].error and "60" in stats.isolated[0].error
        rows = {
            r["server"]: r for r in await conn.fetch("SELECT server_id::text AS server, * FROM server_stats")
        }
        assert (rows[server]["total_requests"], rows[server]["max_response_time_ms"]) == (3, 30)
        assert rows[server]["window_end"] - rows[server]["window_start"] == timedelta(seconds=60)
        assert (rows[other]["total_requests"], rows[other]["min_response_time_ms"]) == (4, 10)
        assert rows[other]["window_end"] - rows[other]["window_start"] == timedelta(seconds=120)
    finally:
        await conn.close()
