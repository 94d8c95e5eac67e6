"""`omnilog maintain`: one pass of partition maintenance (a CronJob runs it, e.g. hourly)."""

from __future__ import annotations

import asyncio
from datetime import date
from pathlib import Path

import asyncpg
import click
import orjson

from pipeline.settings import load_settings
from sinks.partitions import DEFAULT_DAYS_AHEAD, PartitionError, create_ahead, drop_expired


async def _run(
    database_url: str, days_ahead: int, retention_days: int
) -> tuple[dict[str, list[date]], list[date]]:
    conn = await asyncpg.connect(database_url)
    try:
        created = await create_ahead(conn, days_ahead)
        dropped = await drop_expired(conn, retention_days)
    finally:
        await conn.close()
    return created, dropped


@click.command("maintain")
@click.option("--env-file", type=click.Path(path_type=Path), help="A .env-style file of settings.")
@click.option(
    "--days-ahead",
    type=click.IntRange(min=0),
    default=DEFAULT_DAYS_AHEAD,
    show_default=True,
    help="Create the partitions of today and this many days ahead.",
)
@click.option(
    "--retention-days",
    type=click.IntRange(min=1),
    default=None,
    help="Drop days older than this. Default: OMNILOG_MAX_EVENT_AGE_DAYS, the oldest accepted event.",
)
def command(env_file: Path | None, days_ahead: int, retention_days: int | None) -> None:
    """Create partitions ahead and drop those past retention; print one JSON summary line.

    `dropped_days` are the UTC dates whose index rows are gone: the objects of those dates may
    be deleted from the bucket.
    """
    settings = load_settings(env_file)
    keep = retention_days or settings.max_event_age_days
    try:
        created, dropped = asyncio.run(_run(settings.database_url.get_secret_value(), days_ahead, keep))
    except PartitionError as exc:
        raise click.ClickException(str(exc)) from None
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise click.ClickException(f"database (OMNILOG_DATABASE_URL): {type(exc).__name__}: {exc}") from None
    summary = {
        "created": {table: [d.isoformat() for d in days] for table, days in created.items() if days},
        "dropped_days": [d.isoformat() for d in dropped],
        "retention_days": keep,
    }
    click.echo(orjson.dumps(summary).decode())
