"""The database side of a request: the API role's pool, who is asking, and their transaction.

- The pool connects as the API role (OMNILOG_API_DATABASE_URL); start-up refuses a role that
  would bypass row security (superuser, BYPASSRLS, or with the privileges of the tables' owner),
  since every isolation guarantee rests on it.
- Every tenant query runs inside `tenant_transaction`: a read-only transaction whose first
  statement is `set_config('app.current_org', <the key's organization>, true)`. The setting is
  transaction-local, so it ends with the transaction and a pooled connection never carries one
  tenant's organization into the next request; the policies read an unset one as "no rows".
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from sinks.api_keys import AuthenticatedKey
from sinks.db import Connection

# omnilog_tenant first: on TimescaleDB a compressed hypertable is read through the filtering view
# of the same name there (migration 0008); on plain PostgreSQL the schema is empty.
SEARCH_PATH = "omnilog_tenant, public"

_ROLE_CHECK = """
SELECT current_user AS role, r.rolsuper AS superuser, r.rolbypassrls AS bypassrls,
       to_regclass('public.log_index') IS NOT NULL AS migrated,
       COALESCE((SELECT pg_has_role(current_user, c.relowner, 'USAGE') FROM pg_class c
                 WHERE c.oid = to_regclass('public.log_index')), false) AS owner_privileges
FROM pg_roles r WHERE r.rolname = current_user
"""


class UnsafeRole(Exception):
    """The API's database role would see every organization's rows."""


async def create_pool(database_url: str, size: int, statement_timeout_s: float) -> asyncpg.Pool[Any]:
    pool = await asyncpg.create_pool(
        database_url,
        min_size=1,
        max_size=size,
        server_settings={
            "search_path": SEARCH_PATH,
            "application_name": "omnilog-api",
            # The database stops a query the request has given up on.
            "statement_timeout": str(max(1, int(statement_timeout_s * 1000))),
        },
    )
    assert pool is not None
    return pool


async def check_role(conn: Connection) -> str:
    """The role's name; raises UnsafeRole when row security would not apply to it."""
    row = await conn.fetchrow(_ROLE_CHECK)
    assert row is not None
    role = str(row["role"])
    if not row["migrated"]:
        raise UnsafeRole("the database has no log_index table: run `omnilog migrate` first")
    if row["superuser"] or row["bypassrls"] or row["owner_privileges"]:
        raise UnsafeRole(
            f"OMNILOG_API_DATABASE_URL connects as {role!r}, which bypasses row security "
            "(superuser, BYPASSRLS or the tables' owner); use a login role IN ROLE omnilog_api"
        )
    return role


@asynccontextmanager
async def tenant_transaction_on(conn: Connection, key: AuthenticatedKey) -> AsyncIterator[Connection]:
    async with conn.transaction(readonly=True):
        await conn.execute("SELECT set_config('app.current_org', $1, true)", key.organization_id)
        yield conn


@asynccontextmanager
async def tenant_transaction(pool: asyncpg.Pool[Any], key: AuthenticatedKey) -> AsyncIterator[Connection]:
    async with pool.acquire() as conn, tenant_transaction_on(conn, key) as tenant_conn:
        yield tenant_conn
