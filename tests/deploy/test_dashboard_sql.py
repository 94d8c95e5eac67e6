"""The gateway-traffic dashboard's SQL, run against a migrated database holding known aggregate
rows: every panel and variable query runs, and the numbers are the ones the rows hold."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from sinks.migrate import migrate
from tests.deploy.grafana_sql import expand, panel_queries, variable_queries

pytestmark = pytest.mark.integration

ORG = uuid.UUID(int=0xA1)
OTHER_ORG = uuid.UUID(int=0xA2)
S1, S2 = uuid.UUID(int=0xB1), uuid.UUID(int=0xB2)


async def _seed(conn: asyncpg.Connection, hour: datetime) -> None:
    rows = [
        # (org, server, method, window, start, total, errors, p95, p99)
        (ORG, S1, "tools/call", "hourly", hour, 80, 8, 120, 300),
        (ORG, S1, "resources/read", "hourly", hour, 20, 0, 40, 60),
        (ORG, S1, None, "hourly", hour, 100, 8, 110, 290),
        (ORG, S2, "tools/call", "hourly", hour, 50, 25, 900, 1500),
        (ORG, S2, None, "hourly", hour, 50, 25, 900, 1500),
        (ORG, S1, None, "hourly", hour + timedelta(hours=1), 30, 3, 100, 200),
        (ORG, None, None, "hourly", hour, 150, 33, 500, 1400),
        (ORG, S1, "tools/call", "daily", hour.replace(hour=0), 80, 8, 120, 300),
        (ORG, S1, None, "daily", hour.replace(hour=0), 130, 11, 110, 290),
        (OTHER_ORG, S1, None, "hourly", hour, 999, 999, 1, 1),
    ]
    await conn.executemany(
        """INSERT INTO log_aggregates (organization_id, server_id, rpc_method, window_type, window_start,
               total_requests, success_requests, error_requests, p95_duration_ms, p99_duration_ms)
           VALUES ($1, $2, $3, $4, $5, $6::bigint, $6::bigint - $7::bigint, $7, $8, $9)""",
        rows,
    )


async def test_gateway_dashboard_queries_return_the_aggregates(fresh_database_url: str) -> None:
    await migrate(fresh_database_url)
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    variables = {
        "organization": [str(ORG)],
        "window": ["hourly"],
        "server": [str(S1), str(S2)],
        "method": ["tools/call", "resources/read"],
    }
    start, end = hour - timedelta(hours=1), hour + timedelta(hours=2)
    conn = await asyncpg.connect(fresh_database_url)
    try:
        await _seed(conn, hour)
        results = {}
        for title, sql in panel_queries():
            results[title] = await conn.fetch(expand(sql, variables, start, end))
        options = {}
        for name, sql in variable_queries():
            options[name] = await conn.fetch(expand(sql, variables, start, end))
    finally:
        await conn.close()

    requests = {(r["time"], r["metric"]): r["requests"] for r in results["Requests per server"]}
    assert requests == {(hour, str(S1)): 100, (hour, str(S2)): 50, (hour + timedelta(hours=1), str(S1)): 30}
    errors = {(r["time"], r["metric"]): r["error_rate"] for r in results["Error rate per server"]}
    assert errors[(hour, str(S1))] == pytest.approx(0.08) and errors[(hour, str(S2))] == pytest.approx(0.5)
    p95 = {(r["time"], r["metric"]): r["p95_ms"] for r in results["p95 latency per server"]}
    assert p95[(hour, str(S2))] == 900
    p99 = {(r["time"], r["metric"]): r["p99_ms"] for r in results["p99 latency per server"]}
    assert p99[(hour, str(S1))] == 290
    per_method = {(r["time"], r["metric"]): r["requests"] for r in results["Requests per method"]}
    assert per_method == {(hour, "tools/call"): 130, (hour, "resources/read"): 20}
    table = {(r["server"], r["method"]): r for r in results["Servers and methods over the time range"]}
    assert set(table) == {(str(S1), "tools/call"), (str(S1), "resources/read"), (str(S2), "tools/call")}
    assert table[(str(S2), "tools/call")]["errors"] == 25
    assert table[(str(S1), "tools/call")]["worst_p99_ms"] == 300
    assert next(iter(table)) == (str(S1), "tools/call")  # busiest first
    (total,) = results["All requests and errors of the organization"]
    assert (total["requests"], total["errors"]) == (150, 33)

    # Choices come from the last 35 days' daily rows (cheap to scan): OTHER_ORG has none.
    assert [r["__value"] for r in options["organization"]] == [str(ORG)]
    assert [r["__value"] for r in options["server"]] == [str(S1)]  # daily rows of the chosen org
    assert [r["__text"] for r in options["method"]] == ["tools/call"]
