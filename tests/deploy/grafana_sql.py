"""Expands the Grafana macros and variables our Postgres panels use, as Grafana's SQL datasource
does, so the panel SQL can be parsed and run in tests."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.deploy.support import DASHBOARDS

GATEWAY_DASHBOARD = DASHBOARDS / "omnilog-gateway-traffic.json"
USAGE_DASHBOARD = DASHBOARDS / "omnilog-usage.json"
_INTERVALS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def expand(sql: str, variables: dict[str, list[str]], start: datetime, end: datetime) -> str:
    """`$__timeFilter(col)`, `$__timeFrom()`, `$__timeTo()`, `$__timeGroupAlias(col, 'Nm')` (epoch
    seconds, as Grafana's PostgreSQL datasource writes it) and `${var:sqlstring}` (quoted,
    comma-joined values)."""

    def time_filter(match: re.Match[str]) -> str:
        column = match.group(1)
        low, high = _literal(start.isoformat()), _literal(end.isoformat())
        return f"{column} BETWEEN {low}::timestamptz AND {high}::timestamptz"

    def variable(match: re.Match[str]) -> str:
        return ",".join(_literal(v) for v in variables[match.group(1)])

    def time_group(match: re.Match[str]) -> str:
        column, amount, unit = match.group(1), int(match.group(2)), match.group(3)
        seconds = amount * _INTERVALS[unit]
        return f'floor(extract(epoch from {column})/{seconds})*{seconds} AS "time"'

    out = re.sub(r"\$__timeFilter\(([^)]+)\)", time_filter, sql)
    out = re.sub(r"\$__timeGroupAlias\(([^,]+),\s*'(\d+)([smhd])'\)", time_group, out)
    out = out.replace("$__timeFrom()", _literal(start.isoformat())).replace(
        "$__timeTo()", _literal(end.isoformat())
    )
    out = re.sub(r"\$\{(\w+):sqlstring\}", variable, out)
    leftover = re.findall(r"\$\S+", out)
    assert not leftover, f"unexpanded Grafana syntax: {leftover}"
    return out


def panel_queries(dashboard: Path = GATEWAY_DASHBOARD) -> Iterator[tuple[str, str]]:
    """(panel title, raw SQL) of every Postgres panel."""
    board = json.loads(dashboard.read_text())
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            if "rawSql" in target:
                yield panel["title"], target["rawSql"]


def variable_queries(dashboard: Path = GATEWAY_DASHBOARD) -> Iterator[tuple[str, str]]:
    board: dict[str, Any] = json.loads(dashboard.read_text())
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            yield var["name"], var["query"]
