"""The usage dashboard's SQL against real rollups: events go through the worker's batch extensions
and the merger into a migrated database, then every panel and variable query runs and returns the
numbers the events make (tokens, cost, users, months, top tools, server error rates)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest

from pipeline.contract import ValidationPolicy, ValidEvent, validate_event
from sinks import merger
from sinks.aggregate_timescale import ensure_rollup_views
from sinks.aggregates import build_extensions
from sinks.migrate import migrate
from sinks.partitions import ensure_day_partitions
from tests.deploy.grafana_sql import USAGE_DASHBOARD, expand, panel_queries, variable_queries

pytestmark = pytest.mark.integration

ORG, OTHER_ORG = str(uuid.UUID(int=0xA1)), str(uuid.UUID(int=0xA2))
PROJECT = str(uuid.UUID(int=0xC1))
S1, S2 = str(uuid.UUID(int=0xB1)), str(uuid.UUID(int=0xB2))
POLICY = ValidationPolicy(timedelta(days=90), timedelta(hours=1))


def _event(org: str, started: datetime, **fields: Any) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "organization_id": org,
        "started_at": started.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "duration_ms": 40,
        **fields,
    }


def _traffic(hour: datetime) -> list[dict[str, Any]]:
    usage = {
        "project_id": PROJECT,
        "model": "gpt-x",
        "input_tokens": 100,
        "output_tokens": 20,
        "cost_cents": 7,
    }
    events = [_event(ORG, hour + timedelta(minutes=i), user_id=f"u{i % 3}", **usage) for i in range(6)]
    events += [_event(ORG, hour + timedelta(minutes=1), user_id="u9", model="claude-y", input_tokens=5)]
    events += [
        _event(
            ORG,
            hour + timedelta(minutes=2),
            server_id=S1,
            event_type="mcp_tool",
            mcp_tool_name="search",
            status="success",
        )
        for _ in range(3)
    ]
    events += [
        _event(
            ORG,
            hour + timedelta(minutes=2),
            server_id=S1,
            event_type="mcp_tool",
            mcp_tool_name="fetch",
            status="error",
            status_code=500,
        )
    ]
    events += [
        _event(ORG, hour + timedelta(minutes=3), server_id=S2, status_code=code) for code in (200, 500)
    ]
    events += [_event(OTHER_ORG, hour, user_id="x", server_id=S1, **usage)]  # another tenant: never shown
    return events


async def _write(conn: asyncpg.Connection, bodies: list[dict[str, Any]], now: datetime) -> None:
    events = []
    for body in bodies:
        event = validate_event(orjson.dumps(body), now, POLICY)
        assert isinstance(event, ValidEvent), event
        events.append(event)
    days = {e.started_at.date() for e in events}
    for table in ("usage_events", "mcp_usage"):
        await ensure_day_partitions(conn, table, days)
    async with conn.transaction():
        for extension in build_extensions():
            await extension.write(conn, events, 0)


async def test_usage_dashboard_queries_return_the_rollups_of_the_events(fresh_database_url: str) -> None:
    await migrate(fresh_database_url)
    now = datetime.now(UTC)
    hour = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    variables = {"organization": [ORG]}
    start, end = hour - timedelta(hours=1), hour + timedelta(hours=2)
    conn = await asyncpg.connect(fresh_database_url)
    try:
        await ensure_rollup_views(conn, 90)
        for org in (ORG, OTHER_ORG):
            await conn.execute(
                "INSERT INTO organizations (id, name, slug) VALUES ($1::text::uuid, $1::text, $1::text)", org
            )
        for server, name in ((S1, "search-server"), (S2, "files-server")):
            await conn.execute(
                "INSERT INTO mcp_servers (id, organization_id, name, protocol) VALUES ($1, $2, $3, 'http')",
                server,
                ORG,
                name,
            )
        await _write(conn, _traffic(hour), now)
        await merger.merge_until_clean(conn)
        results = {}
        for title, sql in panel_queries(USAGE_DASHBOARD):
            results[title] = await conn.fetch(expand(sql, variables, start, end))
        options = {}
        for name, sql in variable_queries(USAGE_DASHBOARD):
            options[name] = await conn.fetch(expand(sql, variables, start, end))
    finally:
        await conn.close()

    # the MCP tool events carry usage fields (event_type, status): a row without project or model
    gpt, claude, neither = f"{PROJECT} / gpt-x", "(none) / claude-y", "(none) / (none)"
    tokens = {(r["time"], r["metric"]): r["tokens"] for r in results["Tokens per hour by project and model"]}
    assert tokens == {(hour, gpt): 6 * 120, (hour, claude): 5, (hour, neither): 0}
    cost = {(r["time"], r["metric"]): r["cost"] for r in results["Cost per hour by project and model"]}
    assert cost[(hour, gpt)] == pytest.approx(0.42)
    users = {
        (r["time"], r["metric"]): r["users"] for r in results["Unique users per day by project and model"]
    }
    assert users[(hour.replace(hour=0), gpt)] == 3 and users[(hour.replace(hour=0), claude)] == 1
    months = {r["project_model"]: r for r in results["Months by project and model"]}
    assert set(months) >= {gpt, claude} and OTHER_ORG not in str(results["Months by project and model"])
    assert (months[gpt]["requests"], months[gpt]["users"], months[gpt]["active_days"]) == (6, 3, 1)
    tools = [(r["tool"], r["server"], r["calls"]) for r in results["Top MCP tools"]]
    assert tools == [("search", "search-server", 3), ("fetch", "search-server", 1)]
    error_rates = {r["metric"]: r["error_rate"] for r in results["Error rate per server (server_stats)"]}
    assert error_rates == {"search-server": pytest.approx(0.25), "files-server": pytest.approx(0.5)}
    # choices: organizations with usage in the last 35 days, by name
    assert [r["__value"] for r in options["organization"]] == sorted([ORG, OTHER_ORG])
