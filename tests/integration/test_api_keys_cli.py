"""`omnilog keys create|list|revoke --org`: the key is printed once and only its hash is stored;
revoking is per organization; the API then refuses the key (401)."""

from __future__ import annotations

import asyncio
import hashlib
import re
import uuid

import asyncpg
from click.testing import CliRunner

from pipeline.cli import cli
from sinks.api_keys import authenticate
from sinks.migrate import migrate


def _invoke(url: str, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), env={"OMNILOG_DATABASE_URL": url}, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_create_list_revoke(fresh_database_url: str) -> None:
    asyncio.run(migrate(fresh_database_url))
    org, other = str(uuid.uuid4()), str(uuid.uuid4())
    code, out, err = _invoke(fresh_database_url, "keys", "create", "--org", org, "--name", "ui")
    assert code == 0, err
    key = out.strip()
    assert re.fullmatch(r"omk_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", key)
    key_id = re.search(r"key id ([0-9a-f-]{36})", err).group(1)  # type: ignore[union-attr]

    async def stored() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(fresh_database_url)
        try:
            return await conn.fetch("SELECT * FROM api_keys")
        finally:
            await conn.close()

    (row,) = asyncio.run(stored())
    assert bytes(row["key_hash"]) == hashlib.sha256(key.encode()).digest()
    assert key not in str(dict(row)) and key.split("_", 2)[2] not in str(dict(row)), "the key is not stored"

    code, out, _ = _invoke(fresh_database_url, "keys", "list", "--org", org)
    assert code == 0 and key_id in out and "active" in out and "never" in out and key not in out
    code, out, _ = _invoke(fresh_database_url, "keys", "list", "--org", other)
    assert code == 0 and out == ""

    # Another organization cannot revoke it.
    code, _, err = _invoke(fresh_database_url, "keys", "revoke", key_id, "--org", other)
    assert code == 1 and "has no key" in err

    async def accepted() -> bool:
        conn = await asyncpg.connect(fresh_database_url)
        try:
            return await authenticate(conn, key) is not None
        finally:
            await conn.close()

    assert asyncio.run(accepted())
    code, out, _ = _invoke(fresh_database_url, "keys", "revoke", key_id, "--org", org)
    assert code == 0 and "revoked" in out
    assert not asyncio.run(accepted())
    code, out, _ = _invoke(fresh_database_url, "keys", "list", "--org", org)
    assert "revoked" in out

    code, _, err = _invoke(fresh_database_url, "keys", "create", "--org", "not-a-uuid")
    assert code == 2 and "not a UUID" in err
