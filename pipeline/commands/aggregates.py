"""`omnilog aggregates show | usage | servers | monthly | merge | isolated | release`: read the
rollups, run merge passes, list the keys the merger held aside and release them."""

from __future__ import annotations

import asyncio
import re
import sys
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
import orjson

from pipeline.settings import Settings, load_settings

_RELATIVE = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}

_env_file = click.option("--env-file", type=click.Path(path_type=Path), help="A .env-style file of settings.")
_window = click.option(
    "--window", type=click.Choice(["hourly", "daily"]), default="hourly", show_default=True
)
_since = click.option(
    "--since", default="24h", show_default=True, help="RFC 3339, or a span back from now: 6h, 7d."
)
_until = click.option("--until", default=None, help="RFC 3339, or a span back from now [default: now].")
_json = click.option("--json", "as_json", is_flag=True, help="JSON Lines instead of a table.")


def parse_time(value: str, option: str, now: datetime) -> datetime:
    match = _RELATIVE.match(value)
    if match:
        return now - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"expected RFC 3339 or a span like 6h, got {value!r}", param_hint=option
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _uuid(value: str, option: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise click.BadParameter(f"not a UUID: {value!r}", param_hint=option) from None


def _range(since: str, until: str | None) -> tuple[datetime, datetime]:
    now = datetime.now(UTC)
    start = parse_time(since, "--since", now)
    end = parse_time(until, "--until", now) if until else now + timedelta(hours=1)
    return start, end


def _cell(value: Any) -> str:
    if value is None:
        return "all"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M")
    return str(value)


def _print(
    rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], as_json: bool, title: str
) -> None:
    if as_json:
        for row in rows:
            click.echo(orjson.dumps(row, default=str).decode())
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for _, header in columns:
        table.add_column(header, justify="right" if header[:1].islower() else "left")
    for row in rows:
        table.add_row(*(_cell(row[name]) for name, _ in columns))
    Console().print(table)


@click.group("aggregates")
def command() -> None:
    """Hourly and daily rollups (log_aggregates, usage) and their merger."""


@command.command("show")
@_env_file
@click.option("--org", "org", required=True, help="Organization id.")
@click.option("--server", default=None, help="Server id ('none': events without a server).")
@click.option("--method", default=None, help="rpc_method ('' : events without a method).")
@click.option(
    "--level",
    type=click.Choice(["org", "server", "method"]),
    default=None,
    help="Rows per org, per (org, server) or per (org, server, method) [default: from the filters].",
)
@_window
@_since
@_until
@_json
def show(
    env_file: Path | None,
    org: str,
    server: str | None,
    method: str | None,
    level: str | None,
    window: str,
    since: str,
    until: str | None,
    as_json: bool,
) -> None:
    """Print log_aggregates rows of an organization over a time range."""
    from sinks.aggregates import NO_SERVER, AggregatesQuery, query_log_aggregates

    settings = load_settings(env_file)
    start, end = _range(since, until)
    server_id = None if server is None else NO_SERVER if server == "none" else _uuid(server, "--server")
    chosen = level or ("method" if method is not None else "server" if server is not None else "org")
    query = AggregatesQuery(
        organization_id=_uuid(org, "--org"),
        window=window,  # type: ignore[arg-type]  # click.Choice
        since=start,
        until=end,
        level=chosen,  # type: ignore[arg-type]
        server_id=server_id,
        rpc_method=method,
    )
    rows = asyncio.run(_with_conn(settings, lambda conn: query_log_aggregates(conn, query)))
    columns = [
        ("window_start", "Window"),
        ("server_id", "Server"),
        ("rpc_method", "Method"),
        ("total_requests", "requests"),
        ("error_requests", "errors"),
        ("p50_duration_ms", "p50 ms"),
        ("p95_duration_ms", "p95 ms"),
        ("p99_duration_ms", "p99 ms"),
        ("avg_duration_ms", "avg ms"),
        ("total_bytes_in", "bytes in"),
        ("total_bytes_out", "bytes out"),
    ]
    _print(rows, columns, as_json, f"{window} log aggregates of {query.organization_id}")


@command.command("usage")
@_env_file
@click.option("--org", "org", required=True, help="Organization id.")
@_window
@_since
@_until
@_json
def usage(env_file: Path | None, org: str, window: str, since: str, until: str | None, as_json: bool) -> None:
    """Print the usage rollups (usage_hourly, or usage_daily for all users) of an organization."""
    from sinks.aggregates import query_usage

    settings = load_settings(env_file)
    start, end = _range(since, until)
    org_id = _uuid(org, "--org")
    rows = asyncio.run(
        _with_conn(settings, lambda conn: query_usage(conn, org_id, window, start, end))  # type: ignore[arg-type]
    )
    columns = [
        ("bucket", "Bucket"),
        ("project_id", "Project"),
        ("model", "Model"),
        ("request_count", "requests"),
        ("error_count", "errors"),
        ("total_input_tokens", "input tok"),
        ("total_output_tokens", "output tok"),
        ("total_cost_cents", "cost ¢"),
        ("p50_latency_ms", "p50 ms"),
        ("p99_latency_ms", "p99 ms"),
        ("unique_users", "users"),
    ]
    _print(rows, columns, as_json, f"{window} usage of {org_id}")


