"""The rollup views per backend: statements parse as PostgreSQL and say what we mean (parse tree)."""

from __future__ import annotations

from typing import Any

import pglast
import pytest
from pglast import ast
from pglast.stream import RawStream

from sinks.aggregate_timescale import MCP_USAGE_HOURLY, rollup_statements
from sinks.timescale import Backend


def _stmt(sql: str) -> Any:
    (raw,) = pglast.parse_sql(sql)
    return raw.stmt


def _call(sql: str) -> tuple[str, dict[str, str]]:
    """`SELECT fn(positional, name => value ...)`: the function and its named arguments as SQL text."""
    stmt = _stmt(sql)
    assert isinstance(stmt, ast.SelectStmt)
    targets: Any = stmt.targetList
    call: Any = targets[0].val
    assert isinstance(call, ast.FuncCall)
    args: Any = call.args
    names: Any = call.funcname
    named = {str(a.name): RawStream()(a.arg or "") for a in args if isinstance(a, ast.NamedArgExpr)}
    return str(names[-1].sval), named


def _plain_view(statements: list[str]) -> Any:
    (statement,) = statements
    stmt = _stmt(statement)
    assert isinstance(stmt, ast.ViewStmt)
    view: Any = stmt
    assert view.replace and view.view.relname == MCP_USAGE_HOURLY
    assert "date_trunc('hour', time)" in statement
    # Reads as its caller: mcp_usage's row security applies to whoever queries the view.
    options = {(o.defname, RawStream()(o.arg)) for o in view.options}
    assert options == {("security_invoker", "'true'")}
    return view


def test_native_is_a_plain_view_grouped_by_hour() -> None:
    _plain_view(rollup_statements(Backend.NATIVE, 90))


@pytest.mark.parametrize("backend", list(Backend))
def test_row_security_on_mcp_usage_means_the_plain_view(backend: Backend) -> None:
    # TimescaleDB refuses a continuous aggregate over a table with row security.
    _plain_view(rollup_statements(backend, 90, row_security=True))


@pytest.mark.parametrize("age", [1, 30, 90])
def test_timescale_continuous_aggregate_covers_the_accepted_lateness(age: int) -> None:
    statements = rollup_statements(Backend.TIMESCALEDB, age)
    create = _stmt(statements[0])
    assert isinstance(create, ast.CreateTableAsStmt)
    into: Any = create.into
    assert into.skipData  # WITH NO DATA
    options = {(o.defnamespace, o.defname) for o in into.options}
    assert options == {("timescaledb", "continuous"), ("timescaledb", "materialized_only")}
    assert "time_bucket(INTERVAL '1 hour', time)" in statements[0]
    name, args = _call(statements[1])
    assert name == "add_continuous_aggregate_policy"
    # The refresh window must reach back to the oldest event still accepted, or late events
    # would never be materialised.
    assert args["start_offset"] == f"CAST('{age + 1} days' AS interval)"
    assert args["if_not_exists"].lower() == "true"
    assert isinstance(_stmt(statements[2]), ast.AlterTableStmt)
    name, args = _call(statements[3])
    assert name == "add_compression_policy"
    # TimescaleDB refuses compress_after inside the refresh window.
    compress_days = int(args["compress_after"].split("'")[1].split()[0])
    assert compress_days > age + 1
