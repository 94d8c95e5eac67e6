"""`omnilog maintain`: one pass of partition maintenance (a CronJob runs it, e.g. hourly)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import asyncpg
import click
import orjson
from botocore.exceptions import BotoCoreError, ClientError

from pipeline.processing.flush import REUPLOAD_AFTER_S
from pipeline.settings import Settings, load_settings
from sinks.janitor import expire_objects, sweep_orphans
from sinks.objects import s3_client
from sinks.partitions import DEFAULT_DAYS_AHEAD, PartitionError, create_ahead, drop_expired
from sinks.retention import RetentionError, load_horizon


def _refuse_unsafe(settings: Settings, retention_days: int, orphan_grace: timedelta | None) -> None:
    """Refuse, before touching anything, a run that could delete what is still accepted."""
    if retention_days < settings.max_event_age_days:
        raise click.ClickException(
            f"--retention-days {retention_days} is shorter than OMNILOG_MAX_EVENT_AGE_DAYS "
            f"({settings.max_event_age_days}): workers still accept events that old; nothing was deleted"
        )
    if orphan_grace is not None and orphan_grace.total_seconds() <= REUPLOAD_AFTER_S:
        raise click.ClickException(
            f"--orphan-grace-hours {orphan_grace.total_seconds() / 3600:g} is not longer than the "
            f"{REUPLOAD_AFTER_S / 3600:g} h after which a flush re-uploads an object it still holds "
            "(REUPLOAD_AFTER_S): the sweep could delete an object a slow commit is about to point at; "
            "nothing was deleted (0 disables the sweep)"
        )


async def _run(
    settings: Settings, days_ahead: int, retention_days: int, orphan_grace: timedelta | None
) -> dict[str, object]:
    conn = await asyncpg.connect(settings.database_url.get_secret_value())
    try:
        created = await create_ahead(conn, days_ahead)
        # Advances the retention horizon (committed) before dropping anything behind it.
        dropped = await drop_expired(conn, retention_days)
        horizon = await load_horizon(conn)
        assert horizon is not None  # drop_expired has just set it
        # Index rows first (above), then their objects: a failure in between leaves objects with
        # ledger rows, deleted on the next run, never an index row pointing at nothing.
        async with s3_client(settings) as s3:
            expired = await expire_objects(conn, s3, before=horizon)
            orphans = await sweep_orphans(conn, s3, settings.s3_bucket, orphan_grace) if orphan_grace else []
    finally:
        await conn.close()
    return {
        "created": {table: [d.isoformat() for d in days] for table, days in created.items() if days},
        "retention_horizon": horizon.isoformat(),
        "dropped_days": [d.isoformat() for d in dropped],
        "expired_objects": expired,
        "orphans_deleted": len(orphans),
    }


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
    help="Drop days older than this (at least OMNILOG_MAX_EVENT_AGE_DAYS, its default: the oldest "
    "accepted event).",
)
@click.option(
    "--orphan-grace-hours",
    type=click.FloatRange(min=0),
    default=6.0,
    show_default=True,
    help="Delete objects no committed batch recorded once older than this; 0 disables the sweep. "
    "Must be longer than the 1 h after which a flush re-uploads an upload it still holds.",
)
def command(
    env_file: Path | None, days_ahead: int, retention_days: int | None, orphan_grace_hours: float
) -> None:
    """Create partitions ahead, drop those past retention with their objects, sweep orphans.

    Prints one JSON summary line.
    """
    settings = load_settings(env_file)
    keep = retention_days or settings.max_event_age_days
    grace = timedelta(hours=orphan_grace_hours) if orphan_grace_hours > 0 else None
    _refuse_unsafe(settings, keep, grace)
    try:
        summary = asyncio.run(_run(settings, days_ahead, keep, grace))
    except (PartitionError, RetentionError) as exc:
        raise click.ClickException(str(exc)) from None
    except (BotoCoreError, ClientError) as exc:
        raise click.ClickException(
            f"object storage (OMNILOG_S3_ENDPOINT_URL, OMNILOG_S3_BUCKET, AWS_*): {type(exc).__name__}: {exc}"
        ) from None
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise click.ClickException(f"database (OMNILOG_DATABASE_URL): {type(exc).__name__}: {exc}") from None
    summary["retention_days"] = keep
    click.echo(orjson.dumps(summary).decode())
