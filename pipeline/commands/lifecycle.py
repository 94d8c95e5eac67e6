"""`omnilog lifecycle plan|apply`: the bucket lifecycle configuration from the organizations table.

`plan` prints the configuration (JSON) that `apply` would put on OMNILOG_S3_BUCKET; `apply` puts
it (PutBucketLifecycleConfiguration replaces the bucket's whole configuration) and prints what
the bucket reports back. Run `apply` after plan or retention changes, e.g. next to `maintain`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import click
import orjson
from botocore.exceptions import BotoCoreError, ClientError

from pipeline.settings import Settings, load_settings
from sinks.buckets import load_routes
from sinks.lifecycle import LifecycleError, customer_bucket_notes, plan_configuration
from sinks.objects import s3_client
from sinks.retention import load_organization_retention


async def _configuration(settings: Settings, fallback_days: int, transitions: bool) -> dict[str, Any]:
    conn = await asyncpg.connect(settings.database_url.get_secret_value())
    try:
        organizations = await load_organization_retention(conn)
        routes = await load_routes(conn)
    finally:
        await conn.close()
    # On stderr, so that stdout stays the configuration `apply` puts.
    for note in customer_bucket_notes(routes):
        click.echo(note, err=True)
    return plan_configuration(organizations, fallback_days, transitions=transitions)


async def _apply(settings: Settings, configuration: dict[str, Any]) -> dict[str, Any]:
    async with s3_client(settings) as s3:
        await s3.put_bucket_lifecycle_configuration(
            Bucket=settings.s3_bucket,
            LifecycleConfiguration=configuration,  # type: ignore[arg-type]
        )
        answer = await s3.get_bucket_lifecycle_configuration(Bucket=settings.s3_bucket)
    return {"Rules": answer.get("Rules", [])}


def _run(settings: Settings, fallback_days: int, apply: bool, transitions: bool) -> dict[str, Any]:
    try:
        configuration = asyncio.run(_configuration(settings, fallback_days, transitions))
        if not apply:
            return configuration
        return asyncio.run(_apply(settings, configuration))
    except LifecycleError as exc:
        raise click.ClickException(str(exc)) from None
    except (BotoCoreError, ClientError) as exc:
        raise click.ClickException(
            f"object storage (OMNILOG_S3_ENDPOINT_URL, OMNILOG_S3_BUCKET, AWS_*): {type(exc).__name__}: {exc}"
        ) from None
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise click.ClickException(f"database (OMNILOG_DATABASE_URL): {type(exc).__name__}: {exc}") from None


@click.group("lifecycle")
def command() -> None:
    """The bucket lifecycle rules per organization prefix (the safety net behind `maintain`)."""


_ENV_FILE = click.option("--env-file", type=click.Path(path_type=Path), help="A .env-style file of settings.")
_NO_TRANSITIONS = click.option(
    "--without-transitions",
    is_flag=True,
    help="Leave out storage-class transitions (stores that implement only expiry, e.g. SeaweedFS).",
)
_FALLBACK = click.option(
    "--retention-days",
    type=click.IntRange(min=1, max=3650),
    default=None,
    help="Retention of organizations nobody registered (default OMNILOG_MAX_EVENT_AGE_DAYS), as maintain.",
)


@command.command("plan")
@_ENV_FILE
@_FALLBACK
@_NO_TRANSITIONS
def plan(env_file: Path | None, retention_days: int | None, without_transitions: bool) -> None:
    """Print the lifecycle configuration computed from the organizations table."""
    settings = load_settings(env_file)
    fallback = retention_days or settings.max_event_age_days
    click.echo(
        orjson.dumps(_run(settings, fallback, apply=False, transitions=not without_transitions)).decode()
    )


@command.command("apply")
@_ENV_FILE
@_FALLBACK
@_NO_TRANSITIONS
def apply(env_file: Path | None, retention_days: int | None, without_transitions: bool) -> None:
    """Put the computed configuration on the bucket and print what the bucket reports back."""
    settings = load_settings(env_file)
    fallback = retention_days or settings.max_event_age_days
    click.echo(
        orjson.dumps(_run(settings, fallback, apply=True, transitions=not without_transitions)).decode()
    )
