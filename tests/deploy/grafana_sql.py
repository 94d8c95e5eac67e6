"""Expands the Grafana macros and variables our Postgres panels use, as Grafana's SQL datasource
does, so the panel SQL can be parsed and run in tests."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from tests.deploy.support import DASHBOARDS

GATEWAY_DASHBOARD = DASHBOARDS / "omnilog-gateway-traffic.json"


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def expand(sql: str, variables: dict[str, list[str]], start: datetime, end: datetime) -> str:
    """`$__timeFilter(col)` and `${var:sqlstring}` (quoted, comma-joined values)."""

    def time_filter(match: re.Match[str]) -> str:
        column = match.group(1)
        low, high = _literal(start.isoformat()), _literal(end.isoformat())
        return f"{column} BETWEEN {low}::timestamptz AND {high}::timestamptz"

    def variable(match: re.Match[str]) -> str:
        return ",".join(_literal(v) for v in variables[match.group(1)])

    out = re.sub(r"\$__timeFilter\(([^)]+)\)", time_filter, sql)
    out = re.sub(r"\$\{(\w+):sqlstring\}", variable, out)
    leftover = re.findall(r"\$\S+", out)
    assert not leftover, f"unexpanded Grafana syntax: {leftover}"
    return out


def panel_queries() -> Iterator[tuple[str, str]]:
    """(panel title, raw SQL) of every Postgres panel."""
    board = json.loads(GATEWAY_DASHBOARD.read_text())
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            if "rawSql" in target:
                yield panel["title"], target["rawSql"]


def variable_queries() -> Iterator[tuple[str, str]]:
    board: dict[str, Any] = json.loads(GATEWAY_DASHBOARD.read_text())
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            yield var["name"], var["query"]