@command.command("servers")
@_env_file
@click.option("--org", "org", required=True, help="Organization id.")
@click.option("--server", default=None, help="Only this server id.")
@click.option("--since", default="1h", show_default=True, help="RFC 3339, or a span back from now: 15m, 6h.")
@_until
@_json
def servers(
    env_file: Path | None, org: str, server: str | None, since: str, until: str | None, as_json: bool
) -> None:
    """Print server_stats windows of an organization's registered servers, and how many server
    deltas are held for servers not registered (yet)."""
    from sinks.aggregates import query_server_stats
    from sinks.merger import held_server_deltas

    settings = load_settings(env_file)
    start, end = _range(since, until)
    org_id = _uuid(org, "--org")
    server_id = None if server is None else _uuid(server, "--server")

    async def run(conn: Any) -> tuple[list[dict[str, Any]], int]:
        return await query_server_stats(conn, org_id, start, end, server_id), await held_server_deltas(
            conn, org_id
        )

    rows, held = asyncio.run(_with_conn(settings, run))
    columns = [
        ("window_start", "Window"),
        ("server_name", "Server"),
        ("total_requests", "requests"),
        ("error_requests", "errors"),
        ("active_sessions", "sessions"),
        ("avg_response_time_ms", "avg ms"),
        ("min_response_time_ms", "min ms"),
        ("max_response_time_ms", "max ms"),
    ]
    _print(rows, columns, as_json, f"server stats of {org_id}")
    if held:
        click.echo(
            f"{held} server_stats deltas held for servers not registered to their organization", err=True
        )


@command.command("monthly")
@_env_file
@click.option("--org", "org", required=True, help="Organization id.")
@click.option(
    "--since", default="90d", show_default=True, help="RFC 3339, or a span back from now (its month on)."
)
@_until
@_json
def monthly(env_file: Path | None, org: str, since: str, until: str | None, as_json: bool) -> None:
    """Print usage_monthly rows (per month, project and model) of an organization."""
    from sinks.aggregates import query_usage_monthly

    settings = load_settings(env_file)
    start, end = _range(since, until)
    org_id = _uuid(org, "--org")
    rows = asyncio.run(_with_conn(settings, lambda conn: query_usage_monthly(conn, org_id, start, end)))
    columns = [
        ("month", "Month"),
        ("project_id", "Project"),
        ("model", "Model"),
        ("request_count", "requests"),
        ("error_count", "errors"),
        ("total_input_tokens", "input tok"),
        ("total_output_tokens", "output tok"),
        ("total_cost_cents", "cost ¢"),
        ("unique_users", "users"),
        ("active_days", "days"),
    ]
    _print(rows, columns, as_json, f"monthly usage of {org_id}")


@command.command("merge")
@_env_file
@click.option("--wait", default=30.0, show_default=True, help="Seconds to wait for a busy merger lock.")
def merge(env_file: Path | None, wait: float) -> None:
    """Fold every pending delta (waits while other mergers hold all the locks)."""
    from sinks.aggregate_timescale import ensure_rollup_views
    from sinks.merger import merge_until_clean

    settings = load_settings(env_file)

    async def run(conn: Any) -> Any:
        await ensure_rollup_views(conn, settings.max_event_age_days)
        deadline = asyncio.get_running_loop().time() + wait
        while True:
            stats = await merge_until_clean(conn)
            if stats is not None or asyncio.get_running_loop().time() > deadline:
                return stats
            await asyncio.sleep(0.5)

    stats = asyncio.run(_with_conn(settings, run))
    if stats is None:
        click.echo("omnilog aggregates merge: another merger held the lock throughout", err=True)
        sys.exit(1)
    click.echo(
        f"merged {stats.deltas_folded} deltas into {stats.log_rows} log_aggregates rows "
        f"and {stats.usage_rows} usage rows and {stats.server_rows} server_stats rows"
    )
    for isolated in stats.isolated:
        key = " ".join(str(v) for v in isolated.key)
        click.echo(f"isolated {isolated.parts_table} {key}: {isolated.error}", err=True)


@command.command("isolated")
@_env_file
@_json
def isolated(env_file: Path | None, as_json: bool) -> None:
    """List the aggregate keys the merger held aside because their merge failed."""
    from sinks.merger import list_isolated

    settings = load_settings(env_file)
    rows = asyncio.run(_with_conn(settings, list_isolated))
    for row in rows:
        row["key_values"] = " ".join(row["key_values"])
    columns = [
        ("parts_table", "Deltas table"),
        ("window_start", "Window"),
        ("key_values", "Key"),
        ("isolated_at", "Isolated at"),
        ("error", "Error"),
    ]
    _print(rows, columns, as_json, "isolated aggregate keys")


@command.command("release")
@_env_file
@click.option(
    "--table",
    "parts_table",
    type=click.Choice(
        [
            "log_aggregate_deltas",
            "usage_deltas",
            "usage_user_deltas",
            "server_stats_deltas",
            "usage_monthly_deltas",
        ]
    ),
    default=None,
    help="Only keys of this deltas table [default: all tables].",
)
@click.option("--org", "org", default=None, help="Only keys of this organization [default: all].")
def release(env_file: Path | None, parts_table: str | None, org: str | None) -> None:
    """Release isolated keys: the next merge pass retries them (and isolates them again if they
    still fail)."""
    from sinks.merger import release_isolated

    settings = load_settings(env_file)
    org_id = None if org is None else _uuid(org, "--org")
    released = asyncio.run(_with_conn(settings, lambda conn: release_isolated(conn, parts_table, org_id)))
    click.echo(f"released {released} isolated aggregate keys")


async def _with_conn(settings: Settings, body: Any) -> Any:
    import asyncpg

    from pipeline.commands import errors

    # PostgreSQL down, refusing, or not migrated: one line naming it (exit 1), not a traceback.
    with errors.postgres():
        conn = await asyncpg.connect(settings.database_url.get_secret_value())
        try:
            return await body(conn)
        finally:
            await conn.close()
