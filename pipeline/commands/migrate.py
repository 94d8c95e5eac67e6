"""`omnilog migrate`: apply the database migrations, then create the next days' partitions."""

from __future__ import annotations

import asyncio
import time
from datetime import date
from pathlib import Path

import asyncpg
import click

from pipeline.commands import errors
from pipeline.settings import load_settings
from sinks.migrate import MigrationError, migrate
from sinks.partitions import DEFAULT_DAYS_AHEAD, PartitionError, create_ahead


async def _run(
    database_url: str, retention_days: int, days_ahead: int
) -> tuple[list[str], dict[str, list[date]]]:
    applied = await migrate(database_url, retention_days=retention_days)
    # A freshly migrated database accepts today's events right away, before the first
    # `omnilog maintain` (workers also create missing days on demand).
    conn = await asyncpg.connect(database_url)
    try:
        created = await create_ahead(conn, days_ahead)
    finally:
        await conn.close()
    return applied, created


@click.command("migrate")
@click.option("--env-file", type=click.Path(path_type=Path), help="A .env-style file of settings.")
@click.option(
    "--days-ahead",
    type=click.IntRange(min=0),
    default=DEFAULT_DAYS_AHEAD,
    show_default=True,
    help="Also create the partitions of today and this many days ahead.",
)
def command(env_file: Path | None, days_ahead: int) -> None:
    """Apply pending migrations (idempotent; safe to run from several pods at once)."""
    settings = load_settings(env_file)
    began = time.perf_counter()
    try:
        with errors.postgres():
            applied, created = asyncio.run(
                _run(settings.database_url.get_secret_value(), settings.max_event_age_days, days_ahead)
            )
    except (MigrationError, PartitionError) as exc:
        raise click.ClickException(str(exc)) from None
    elapsed = time.perf_counter() - began
    if applied:
        for name in applied:
            click.echo(f"applied {name}")
    else:
        click.echo("schema up to date")
    partitions = sum(len(days) for days in created.values())
    click.echo(f"created {partitions} partition(s); done in {elapsed:.2f} s")
