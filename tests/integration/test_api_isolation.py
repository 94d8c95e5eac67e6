"""The read API isolates tenants: org A's key never sees org B's data, through any endpoint or
parameter, and neither does the API's database role with A's setting (row security itself).

Real PostgreSQL and SeaweedFS (the session stack); the app runs in-process with its lifespan.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from pydantic import SecretStr

from pipeline.api.tenancy import UnsafeRole
from pipeline.devtools.stack import StackInfo
from tests.integration.api_world import METHODS, USERS, Tenant, World, api_client, app_for, build_world

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
async def world(stack_info: StackInfo) -> AsyncIterator[World]:
    async with build_world(stack_info) as built:
        yield built


@pytest.fixture(scope="module")
async def client(world: World) -> AsyncIterator[httpx.AsyncClient]:
    # One pooled connection: every request reuses the previous request's connection.
    async with api_client(app_for(world, api_pool_size=1, api_rate_burst=100_000)) as c:
        yield c


def _assert_nothing_of(text: str, world: World, other: Tenant) -> None:
    leaked = [s for s in world.secrets_of(other) if s in text]
    assert not leaked, f"answer carries the other tenant's {leaked[:3]}"


def _since(world: World) -> str:
    return (world.now - timedelta(hours=12)).isoformat()


def _until(world: World) -> str:
    return (world.now + timedelta(minutes=1)).isoformat()


async def _all_pages(
    client: httpx.AsyncClient, tenant: Tenant, params: dict[str, Any]
) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    for _ in range(200):
        page_params = {**params, **({"cursor": cursor} if cursor else {})}
        response = await client.get("/v1/logs", params=page_params, headers=tenant.headers)
        assert response.status_code == 200, response.text
        body = response.json()
        items.extend(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError("pagination did not end")


def _expected(tenant: Tenant, **flt: Any) -> set[str]:
    def keep(row: dict[str, Any]) -> bool:
        return all(row[column] == value for column, value in flt.items())

    return {row["id"] for row in tenant.rows if keep(row)}


async def test_logs_every_filter_returns_exactly_the_keys_rows(
    world: World, client: httpx.AsyncClient
) -> None:
    window = {"since": _since(world), "until": _until(world)}
    filters: list[dict[str, Any]] = [{}]
    filters += [{"rpc_method": m} for m in METHODS]
    filters += [{"user_id": u} for u in USERS]
    filters += [{"status_code": s} for s in (200, 404, 500)]
    filters += [{"level": lv} for lv in ("info", "error")]
    filters += [{"error_flag": True}]
    for me, other in ((world.a, world.b), (world.b, world.a)):
        own = [{"server_id": s} for s in me.servers] + [{"session_id": s} for s in me.sessions]
        for flt, limit in itertools.product(filters + own, (1, 7, 1000)):
            params: dict[str, Any] = {**window, "limit": limit}
            names = {"rpc_method": "method", "status_code": "status", "error_flag": "errors"}
            params.update(
                {names.get(k, k): str(v).lower() if isinstance(v, bool) else v for k, v in flt.items()}
            )
            items = await _all_pages(client, me, params)
            ids = [item["id"] for item in items]
            assert len(ids) == len(set(ids)), "a row came twice across pages"
            assert set(ids) == _expected(me, **flt), f"{flt} limit {limit}"
            started = [item["started_at"] for item in items]
            assert started == sorted(started, reverse=True), "newest first"
            _assert_nothing_of(str(items), world, other)


async def test_logs_with_the_other_tenants_ids_return_nothing(
    world: World, client: httpx.AsyncClient
) -> None:
    window = {"since": _since(world), "until": _until(world)}
    for me, other in ((world.a, world.b), (world.b, world.a)):
        for name, values in (("server_id", other.servers), ("session_id", other.sessions)):
            for value in values:
                response = await client.get("/v1/logs", params={**window, name: value}, headers=me.headers)
                assert response.status_code == 200
                assert response.json() == {"items": [], "next_cursor": None}
        # An organization parameter is not a thing: it is ignored, the key decides.
        response = await client.get(
            "/v1/logs", params={**window, "organization_id": other.org, "org": other.org}, headers=me.headers
        )
        assert {i["id"] for i in response.json()["items"]} == _expected(me)


async def test_a_cursor_from_the_other_tenant_pages_through_ones_own_rows(
    world: World, client: httpx.AsyncClient
) -> None:
    window = {"since": _since(world), "until": _until(world), "limit": 5}
    first_of_b = (await client.get("/v1/logs", params=window, headers=world.b.headers)).json()
    cursor = first_of_b["next_cursor"]
    assert cursor
    items = await _all_pages(client, world.a, {**window, "cursor": cursor})
    assert items and {i["id"] for i in items} <= _expected(world.a)


async def test_event_returns_the_exact_stored_bytes_of_ones_own_events_only(
    world: World, client: httpx.AsyncClient
) -> None:
    for me, other in ((world.a, world.b), (world.b, world.a)):
        for event_id, line in me.events.items():
            response = await client.get(f"/v1/events/{event_id}", headers=me.headers)
            assert response.status_code == 200
            assert response.content == line
            assert response.headers["content-type"] == "application/json"
        for event_id in other.events:
            for shown in (event_id, event_id.upper()):
                response = await client.get(f"/v1/events/{shown}", headers=me.headers)
                assert response.status_code == 404
                assert response.headers["content-type"] == "application/problem+json"
                _assert_nothing_of(response.text.replace(shown, ""), world, other)  # bar the id sent
        assert (await client.get(f"/v1/events/{uuid.uuid4()}", headers=me.headers)).status_code == 404


async def test_aggregates_and_usage_carry_only_the_keys_organization(
    world: World, client: httpx.AsyncClient
) -> None:
    window = {"since": (world.now - timedelta(days=2)).isoformat(), "until": _until(world)}
    for n, (me, other) in enumerate(((world.a, world.b), (world.b, world.a)), start=1):
        for win, level in itertools.product(("hourly", "daily"), ("org", "server", "method")):
            per_level = {"org": 1, "server": len(me.servers), "method": len(me.servers) * len(METHODS)}
            response = await client.get(
                "/v1/aggregates", params={**window, "window": win, "level": level}, headers=me.headers
            )
            assert response.status_code == 200, response.text
            items = response.json()["items"]
            assert len(items) == per_level[level]
            assert {i["total_requests"] for i in items} == {1000 * n}
            assert {i["total_bytes_in"] for i in items} == {(1 << 70) * n}
            _assert_nothing_of(response.text, world, other)
            for server in other.servers:
                crafted = await client.get(
                    "/v1/aggregates",
                    params={**window, "window": win, "level": level, "server_id": server},
                    headers=me.headers,
                )
                assert crafted.status_code == 200
                items = crafted.json()["items"]
                # At the org level the server filter does not apply (the row is "all servers").
                assert all(i["server_id"] is None for i in items) and len(items) == (level == "org")
        for win in ("hourly", "daily"):
            response = await client.get("/v1/usage", params={**window, "window": win}, headers=me.headers)
            assert response.status_code == 200, response.text
            items = response.json()["items"]
            assert sorted(i["model"] for i in items) == ["model-x", "model-y"]
            assert {i["request_count"] for i in items} == {500 * n}
            assert {i["unique_users"] for i in items} == {3 * n}
            _assert_nothing_of(response.text, world, other)


async def test_a_pooled_connection_carries_no_tenant_into_the_next_request(
    world: World, client: httpx.AsyncClient
) -> None:
    window = {"since": _since(world), "until": _until(world), "limit": 1000}
    for me in (world.a, world.b, world.a, world.b):
        response = await client.get("/v1/logs", params=window, headers=me.headers)
        assert {i["id"] for i in response.json()["items"]} == _expected(me)
    # The one connection of the pool, between requests: no organization set.
    pool: asyncpg.Pool[Any] = client._transport.app.state.api.pool  # type: ignore[attr-defined]
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT current_setting('app.current_org', true)") in (None, "")
        assert await conn.fetchval("SELECT count(*) FROM log_index") == 0


async def test_row_security_itself_as_the_api_role(world: World) -> None:
    conn = await asyncpg.connect(world.api_url, server_settings={"search_path": "omnilog_tenant, public"})
    try:
        # Without a setting: nothing, not an error.
        for table in ("log_index", "log_aggregates", "usage_hourly", "usage_daily"):
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0, table
        for me, other in ((world.a, world.b), (world.b, world.a)):
            async with conn.transaction():
                await conn.execute("SELECT set_config('app.current_org', $1, true)", me.org)
                # No WHERE clause at all: only the policy filters.
                ids = {str(r["id"]) for r in await conn.fetch("SELECT id FROM log_index")}
                assert ids == set(me.events)
                for table, column in (
                    ("log_aggregates", "organization_id"),
                    ("usage_hourly", "org_id"),
                    ("usage_daily", "org_id"),
                ):
                    orgs = {str(r[0]) for r in await conn.fetch(f"SELECT DISTINCT {column} FROM {table}")}
                    assert orgs == {me.org}, table
                assert (
                    await conn.fetchval(
                        "SELECT count(*) FROM log_index WHERE organization_id = $1::uuid", other.org
                    )
                    == 0
                )
            # Transaction-local: gone after the transaction.
            assert await conn.fetchval("SELECT count(*) FROM log_index") == 0
        # Not granted: keys, the ledger, partitions, parts.
        partition = await conn.fetchval(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'public.log_index'::regclass LIMIT 1"
        )
        for table in ("api_keys", "ingest_objects", "usage_hour_users", "organizations", partition):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetch(f'SELECT * FROM "{table}" LIMIT 1')
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("DELETE FROM log_index")
    finally:
        await conn.close()


async def test_row_security_on_tables_the_api_is_not_granted(world: World) -> None:
    """The policies of the ledger and the keys hold for any role that is granted them."""
    owner = await asyncpg.connect(world.owner_url)
    probe_role = f"rls_probe_{uuid.uuid4().hex[:8]}"
    try:
        await owner.execute(f'CREATE ROLE "{probe_role}" NOLOGIN NOBYPASSRLS')
        await owner.execute(f'GRANT SELECT ON ingest_objects, api_keys, organizations TO "{probe_role}"')
        async with owner.transaction():
            await owner.execute(f'SET LOCAL ROLE "{probe_role}"')
            await owner.execute("SELECT set_config('app.current_org', $1, true)", world.a.org)
            for table in ("ingest_objects", "api_keys"):
                orgs = {str(r[0]) for r in await owner.fetch(f"SELECT DISTINCT organization_id FROM {table}")}
                assert orgs == {world.a.org}, table
            assert await owner.fetchval("SELECT count(*) FROM organizations") == 0  # A is not registered
    finally:
        await owner.execute(f'REVOKE ALL ON ingest_objects, api_keys, organizations FROM "{probe_role}"')
        await owner.execute(f'DROP ROLE IF EXISTS "{probe_role}"')
        await owner.close()


async def test_every_tenant_table_has_row_security_and_a_policy(world: World) -> None:
    """A table with an organization column and no policy fails here (new tables included)."""
    conn = await asyncpg.connect(world.owner_url)
    try:
        rows = await conn.fetch(
            """
            SELECT c.relname, c.relrowsecurity,
                   EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = c.oid) AS has_policy
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition
              AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND NOT a.attisdropped
                          AND a.attname IN ('organization_id', 'org_id'))
            """
        )
        assert len(rows) >= 15
        unprotected = [r["relname"] for r in rows if not (r["relrowsecurity"] and r["has_policy"])]
        assert not unprotected, f"tenant tables without row security: {unprotected}"
        # Whatever the API role may read is under row security, or a view that reads as its caller.
        readable = await conn.fetch(
            """
            SELECT c.relname, c.relkind, c.relrowsecurity, c.reloptions
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname IN ('public', 'omnilog_tenant') AND c.relkind IN ('r', 'p', 'v', 'm')
              AND has_table_privilege('omnilog_api', c.oid, 'SELECT')
            """
        )
        assert {r["relname"] for r in readable} == {
            "log_index",
            "log_aggregates",
            "usage_hourly",
            "usage_daily",
            "organization_buckets",  # how to reach the organization's own bucket (no secrets)
        }
        for r in readable:
            assert r["relrowsecurity"] or "security_invoker=true" in (r["reloptions"] or []), r["relname"]
        role = await conn.fetchrow(
            "SELECT rolsuper, rolbypassrls, rolcanlogin FROM pg_roles WHERE rolname = 'omnilog_api'"
        )
        assert (
            role is not None and not role["rolsuper"] and not role["rolbypassrls"] and not role["rolcanlogin"]
        )
    finally:
        await conn.close()


async def test_revoked_unknown_malformed_and_missing_keys_get_401(
    world: World, client: httpx.AsyncClient
) -> None:
    forged = world.a.key[:-4] + ("AAAA" if not world.a.key.endswith("AAAA") else "BBBB")
    for headers in (
        {"Authorization": f"Bearer {world.revoked_key}"},
        {"Authorization": "Bearer omk_0123456789ab_" + "A" * 43},
        {"Authorization": f"Bearer {forged}"},
        {"Authorization": "Bearer not-a-key"},
        {"Authorization": "Basic Zm9vOmJhcg=="},
        {"Authorization": f"Bearer {'x' * 10_000}"},
        {},
    ):
        for path in ("/v1/logs", f"/v1/events/{next(iter(world.a.events))}", "/v1/aggregates", "/v1/usage"):
            response = await client.get(path, params={"limit": "not-a-number"}, headers=headers)
            assert response.status_code == 401, (headers, path)
            assert response.headers["content-type"] == "application/problem+json"
            body = response.json()
            assert body["status"] == 401 and body["title"] == "Unauthorized"
            assert response.headers["www-authenticate"].startswith("Bearer")


async def test_last_use_is_recorded(world: World, client: httpx.AsyncClient) -> None:
    await client.get("/v1/usage", headers=world.b.headers)
    conn = await asyncpg.connect(world.owner_url)
    try:
        used = await conn.fetch(
            "SELECT name, last_used_at FROM api_keys WHERE organization_id = $1::uuid", world.b.org
        )
        assert [r["name"] for r in used] == ["b"] and used[0]["last_used_at"] is not None
    finally:
        await conn.close()


async def test_the_api_refuses_to_start_as_a_role_that_bypasses_row_security(world: World) -> None:
    app = app_for(world, api_database_url=SecretStr(world.owner_url))
    with pytest.raises(UnsafeRole, match="bypasses row security"):
        async with api_client(app):
            pass


async def test_logs_filter_combinations(world: World, client: httpx.AsyncClient) -> None:
    window = {"since": _since(world), "until": _until(world), "limit": 1000}
    for me, other in ((world.a, world.b), (world.b, world.a)):
        for method, user, status, errors, server in itertools.product(
            (None, *METHODS),
            (None, "alice"),
            (None, 200, 500),
            (False, True),
            (None, me.servers[0], other.servers[0]),
        ):
            params: dict[str, Any] = {**window, "errors": str(errors).lower()}
            flt: dict[str, Any] = {}
            for name, column, value in (
                ("method", "rpc_method", method),
                ("user_id", "user_id", user),
                ("status", "status_code", status),
                ("server_id", "server_id", server),
            ):
                if value is not None:
                    params[name] = value
                    flt[column] = value
            if errors:
                flt["error_flag"] = True
            response = await client.get("/v1/logs", params=params, headers=me.headers)
            assert response.status_code == 200, response.text
            assert {i["id"] for i in response.json()["items"]} == _expected(me, **flt), params
            _assert_nothing_of(response.text, world, other)
