"""The TimescaleDB path, which cannot run here: its statements must parse as PostgreSQL, say what
we mean (checked on the parse tree), and be chosen exactly when the extension can be used."""

from __future__ import annotations

import re
from datetime import date
from typing import Any

import pglast
import pytest
from pglast import ast
from pglast.enums import AlterTableType

from sinks.migrate import Migration, MigrationError, discover, render
from sinks.partitions import TIME_PARTITIONED, create_partition_sql
from sinks.timescale import (
    Backend,
    choose_backend,
    detect_backend,
    hypertable_statements,
    retention_policy_statements,
)


def _calls(statements: tuple[ast.RawStmt, ...]) -> dict[str, list[ast.FuncCall]]:
    """Top-level `SELECT fn(...)` calls by function name."""
    calls: dict[str, list[ast.FuncCall]] = {}
    for raw in statements:
        stmt = raw.stmt
        if (
            isinstance(stmt, ast.SelectStmt)
            and stmt.targetList
            and isinstance(stmt.targetList[0].val, ast.FuncCall)
        ):
            call = stmt.targetList[0].val
            calls.setdefault(call.funcname[-1].sval, []).append(call)
    return calls


def _const(node: Any) -> Any:
    value = node.val
    return getattr(value, "sval", None) or getattr(value, "boolval", None)


def _named(call: ast.FuncCall) -> dict[str, Any]:
    return {arg.name: arg.arg for arg in call.args if isinstance(arg, ast.NamedArgExpr)}


def _interval_text(node: Any) -> str:
    assert isinstance(node, ast.TypeCast) and node.typeName.names[-1].sval == "interval"
    return str(node.arg.val.sval)


def test_native_rendering_partitions_every_marked_table_and_parses() -> None:
    partitioned: dict[str, str] = {}
    for migration in discover():
        sql = render(migration, Backend.NATIVE)
        assert re.search(r"/\*\s*omnilog:partitioned\s+\w+", sql) is None
        assert "create_hypertable" not in sql
        for raw in pglast.parse_sql(sql):
            stmt = raw.stmt
            if isinstance(stmt, ast.CreateStmt) and stmt.partspec is not None:
                assert stmt.partspec.strategy == "r"  # RANGE
                (param,) = stmt.partspec.partParams
                partitioned[stmt.relation.relname] = param.name
    assert partitioned == {spec.table: spec.column for spec in TIME_PARTITIONED.values()}


def test_timescale_rendering_makes_hypertables_with_policies_and_parses() -> None:
    calls: dict[str, list[ast.FuncCall]] = {}
    compress: dict[str, dict[str, str]] = {}
    for migration in discover():
        sql = render(migration, Backend.TIMESCALEDB, retention_days=45)
        statements = pglast.parse_sql(sql)
        for name, found in _calls(statements).items():
            calls.setdefault(name, []).extend(found)
        for raw in statements:
            stmt = raw.stmt
            if isinstance(stmt, ast.AlterTableStmt):
                for cmd in stmt.cmds:
                    if cmd.subtype != AlterTableType.AT_SetRelOptions:
                        continue
                    options = {
                        d.defname: (d.arg.sval if d.arg is not None else "")
                        for d in cmd.def_
                        if d.defnamespace == "timescaledb"
                    }
                    if options:  # other migrations set plain options too (security_invoker on views)
                        compress[stmt.relation.relname] = options
            if isinstance(stmt, ast.CreateStmt):
                assert stmt.partspec is None, stmt.relation.relname

    hypertables = {_const(c.args[0]): (_const(c.args[1]), _named(c)) for c in calls["create_hypertable"]}
    assert {t: col for t, (col, _) in hypertables.items()} == {
        "log_index": "started_at",
        "usage_events": "time",
        "mcp_usage": "time",
        "health_checks": "checked_at",
    }
    chunks = {t: _interval_text(named["chunk_time_interval"]) for t, (_, named) in hypertables.items()}
    assert chunks == {
        "log_index": "1 day",
        "usage_events": "1 day",
        "mcp_usage": "1 day",
        "health_checks": "1 month",
    }

    retention = {_const(c.args[0]): _interval_text(c.args[1]) for c in calls["add_retention_policy"]}
    # One day behind the retention for the tables that follow the horizon (maintain drops first).
    assert retention == {
        "log_index": "46 days",
        "usage_events": "46 days",
        "mcp_usage": "46 days",
        "health_checks": "30 days",
    }
    assert compress["log_index"]["compress_segmentby"] == "organization_id"
    assert compress["usage_events"]["compress_segmentby"] == "org_id, project_id"
    assert compress["log_index"]["compress_orderby"] == "started_at DESC"
    assert set(compress) == {"log_index", "usage_events"}
    assert {_const(c.args[0]) for c in calls["add_compression_policy"]} == {"log_index", "usage_events"}


