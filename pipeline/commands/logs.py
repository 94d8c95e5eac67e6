"""`omnilog logs query` / `omnilog logs get EVENT_ID`: the read path (docs/contract.md §7)."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import click
import orjson

from pipeline.commands import errors
from pipeline.settings import Settings, load_settings
from sinks.buckets import RoutedObjects, load_routes
from sinks.objects import s3_client
from sinks.readpath import (
    BodyError,
    NotFound,
    QueryFilter,
    UnreadableBody,
    decode_cursor,
    fetch_bodies,
    find_pointer,
    query_index,
    read_event,
)

_RELATIVE = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def _parse_time(value: str | None, option: str) -> datetime | None:
    """An RFC 3339 timestamp, or a span back from now such as 15m, 6h, 7d."""
    if value is None:
        return None
    match = _RELATIVE.match(value)
    if match:
        return datetime.now(UTC) - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"expected RFC 3339 or a span like 6h, got {value!r}", param_hint=option
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _uuid(value: str | None, option: str) -> str | None:
    if value is None:
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise click.BadParameter(f"not a UUID: {value!r}", param_hint=option) from None


@click.group("logs")
def command() -> None:
    """Query the log index and fetch stored events."""


@command.command("get")
@click.argument("event_id")
@click.option("--env-file", type=click.Path(path_type=Path))
@click.option("--pretty", is_flag=True, help="Indent the JSON.")
def get(event_id: str, env_file: Path | None, pretty: bool) -> None:
    """Print one stored event, fetched with one ranged GET of its gzip member.

    Exits 1 when the event is not found or its object cannot be read, or when PostgreSQL or
    object storage is down (one line on stderr naming which).
    """
    settings = load_settings(env_file)
    canonical = _uuid(event_id, "EVENT_ID")
    assert canonical is not None
    try:
        line = asyncio.run(_get(settings, canonical))
    except (NotFound, UnreadableBody) as exc:
        click.echo(f"omnilog: {exc}", err=True)
        sys.exit(1)
    if pretty:
        # The standard library's json: orjson encodes at most 254 levels of nesting, and the
        # worker accepts deeper events.
        click.echo(json.dumps(json.loads(line), indent=2, ensure_ascii=False))
    else:
        click.echo(line.decode(errors="replace"))


async def _get(settings: Settings, event_id: str) -> bytes:
    with errors.postgres():
        conn = await asyncpg.connect(settings.database_url.get_secret_value())
        try:
            row = await find_pointer(conn, event_id)
            routes = await load_routes(conn)  # customer-owned buckets (docs/storage.md)
        finally:
            await conn.close()
    with errors.object_storage():
        async with s3_client(settings) as s3:
            objects = RoutedObjects(s3, settings.s3_bucket, 1 << 30)
            objects.use_routes(routes)
            try:
                return await read_event(objects, row, event_id)
            finally:
                await objects.aclose()


@command.command("query")
@click.option("--org", "org", help="Organization id.")
@click.option("--server", help="Server id.")
@click.option("--session", help="Session id.")
@click.option("--method", help="RPC method, e.g. tools/call.")
@click.option("--level", type=click.Choice(["trace", "debug", "info", "warn", "error", "fatal"]))
@click.option("--errors", "errors_only", is_flag=True, help="Only requests flagged as errors.")
@click.option("--since", help="RFC 3339 time or a span back from now (15m, 6h, 7d).")
@click.option("--until", help="RFC 3339 time or a span back from now.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--cursor", help="The next-page cursor printed by the previous page.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--with-body", is_flag=True, help="Fetch each event's stored body (concurrently).")
@click.option("--env-file", type=click.Path(path_type=Path))
def query(
    org: str | None,
    server: str | None,
    session: str | None,
    method: str | None,
    level: str | None,
    errors_only: bool,
    since: str | None,
    until: str | None,
    limit: int,
    cursor: str | None,
    fmt: str,
    with_body: bool,
    env_file: Path | None,
) -> None:
    """List indexed requests, newest first.

    With --with-body, a body that cannot be read (object missing, not gzip, S3 error) is reported
    on its row and the other rows still print; the command then exits 1 after printing them.
    """
    settings = load_settings(env_file)
    flt = QueryFilter(
        organization_id=_uuid(org, "--org"),
        server_id=_uuid(server, "--server"),
        session_id=_uuid(session, "--session"),
        rpc_method=method,
        level=level,
        errors_only=errors_only,
        since=_parse_time(since, "--since"),
        until=_parse_time(until, "--until"),
    )
    try:
        rows, next_cursor = asyncio.run(_query(settings, flt, limit, cursor, with_body))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--cursor") from None
    if fmt == "json":
        for row in rows:
            click.echo(_json_row(row))
        if next_cursor:
            click.echo(orjson.dumps({"next_cursor": next_cursor}).decode())
    else:
        _print_table(rows, with_body)
        if next_cursor:
            click.echo(f"next page: --cursor {next_cursor}")
    unreadable = sum(1 for row in rows if "event_error" in row)
    if unreadable:
        click.echo(
            f"omnilog: {unreadable} of {len(rows)} bodies could not be read (see event_error)", err=True
        )
        sys.exit(1)


async def _query(
    settings: Settings, flt: QueryFilter, limit: int, cursor: str | None, with_body: bool
) -> tuple[list[dict[str, Any]], str | None]:
    if cursor:
        decode_cursor(cursor)  # a bad cursor is a usage error, before any connection
    with errors.postgres():
        conn = await asyncpg.connect(settings.database_url.get_secret_value())
        try:
            rows, next_cursor = await query_index(conn, flt, limit, cursor)
            routes = await load_routes(conn) if with_body and rows else []
        finally:
            await conn.close()
    for row in rows:
        row["id"] = str(row["id"])
    if with_body and rows:
        # Errors of single objects are per row (fetch_bodies); only the client itself failing
        # (no endpoint, no credentials) is one line for the whole command.
        with errors.object_storage():
            async with s3_client(settings) as s3:
                objects = RoutedObjects(s3, settings.s3_bucket, 1 << 30)
                objects.use_routes(routes)
                try:
                    bodies = await fetch_bodies(objects, rows)
                finally:
                    await objects.aclose()
        for row in rows:
            body = bodies[row["id"]]
            if isinstance(body, BodyError):
                row["event_error"] = body.reason
            else:
                row["event"] = body
    return rows, next_cursor


def _json_row(row: dict[str, Any]) -> str:
    """One row as a JSON object, its `event` the stored line spliced in as it is.

    Never re-encoded: the line is JSON already (the worker stored only values that parse), and
    re-encoding fails on what the worker accepts (orjson encodes at most 254 levels of nesting).
    """
    fields = {key: value for key, value in row.items() if key != "event"}
    text = orjson.dumps(fields, default=str)
    if "event" in row:
        text = text[:-1] + b',"event":' + row["event"] + b"}"
    return text.decode(errors="replace")


def _print_table(rows: list[dict[str, Any]], with_body: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_lines=False)
    for title in ("started_at", "org", "server", "method", "level", "status", "ms", "event_id"):
        table.add_column(title)
    for row in rows:
        table.add_row(
            row["started_at"].isoformat(timespec="milliseconds"),
            str(row["organization_id"])[:8],
            str(row["server_id"] or "-")[:8],
            row["rpc_method"] or "-",
            row["level"],
            str(row["status_code"] or "-"),
            str(row["duration_ms"]),
            row["id"],
        )
    Console().print(table)
    if with_body:
        for row in rows:
            if "event_error" in row:
                click.echo(orjson.dumps({"event_id": row["id"], "event_error": row["event_error"]}).decode())
            else:
                click.echo(row["event"].decode(errors="replace"))
