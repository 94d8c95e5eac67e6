"""`omnilog buckets set|list|remove`: customer-owned buckets (docs/storage.md).

Run as the tables' owner (OMNILOG_DATABASE_URL). `set` checks the bucket with the profile first
(HeadBucket), so a typo in a profile or bucket name is refused here, naming the organization and
profile, instead of holding that organization's uploads later. Workers pick a change up within
30 s, for the batches they flush after it; objects already written stay where their pointers say.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import asyncpg
import click
import orjson

from pipeline.commands import errors
from pipeline.settings import load_settings
from sinks.buckets import (
    BucketConflict,
    BucketRoute,
    CustomerBucketUnavailable,
    check_route,
    load_routes,
    retire_route,
    set_route,
)

_env_file = click.option("--env-file", type=click.Path(path_type=Path), help="A .env-style file of settings.")


def _uuid(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise click.BadParameter(f"not a UUID: {value!r}", param_hint="--org") from None


async def _connect(url: str) -> asyncpg.Connection:
    with errors.postgres():
        return await asyncpg.connect(url)


@click.group("buckets")
def command() -> None:
    """An organization's own bucket: where its objects go, how the workers reach it."""


@command.command("set")
@click.option("--org", required=True, help="Organization id.")
@click.option("--bucket", required=True, help="The organization's bucket.")
@click.option("--profile", required=True, help="AWS shared-config profile that reaches it (keys or a role).")
@click.option("--endpoint-url", default=None, help="S3 endpoint (default: AWS S3).")
@click.option("--region", default=None, help="Region (default: the profile's).")
@click.option("--no-check", is_flag=True, help="Store it without checking the bucket with the profile first.")
@_env_file
def set_(
    org: str,
    bucket: str,
    profile: str,
    endpoint_url: str | None,
    region: str | None,
    no_check: bool,
    env_file: Path | None,
) -> None:
    """Send ORG's new objects to BUCKET (the previous bucket is retired, still readable)."""
    settings = load_settings(env_file)
    route = BucketRoute(_uuid(org), bucket, endpoint_url, region, profile)

    async def run() -> BucketRoute | None:
        if not no_check:
            await check_route(route)
        conn = await _connect(settings.database_url.get_secret_value())
        try:
            with errors.postgres():
                return await set_route(conn, route, settings.s3_bucket)
        finally:
            await conn.close()

    try:
        previous = asyncio.run(run())
    except CustomerBucketUnavailable as exc:
        raise click.ClickException(f"not stored: {exc.response['Error']['Message']}") from None
    except BucketConflict as exc:
        raise click.ClickException(f"not stored: {exc}") from None
    click.echo(f"{route.describe()}: new objects go there")
    if previous is not None:
        click.echo(f"retired (its objects stay readable): {previous.describe()}")


@command.command("list")
@click.option("--org", default=None, help="Only this organization.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per bucket.")
@_env_file
def list_(org: str | None, as_json: bool, env_file: Path | None) -> None:
    """Every organization bucket, current and retired."""
    settings = load_settings(env_file)

    async def run() -> list[BucketRoute]:
        conn = await _connect(settings.database_url.get_secret_value())
        try:
            with errors.postgres():
                return await load_routes(conn)
        finally:
            await conn.close()

    wanted = _uuid(org) if org else None
    for route in asyncio.run(run()):
        if wanted and route.organization_id != wanted:
            continue
        if as_json:
            click.echo(orjson.dumps(route).decode())
        else:
            state = "retired" if route.retired else "current"
            click.echo(
                f"{route.organization_id}  {state:<8} {route.bucket}  profile={route.profile}  "
                f"endpoint={route.endpoint_url or 'AWS'}  region={route.region or '(profile)'}"
            )


@command.command("remove")
@click.option("--org", required=True, help="Organization id.")
@_env_file
def remove(org: str, env_file: Path | None) -> None:
    """Send ORG's new objects to the deployment's bucket again (its bucket stays readable)."""
    settings = load_settings(env_file)

    async def run() -> BucketRoute | None:
        conn = await _connect(settings.database_url.get_secret_value())
        try:
            with errors.postgres():
                return await retire_route(conn, _uuid(org))
        finally:
            await conn.close()

    previous = asyncio.run(run())
    if previous is None:
        raise click.ClickException(f"organization {org} has no bucket of its own")
    click.echo(f"retired (its objects stay readable): {previous.describe()}")
