"""`omnilog keys create|list|revoke --org ORG`: organization API keys of the read API.

Run as the tables' owner (OMNILOG_DATABASE_URL), like `migrate`: the API's own role cannot read
or write keys. A new key is printed once; only its SHA-256 is stored (docs/security.md).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import click
import orjson

from pipeline.commands import errors
from pipeline.settings import Settings, load_settings
from sinks.api_keys import create_key, list_keys, revoke_key
from sinks.db import Connection

T = TypeVar("T")


def _uuid(value: str, option: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise click.BadParameter(f"not a UUID: {value!r}", param_hint=option) from None


def _run(settings: Settings, body: Callable[[Connection], Awaitable[T]]) -> T:
    async def run() -> T:
        with errors.postgres():
            conn = await asyncpg.connect(settings.database_url.get_secret_value())
            try:
                return await body(conn)
            finally:
                await conn.close()

    return asyncio.run(run())


_env_file = click.option("--env-file", type=click.Path(path_type=Path))
_org = click.option("--org", "org", required=True, help="Organization id.")


@click.group("keys")
def command() -> None:
    """Create, list and revoke organization API keys."""


@command.command("create")
@_org
@click.option("--name", default="", help="What the key is for (shown by `keys list`).")
@_env_file
def create(org: str, name: str, env_file: Path | None) -> None:
    """Create a key and print it: it is shown this once, only its hash is stored."""
    settings = load_settings(env_file)
    new = _run(settings, lambda conn: create_key(conn, _uuid(org, "--org"), name))
    click.echo(new.secret)
    click.echo(f"key id {new.id} (prefix {new.prefix}) for organization {new.organization_id}", err=True)


@command.command("list")
@_org
@click.option("--json", "as_json", is_flag=True, help="One JSON object per key.")
@_env_file
def list_(org: str, as_json: bool, env_file: Path | None) -> None:
    """The keys of an organization (never the keys themselves: they are not stored)."""
    settings = load_settings(env_file)
    rows: list[dict[str, Any]] = _run(settings, lambda conn: list_keys(conn, _uuid(org, "--org")))
    for row in rows:
        if as_json:
            click.echo(orjson.dumps(row, default=str).decode())
        else:
            state = f"revoked {row['revoked_at']:%Y-%m-%d %H:%M}" if row["revoked_at"] else "active"
            used = f"{row['last_used_at']:%Y-%m-%d %H:%M}" if row["last_used_at"] else "never"
            click.echo(f"{row['id']}  omk_{row['prefix']}_…  {state:<24} last used {used}  {row['name']}")


@command.command("revoke")
@click.argument("key_id")
@_org
@_env_file
def revoke(key_id: str, org: str, env_file: Path | None) -> None:
    """Revoke KEY_ID of the organization; requests with it get 401 from then on."""
    settings = load_settings(env_file)
    revoked = _run(settings, lambda conn: revoke_key(conn, _uuid(org, "--org"), _uuid(key_id, "KEY_ID")))
    if revoked is None:
        raise click.ClickException(f"organization {org} has no key {key_id}")
    click.echo(f"revoked {key_id} at {revoked.isoformat()}")
