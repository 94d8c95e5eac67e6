"""Two organizations with interleaved data, API keys and an API login role: the world the API
tests run against (real PostgreSQL and SeaweedFS of the session stack).

Rows are written as the tables' owner, the way the worker writes them: stored events are real
gzip members in S3 that the index rows point at, aggregates and usage are rollup rows. Org B
deliberately shares what can be shared with org A (method names, user ids, one object and even
gzip members), so a missing filter would show.
"""

from __future__ import annotations

import gzip
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import orjson
import uvicorn
from fastapi import FastAPI

from pipeline.api.app import create_app
from pipeline.devtools.stack import StackInfo, create_database, drop_database
from pipeline.devtools.stack.s3 import S3Credentials, ensure_bucket
from pipeline.settings import Settings, load_settings
from sinks.api_keys import create_key, revoke_key
from sinks.migrate import migrate
from sinks.objects import ObjectWriter, s3_client
from sinks.partitions import ensure_day_partitions

METHODS = ("tools/call", "tools/list", "resources/read")
USERS = ("alice", "bob", "carol")


@dataclass
class Tenant:
    org: str
    servers: list[str]
    sessions: list[str]
    key: str = ""
    events: dict[str, bytes] = field(default_factory=dict)  # event id -> stored line
    rows: list[dict[str, Any]] = field(default_factory=list)  # as indexed

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@dataclass
class World:
    settings: Settings
    owner_url: str
    api_url: str
    api_role: str
    a: Tenant
    b: Tenant
    revoked_key: str
    now: datetime

    def secrets_of(self, tenant: Tenant) -> set[str]:
        """Strings that must never appear in an answer to the other tenant."""
        return {tenant.org, *tenant.servers, *tenant.sessions, *tenant.events}


def _with_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, f"{user}@{host}", parts.path, parts.query, parts.fragment))


def _event(rng: random.Random, tenant: Tenant, started: datetime) -> dict[str, Any]:
    status = rng.choice([200, 200, 200, 404, 500])
    return {
        "event_id": str(uuid.UUID(int=rng.getrandbits(128))),
        "organization_id": tenant.org,
        "server_id": rng.choice(tenant.servers),
        "session_id": rng.choice(tenant.sessions),
        "rpc_method": rng.choice(METHODS),
        "level": "error" if status >= 500 else "info",
        "started_at": started.isoformat(),
        "duration_ms": rng.randint(1, 900),
        "status_code": status,
        "user_id": rng.choice(USERS),
        "remote_ip": "10.0.0.7",
        "request": {"params": {"q": "x" * rng.randint(1, 200)}},
    }


async def _write_events(
    conn: asyncpg.Connection, objects: ObjectWriter, world: World, rng: random.Random
) -> None:
    """Interleaved events of both tenants in shared gzip members of one object, then indexed."""
    events: list[tuple[Tenant, dict[str, Any]]] = []
    for i in range(120):
        tenant = world.a if i % 2 == 0 else world.b
        started = world.now - timedelta(minutes=3 * i + rng.randint(0, 2), seconds=rng.randint(0, 59))
        events.append((tenant, _event(rng, tenant, started)))
    days = {datetime.fromisoformat(e["started_at"]).date() for _, e in events}
    await ensure_day_partitions(conn, "log_index", days)
    key = f"api-test/{uuid.uuid4().hex}.jsonl.gz"
    uri = f"s3://{world.settings.s3_bucket}/{key}"
    body = b""
    records = []
    for start in range(0, len(events), 7):  # members of 7 lines: both tenants in each
        chunk = events[start : start + 7]
        lines = [orjson.dumps(e) for _, e in chunk]
        member = gzip.compress(b"\n".join(lines) + b"\n")
        for (tenant, event), line in zip(chunk, lines, strict=True):
            tenant.events[event["event_id"]] = line
            row = {
                "id": event["event_id"],
                "organization_id": tenant.org,
                "server_id": event["server_id"],
                "session_id": event["session_id"],
                "rpc_method": event["rpc_method"],
                "level": event["level"],
                "started_at": datetime.fromisoformat(event["started_at"]),
                "duration_ms": event["duration_ms"],
                "status_code": event["status_code"],
                "error_flag": event["status_code"] >= 500,
                "user_id": event["user_id"],
            }
            tenant.rows.append(row)
            records.append((*row.values(), "s3", uri, len(body), len(member), "10.0.0.7"))
        body += member
    await objects.put(key, body)
    await conn.executemany(
        "INSERT INTO log_index (id, organization_id, server_id, session_id, rpc_method, level, started_at, "
        "duration_ms, status_code, error_flag, user_id, storage_provider, object_uri, byte_offset, "
        "byte_length, remote_ip) VALUES ($1::uuid, $2::uuid, $3::uuid, $4::uuid, $5, $6::log_level_enum, "
        "$7, $8, $9, $10, $11, $12::storage_provider_enum, $13, $14, $15, $16::inet)",
        records,
    )
    for tenant in (world.a, world.b):
        await conn.execute(
            "INSERT INTO ingest_objects (object_uri, organization_id, log_date, event_count, byte_size) "
            "VALUES ($1, $2::uuid, $3, $4, $5)",
            f"{uri}#{tenant.org}",
            tenant.org,
            world.now.date(),
            len(tenant.events),
            len(body),
        )


