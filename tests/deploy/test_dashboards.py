"""The Grafana dashboards: generated files are current, well-formed, every variable used is
defined, and every Postgres query is valid PostgreSQL once Grafana's macros are expanded."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

import pglast
import pytest

from tests.deploy.grafana_sql import USAGE_DASHBOARD, expand, panel_queries, variable_queries
from tests.deploy.support import DASHBOARDS, load_tool_module

BOARDS = sorted(DASHBOARDS.glob("*.json"))
_VARS = {
    "organization": ["00000000-0000-0000-0000-000000000001"],
    "window": ["hourly"],
    "server": ["00000000-0000-0000-0000-0000000000aa", "x'y"],
    "method": ["tools/call"],
}


# Grafana's PostgreSQL datasource macros (expanded in tests by tests/deploy/grafana_sql.py).
GRAFANA_MACROS = {"__timeFilter", "__timeFrom", "__timeTo", "__timeGroupAlias"}


def test_dashboard_files_are_generated() -> None:
    rendered = load_tool_module("gen_dashboards").render_all()
    assert {p.name for p in BOARDS} == set(rendered)
    for path in BOARDS:
        assert path.read_text() == rendered[path.name], "stale: run python deploy/tools/gen_dashboards.py"


@pytest.mark.parametrize("path", BOARDS, ids=lambda p: p.name)
def test_dashboard_is_well_formed(path: Any) -> None:
    board = json.loads(path.read_text())
    assert board["uid"] == path.stem and board["title"].startswith("Omnilog / ")
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    defined = {v["name"] for v in board["templating"]["list"]} | {"__rate_interval", "__interval"}
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        text = json.dumps(panel["targets"])
        used = set(re.findall(r"\$\{?(\w+)", text)) - GRAFANA_MACROS
        assert used <= defined, f"{panel['title']}: undefined variables {used - defined}"
    # Panels never overlap.
    cells = set()
    for panel in board["panels"]:
        g = panel["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel"
                cells.add((x, y))


def test_every_postgres_query_parses() -> None:
    start, end = datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)
    queries = [*panel_queries(), *variable_queries()]
    assert len(queries) >= 9
    usage = [*panel_queries(USAGE_DASHBOARD), *variable_queries(USAGE_DASHBOARD)]
    assert len(usage) >= 7
    queries += usage
    for title, sql in queries:
        statements = pglast.parse_sql(expand(sql, _VARS, start, end))
        assert len(statements) == 1, title


def test_sqlstring_variables_are_quoted_safely() -> None:
    start = end = datetime(2026, 1, 1, tzinfo=UTC)
    sql = expand("SELECT 1 WHERE a IN (${server:sqlstring})", _VARS, start, end)
    assert sql.endswith("IN ('00000000-0000-0000-0000-0000000000aa','x''y')")