def test_hypertable_is_created_after_its_table_in_the_same_file() -> None:
    converted: set[str] = set()
    for migration in discover():
        created_at: dict[str, int] = {}
        for position, raw in enumerate(pglast.parse_sql(render(migration, Backend.TIMESCALEDB))):
            stmt = raw.stmt
            if isinstance(stmt, ast.CreateStmt):
                created_at[stmt.relation.relname] = position
            for call in _calls((raw,)).get("create_hypertable", []):
                table = _const(call.args[0])
                assert created_at.get(table, position) < position, table
                converted.add(table)
    assert converted == set(TIME_PARTITIONED)


def test_maintain_policy_stays_a_day_behind_the_horizon() -> None:
    for spec in TIME_PARTITIONED.values():
        statements = pglast.parse_sql(";".join(retention_policy_statements(spec, 90)))
        (added,) = _calls(statements)["add_retention_policy"]
        expected = "30 days" if spec.table == "health_checks" else "91 days"
        assert _interval_text(added.args[1]) == expected, spec.table


def test_policy_and_partition_statements_parse() -> None:
    for spec in TIME_PARTITIONED.values():
        statements = (
            hypertable_statements(spec, 90)
            + retention_policy_statements(spec, 90)
            + create_partition_sql(spec, date(2025, 1, 31))
        )
        for statement in statements:
            assert len(pglast.parse_sql(statement)) == 1, statement


def test_unregistered_partitioned_table_is_refused() -> None:
    migration = Migration(9, "0009_bad", "CREATE TABLE x (t timestamptz) /* omnilog:partitioned x */;", "0")
    with pytest.raises(MigrationError, match="x is not registered"):
        render(migration, Backend.NATIVE)


@pytest.mark.parametrize(
    ("available", "installed", "preload", "expected"),
    [
        (False, False, "", Backend.NATIVE),
        (True, False, "", Backend.NATIVE),  # CREATE EXTENSION would fail: not preloaded
        (True, False, "pg_stat_statements, timescaledb", Backend.TIMESCALEDB),
        (True, False, '"timescaledb"', Backend.TIMESCALEDB),
        (True, True, "timescaledb", Backend.TIMESCALEDB),
        (False, False, "timescaledb_toolkit", Backend.NATIVE),
    ],
)
def test_backend_choice(available: bool, installed: bool, preload: str, expected: Backend) -> None:
    assert choose_backend(available, installed, preload) is expected


class _FakeConn:
    def __init__(self, row: dict[str, Any]) -> None:
        self.row = row
        self.queries: list[str] = []

    async def fetchrow(self, query: str) -> dict[str, Any]:
        self.queries.append(query)
        return self.row


async def test_detect_backend_reads_the_extension_catalog() -> None:
    fake = _FakeConn({"available": True, "installed": False, "preload": "timescaledb"})
    assert await detect_backend(fake) is Backend.TIMESCALEDB  # type: ignore[arg-type]
    assert "pg_available_extensions" in fake.queries[0]
    fake = _FakeConn({"available": False, "installed": False, "preload": ""})
    assert await detect_backend(fake) is Backend.NATIVE  # type: ignore[arg-type]