async def _write_rollups(conn: asyncpg.Connection, world: World) -> None:
    hour = world.now.replace(minute=0, second=0, microsecond=0)
    day = hour.replace(hour=0)
    for n, tenant in enumerate((world.a, world.b), start=1):
        for window, start in (("hourly", hour - timedelta(hours=1)), ("daily", day)):
            keys: list[tuple[str | None, str | None]] = [(None, None)]
            keys += [(server, None) for server in tenant.servers]
            keys += [(server, method) for server in tenant.servers for method in METHODS]
            for server, method in keys:
                await conn.execute(
                    "INSERT INTO log_aggregates (organization_id, server_id, window_type, window_start, "
                    "rpc_method, total_requests, success_requests, error_requests, p50_duration_ms, "
                    "p95_duration_ms, p99_duration_ms, avg_duration_ms, total_bytes_in, total_bytes_out) "
                    "VALUES ($1::uuid, $2::uuid, $3::aggregation_window_enum, $4, $5, $6, $6, 0, "
                    "$7::int, $7::int, $7::int, $7::int, $8, $8)",
                    tenant.org,
                    server,
                    window,
                    start,
                    method,
                    1000 * n,  # org A's counts are 1000s, B's 2000s
                    10 * n,
                    # B's byte sums are past 2^64: NUMERIC(38,0) values must come out whole
                    (1 << 70) * n,
                )
        for model in ("model-x", "model-y"):
            await conn.execute(
                "INSERT INTO usage_hourly (bucket, org_id, project_id, model, request_count, success_count, "
                "total_input_tokens, total_cost_cents, unique_users, p50_latency_ms) "
                "VALUES ($1, $2::uuid, $3::uuid, $4, $5::bigint, $5::bigint, $5::bigint, $5::bigint, "
                "$6, 12.5)",
                hour - timedelta(hours=1),
                tenant.org,
                tenant.servers[0],  # any uuid will do as a project id
                model,
                500 * n,
                3 * n,
            )
            await conn.execute(
                "INSERT INTO usage_daily (bucket, org_id, project_id, model, user_id, request_count, "
                "success_count, unique_users) "
                "VALUES ($1, $2::uuid, $3::uuid, $4, NULL, $5::bigint, $5::bigint, $6)",
                day,
                tenant.org,
                tenant.servers[0],
                model,
                500 * n,
                3 * n,
            )


@asynccontextmanager
async def build_world(stack_info: StackInfo, seed: int = 14) -> AsyncIterator[World]:
    suffix = uuid.uuid4().hex[:12]
    database = f"api_{suffix}"
    owner_url = create_database(stack_info, database)
    api_role = f"api_login_{suffix}"
    settings_values: dict[str, object] = {
        **stack_info.env(),
        "OMNILOG_S3_BUCKET": f"api-{suffix}",
        "OMNILOG_DATABASE_URL": owner_url,
        "OMNILOG_API_DATABASE_URL": _with_user(owner_url, api_role),
    }
    settings = load_settings(None, **settings_values)
    s3_port = int(stack_info.s3_endpoint_url.rsplit(":", 1)[1])
    ensure_bucket(
        s3_port,
        S3Credentials(stack_info.aws_access_key_id, stack_info.aws_secret_access_key),
        settings.s3_bucket,
    )
    await migrate(owner_url)
    rng = random.Random(seed)

    def tenant() -> Tenant:
        return Tenant(
            org=str(uuid.UUID(int=rng.getrandbits(128))),
            servers=[str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(2)],
            sessions=[str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(3)],
        )

    conn = await asyncpg.connect(owner_url)
    try:
        await conn.execute(f'CREATE ROLE "{api_role}" LOGIN IN ROLE omnilog_api')
        world = World(
            settings=settings,
            owner_url=owner_url,
            api_url=settings.api_database_url.get_secret_value(),
            api_role=api_role,
            a=tenant(),
            b=tenant(),
            revoked_key="",
            now=datetime.now(UTC).replace(microsecond=0),
        )
        async with s3_client(settings) as s3:
            await _write_events(conn, ObjectWriter(s3, settings.s3_bucket, 1 << 30), world, rng)
        await _write_rollups(conn, world)
        world.a.key = (await create_key(conn, world.a.org, "a")).secret
        world.b.key = (await create_key(conn, world.b.org, "b")).secret
        revoked = await create_key(conn, world.a.org, "revoked")
        await revoke_key(conn, world.a.org, revoked.id)
        world.revoked_key = revoked.secret
    finally:
        await conn.close()
    try:
        yield world
    finally:
        drop_database(stack_info, database)
        conn = await asyncpg.connect(stack_info.database_url)
        try:
            await conn.execute(f'DROP ROLE IF EXISTS "{api_role}"')
        finally:
            await conn.close()


@asynccontextmanager
async def api_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client bound to `app`, with the app's lifespan (pool, S3 client) running."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
            yield client


def app_for(world: World, **overrides: object) -> FastAPI:
    settings = world.settings.model_copy(update=overrides) if overrides else world.settings
    return create_app(settings)


@dataclass
class ServedApi:
    url: str
    server: uvicorn.Server
    thread: threading.Thread


@contextmanager
def serve_in_thread(app: FastAPI) -> Iterator[ServedApi]:
    """`app` behind a real uvicorn server on a free loopback port, in a thread with its own loop."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="api-under-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the API did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield ServedApi(f"http://127.0.0.1:{port}", server, thread)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
