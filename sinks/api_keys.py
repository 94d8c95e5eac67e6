"""Organization API keys: create, list, revoke (as the tables' owner) and authenticate (as the API).

A key reads `omk_<prefix>_<secret>`: the prefix (12 hex digits) finds the key's row, the secret
is 256 random bits. Only SHA-256 of the whole key is stored; a presented key is hashed and
compared with `hmac.compare_digest`, and a key that matches no row is compared against a dummy
hash all the same, so the time taken does not say which prefixes exist.

The API role cannot read `api_keys` (row security, and no grant): it authenticates through the
SECURITY DEFINER functions `api_key_lookup` and `api_key_touch` of migration 0008.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sinks.db import Connection

KEY_SCHEME = "omk_"
_KEY = re.compile(r"^omk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_DUMMY_HASH = hashlib.sha256(b"no such key").digest()


@dataclass(frozen=True, slots=True)
class NewKey:
    id: str
    organization_id: str
    prefix: str
    secret: str  # the whole key, shown once


@dataclass(frozen=True, slots=True)
class AuthenticatedKey:
    id: str
    organization_id: str


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def generate_key() -> tuple[str, str]:
    """(prefix, whole key)."""
    prefix = secrets.token_hex(6)
    return prefix, f"{KEY_SCHEME}{prefix}_{secrets.token_urlsafe(32)}"


def key_prefix(key: str) -> str | None:
    """The prefix of a well-formed key, None for anything else (never raises on hostile input)."""
    match = _KEY.match(key)
    return match.group(1) if match else None


async def create_key(conn: Connection, organization_id: str, name: str = "") -> NewKey:
    prefix, key = generate_key()
    key_id = await conn.fetchval(
        "INSERT INTO api_keys (organization_id, name, prefix, key_hash) "
        "VALUES ($1::uuid, $2, $3, $4) RETURNING id::text",
        organization_id,
        name,
        prefix,
        hash_key(key),
    )
    return NewKey(str(key_id), organization_id, prefix, key)


async def list_keys(conn: Connection, organization_id: str) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT id::text AS id, name, prefix, created_at, last_used_at, revoked_at FROM api_keys "
        "WHERE organization_id = $1::uuid ORDER BY created_at, id",
        organization_id,
    )
    return [dict(row) for row in rows]


async def revoke_key(conn: Connection, organization_id: str, key_id: str) -> datetime | None:
    """Revoke a key of `organization_id`; its revocation time (the first one if it already was),
    or None when the organization has no such key."""
    revoked: datetime | None = await conn.fetchval(
        "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, now()) "
        "WHERE id = $1::uuid AND organization_id = $2::uuid RETURNING revoked_at",
        key_id,
        organization_id,
    )
    return revoked


async def authenticate(conn: Connection, presented: str) -> AuthenticatedKey | None:
    """The key `presented` names, if it exists, is not revoked and its hash matches."""
    prefix = key_prefix(presented)
    row = None
    if prefix is not None:
        row = await conn.fetchrow(
            "SELECT key_id::text AS key_id, organization_id::text AS organization_id, key_hash "
            "FROM api_key_lookup($1)",
            prefix,
        )
    stored = bytes(row["key_hash"]) if row is not None else _DUMMY_HASH
    matches = hmac.compare_digest(stored, hash_key(presented))
    if row is None or not matches:
        return None
    return AuthenticatedKey(row["key_id"], row["organization_id"])


async def record_use(conn: Connection, key: AuthenticatedKey) -> None:
    """Stamp the key's last use (the function writes at most once a minute per key)."""
    await conn.execute("SELECT api_key_touch($1::uuid)", key.id)
