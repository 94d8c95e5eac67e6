"""Customer-owned buckets (docs/storage.md) on the session stack's SeaweedFS and PostgreSQL.

The customer's bucket is reached with a separate SeaweedFS identity that may use only buckets
named `customer-*` (pipeline/devtools/stack/s3.py), through a profile of an AWS shared config
file the test writes: the way a deployment mounts the customer's keys or role. Batches go
through the real flush (pipeline/processing/flush.py) with the real batch transaction.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from botocore.exceptions import ClientError
from click.testing import CliRunner
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from consumers.ingest.factory import build_worker, partition_ensurer
from pipeline.cli import cli
from pipeline.contract import ValidationPolicy
from pipeline.devtools.stack import StackInfo
from pipeline.devtools.stack.s3 import S3Credentials, customer_credentials, ensure_bucket
from pipeline.metrics import WorkerMetrics
from pipeline.processing.batch import Batch, Message
from pipeline.processing.dead_letters import DeadLetter, DeadLetterLimit
from pipeline.processing.flush import FlushContext, FlushReport, flush
from pipeline.processing.layout import parse_object_uri
from pipeline.processing.offsets import PartitionRange
from pipeline.processing.retry import ErrorKind, RetryPolicy, classify
from pipeline.processing.store import DeadLetterSink, PreparedLetters
from pipeline.settings import Settings
from sinks.buckets import (
    BucketConflict,
    BucketRoute,
    CustomerBucketUnavailable,
    RoutedObjects,
    customer_client,
    set_route,
)
from sinks.index import Horizon, PostgresIndexStore, init_offsets
from sinks.janitor import expire_organization
from sinks.migrate import migrate
from sinks.objects import s3_client
from sinks.partitions import PartitionCache
from sinks.readpath import BodyError, fetch_bodies
from sinks.retention import load_horizon, lock_horizon
from tests.integration.api_world import World, api_client, app_for, build_world
from tests.integration.ingest_support import create_topic, make_event, produce_events

pytestmark = pytest.mark.integration

PROFILE = "acme-logs"
CUSTOMER_ORG = str(uuid.UUID(int=0xC0FFEE))
OTHER_ORG = str(uuid.UUID(int=0xB0B))


class _NoLetters:
    """The batches here are all valid: a dead letter would be a failure of the test."""

    def prepare(self, letters: Sequence[DeadLetter]) -> PreparedLetters:
        raise AssertionError(f"unexpected dead letters: {letters}")


def _credentials(stack_info: StackInfo) -> S3Credentials:
    return S3Credentials(stack_info.aws_access_key_id, stack_info.aws_secret_access_key)


def _migrated_cli_env(
    stack_info: StackInfo, database_url: str, make_settings: Any, **extra: str
) -> tuple[Any, dict[str, str]]:
    """A migrated database and the environment a CLI command against it runs with."""
    asyncio.run(migrate(database_url))
    settings = make_settings(database_url=database_url)
    env = {
        **stack_info.env(),
        "OMNILOG_DATABASE_URL": database_url,
        "OMNILOG_S3_BUCKET": settings.s3_bucket,
        **extra,
    }
    return settings, env


@pytest.fixture
def customer_bucket(stack_info: StackInfo) -> str:
    """A bucket of the customer's (created by an administrator, as a customer would)."""
    bucket = f"customer-{uuid.uuid4().hex[:12]}"
    ensure_bucket(int(stack_info.s3_endpoint_url.rsplit(":", 1)[1]), _credentials(stack_info), bucket)
    return bucket


@pytest.fixture
def aws_profile(stack_info: StackInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An AWS shared config file with the customer's profile, and no other AWS credentials in
    the environment: whatever reaches the customer bucket can only have come from the profile."""
    keys = customer_credentials(_credentials(stack_info))
    config = tmp_path / "aws-config"
    config.write_text(
        f"[profile {PROFILE}]\n"
        f"aws_access_key_id = {keys.access_key_id}\n"
        f"aws_secret_access_key = {keys.secret_access_key}\n"
        "region = us-east-1\n"
    )
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials-file"))
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    yield config


def _route(stack_info: StackInfo, bucket: str, org: str = CUSTOMER_ORG) -> BucketRoute:
    return BucketRoute(org, bucket, stack_info.s3_endpoint_url, "us-east-1", PROFILE)


def _batch(values: list[bytes], start: int) -> Batch:
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    messages = [
        Message(partition=0, offset=start + i, value=v, size=len(v), timestamp_ms=now_ms)
        for i, v in enumerate(values)
    ]
    return Batch(messages, [PartitionRange(0, start, start + len(values))], sum(len(v) for v in values))


def _events(rng: random.Random, org: str, count: int) -> dict[str, bytes]:
    now = datetime.now(UTC)
    sent = {}
    for _ in range(count):
        event = make_event(rng, now)
        event["organization_id"] = org
        sent[event["event_id"]] = orjson.dumps(event)
    return sent


async def _flush(
    pool: asyncpg.Pool,
    settings: Settings,
    objects: RoutedObjects,
    batch: Batch,
    letters: DeadLetterSink | None = None,
) -> FlushReport:
    metrics = WorkerMetrics(CollectorRegistry())
    ctx = FlushContext(
        topic=settings.topic,
        index=PostgresIndexStore(
            pool,
            settings.consumer_group,
            settings.topic,
            ensure_partitions=partition_ensurer(PartitionCache()),
            horizon=Horizon(load=load_horizon, lock=lock_horizon),
        ),
        objects=objects,
        dead_letters=letters or _NoLetters(),
        metrics=metrics,
        policy=ValidationPolicy(max_age=timedelta(days=30), max_future_skew=timedelta(hours=1)),
        member_bytes=4096,
        gzip_level=1,
        retry=RetryPolicy(metrics, 1.0),
        dlq_limit=DeadLetterLimit(0.5, 10_000),
    )
    return await flush(ctx, batch)


async def _keys(s3: Any, bucket: str) -> set[str]:
    listed = await s3.list_objects_v2(Bucket=bucket, Prefix="org/")
    return {o["Key"] for o in listed.get("Contents", [])}


async def _ingest_two_organizations(
    database_url: str, settings: Settings, s3: Any, route: BucketRoute, rng: random.Random
) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """One batch with events of the customer organization and of another; the routes are read
    from the table as a worker reads them."""
    customer, other = _events(rng, CUSTOMER_ORG, 40), _events(rng, OTHER_ORG, 40)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            await set_route(conn, route, settings.s3_bucket)
            await init_offsets(conn, settings.consumer_group, settings.topic, {0: 0})
        objects = RoutedObjects(s3, settings.s3_bucket, 1 << 30)
        try:
            async with pool.acquire() as conn:
                await objects.refresh(conn)
            values = [v for pair in zip(customer.values(), other.values(), strict=True) for v in pair]
            report = await _flush(pool, settings, objects, _batch(values, 0))
        finally:
            await objects.aclose()
    finally:
        await pool.close()
    assert len(report.outcome.new_events) == 80 and not report.letters
    return customer, other


async def test_objects_pointers_reads_and_retention_follow_the_organization_bucket(
    fresh_database_url: str,
    make_settings: Any,
    stack_info: StackInfo,
    customer_bucket: str,
    aws_profile: Path,
) -> None:
    await migrate(fresh_database_url)
    settings = make_settings(database_url=fresh_database_url)
    route = _route(stack_info, customer_bucket)
    async with s3_client(settings) as s3:
        customer, other = await _ingest_two_organizations(
            fresh_database_url, settings, s3, route, random.Random(13)
        )

        # Objects land in the organization's bucket, and pointers name it.
        conn = await asyncpg.connect(fresh_database_url)
        try:
            rows = [dict(r) for r in await conn.fetch("SELECT * FROM log_index")]
        finally:
            await conn.close()
        buckets = {(str(r["organization_id"]), parse_object_uri(r["object_uri"])[0]) for r in rows}
        assert buckets == {(CUSTOMER_ORG, customer_bucket), (OTHER_ORG, settings.s3_bucket)}
        customer_keys, own_keys = await _keys(s3, customer_bucket), await _keys(s3, settings.s3_bucket)
        assert customer_keys and all(k.startswith(f"org/{CUSTOMER_ORG}/") for k in customer_keys)
        assert own_keys and all(k.startswith(f"org/{OTHER_ORG}/") for k in own_keys)

    # The customer identity is really confined to its buckets: the deployment's is refused.
    async with customer_client(route) as confined:
        with pytest.raises(ClientError) as refused:
            await confined.list_objects_v2(Bucket=settings.s3_bucket)
        assert refused.value.response["Error"]["Code"] == "AccessDenied"

    # Reads: the deployment's keys are wrong here, so only the profile can read the customer's
    # events; the other organization's reads fail through the broken default keys.
    broken = settings.model_copy(update={"aws_secret_access_key": SecretStr("not-the-secret")})
    async with s3_client(broken) as bad_s3:
        reader = RoutedObjects(bad_s3, settings.s3_bucket, 1 << 30)
        try:
            conn = await asyncpg.connect(fresh_database_url)
            try:
                await reader.refresh(conn)
            finally:
                await conn.close()
            bodies = await fetch_bodies(reader, rows)
        finally:
            await reader.aclose()
    assert {i: bodies[i] for i in customer} == customer  # byte for byte
    assert all(isinstance(bodies[i], BodyError) for i in other)

    # Retention: the customer organization's index and ledger rows go, its objects stay (the
    # customer's lifecycle rules govern them); the other organization's objects are deleted.
    far = datetime.now(UTC).date() + timedelta(days=3)
    conn = await asyncpg.connect(fresh_database_url)
    try:
        async with s3_client(settings) as s3:
            planned = await expire_organization(conn, s3, CUSTOMER_ORG, far, idle_ratio=0, dry_run=True)
            assert (planned.index_rows, planned.objects) == (len(customer), 0)
            assert planned.released_objects == len(customer_keys)
            expired = await expire_organization(conn, s3, CUSTOMER_ORG, far, idle_ratio=0)
            assert expired.index_rows == len(customer) and expired.objects == 0
            assert expired.released_objects == len(customer_keys) and expired.failed_objects == 0
            assert await _keys(s3, customer_bucket) == customer_keys
            expired_other = await expire_organization(conn, s3, OTHER_ORG, far, idle_ratio=0)
            assert expired_other.objects == len(own_keys)
            assert await _keys(s3, settings.s3_bucket) == set()
        left = await conn.fetchval("SELECT count(*) FROM ingest_objects")
        assert await conn.fetchval("SELECT count(*) FROM log_index") == 0 and left == 0
    finally:
        await conn.close()


async def test_a_broken_customer_bucket_is_an_outage_of_that_bucket_only(
    fresh_database_url: str,
    make_settings: Any,
    stack_info: StackInfo,
    customer_bucket: str,
    aws_profile: Path,
) -> None:
    """A bucket the profile may not use: its uploads fail as a retriable outage naming the
    organization and profile (the worker does not stop), while the other organization's uploads
    through the same store succeed."""
    await migrate(fresh_database_url)
    settings = make_settings(database_url=fresh_database_url)
    forbidden = f"forbidden-{uuid.uuid4().hex[:12]}"  # outside the identity's customer-* buckets
    ensure_bucket(int(stack_info.s3_endpoint_url.rsplit(":", 1)[1]), _credentials(stack_info), forbidden)
    async with s3_client(settings) as s3:
        objects = RoutedObjects(s3, settings.s3_bucket, 1 << 30)
        objects.use_routes([_route(stack_info, forbidden), _route(stack_info, customer_bucket, OTHER_ORG)])
        try:
            with pytest.raises(CustomerBucketUnavailable) as failed:
                await objects.put(
                    f"org/{CUSTOMER_ORG}/x.jsonl.gz", b"x", bucket=objects.bucket_for(CUSTOMER_ORG)
                )
            message = str(failed.value)
            assert CUSTOMER_ORG in message and PROFILE in message and forbidden in message
            assert classify(failed.value) is ErrorKind.RETRIABLE
            await objects.put(f"org/{OTHER_ORG}/y.jsonl.gz", b"y", bucket=objects.bucket_for(OTHER_ORG))
            await objects.put("org/z/z.jsonl.gz", b"z", bucket=objects.bucket_for(str(uuid.uuid4())))
        finally:
            await objects.aclose()
        assert await _keys(s3, customer_bucket) == {f"org/{OTHER_ORG}/y.jsonl.gz"}
        assert await _keys(s3, settings.s3_bucket) == {"org/z/z.jsonl.gz"}


async def test_set_refuses_the_deployment_bucket_and_a_bucket_reached_two_ways(
    fresh_database_url: str, make_settings: Any, stack_info: StackInfo, customer_bucket: str
) -> None:
    await migrate(fresh_database_url)
    settings = make_settings(database_url=fresh_database_url)
    conn = await asyncpg.connect(fresh_database_url)
    try:
        with pytest.raises(BucketConflict, match="deployment's own bucket"):
            await set_route(conn, _route(stack_info, settings.s3_bucket), settings.s3_bucket)
        await set_route(conn, _route(stack_info, customer_bucket), settings.s3_bucket)
        elsewhere = BucketRoute(OTHER_ORG, customer_bucket, None, None, PROFILE)
        with pytest.raises(BucketConflict, match="already reached another way"):
            await set_route(conn, elsewhere, settings.s3_bucket)
        # Another organization of the same customer may share the bucket, reached the same way.
        assert (
            await set_route(conn, _route(stack_info, customer_bucket, OTHER_ORG), settings.s3_bucket) is None
        )
        # A new bucket retires the old one, which stays known for the pointers naming it.
        retired = await set_route(conn, _route(stack_info, "customer-next"), settings.s3_bucket)
        assert retired is not None and retired.bucket == customer_bucket
        rows = await conn.fetch(
            "SELECT bucket, retired_at IS NOT NULL AS retired FROM organization_buckets "
            "WHERE organization_id = $1::uuid ORDER BY bucket",
            CUSTOMER_ORG,
        )
        assert {r["bucket"]: r["retired"] for r in rows} == {"customer-next": False, customer_bucket: True}
    finally:
        await conn.close()


def test_cli_set_checks_the_bucket_with_the_profile_then_list_and_remove(
    fresh_database_url: str,
    make_settings: Any,
    stack_info: StackInfo,
    customer_bucket: str,
    aws_profile: Path,
) -> None:
    _, env = _migrated_cli_env(stack_info, fresh_database_url, make_settings)
    runner = CliRunner()
    base = ["buckets", "set", "--org", CUSTOMER_ORG, "--profile", PROFILE]
    where = ["--endpoint-url", stack_info.s3_endpoint_url, "--region", "us-east-1"]

    missing = runner.invoke(cli, [*base, "--bucket", "customer-does-not-exist", *where], env=env)
    assert missing.exit_code == 1, missing.output
    assert "not stored" in missing.output and PROFILE in missing.output and CUSTOMER_ORG in missing.output

    unknown = runner.invoke(
        cli, [*base[:-1], "no-such-profile", "--bucket", customer_bucket, *where], env=env
    )
    assert unknown.exit_code == 1 and "no-such-profile" in unknown.output

    stored = runner.invoke(cli, [*base, "--bucket", customer_bucket, *where], env=env)
    assert stored.exit_code == 0, stored.output
    listed = runner.invoke(cli, ["buckets", "list", "--json"], env=env)
    assert [orjson.loads(line)["bucket"] for line in listed.output.splitlines()] == [customer_bucket]

    removed = runner.invoke(cli, ["buckets", "remove", "--org", CUSTOMER_ORG], env=env)
    assert removed.exit_code == 0 and customer_bucket in removed.output
    again = runner.invoke(cli, ["buckets", "remove", "--org", CUSTOMER_ORG], env=env)
    assert again.exit_code == 1 and "has no bucket of its own" in again.output
    listed = runner.invoke(cli, ["buckets", "list", "--json"], env=env)
    assert [orjson.loads(line)["retired"] for line in listed.output.splitlines()] == [True]


@pytest.fixture
async def world(stack_info: StackInfo) -> AsyncIterator[World]:
    async with build_world(stack_info) as built:
        yield built


async def test_the_api_reads_a_customer_bucket_with_the_profile_only(
    world: World, stack_info: StackInfo, customer_bucket: str, aws_profile: Path
) -> None:
    """Tenant A's new events go to its bucket; the API (its default keys broken) returns them byte
    for byte to A's key and nothing to B's."""
    route = _route(stack_info, customer_bucket, world.a.org)
    settings = world.settings.model_copy(
        update={"topic": f"t.{uuid.uuid4().hex[:8]}", "consumer_group": f"g-{uuid.uuid4().hex[:8]}"}
    )
    sent = _events(random.Random(5), world.a.org, 12)
    pool = await asyncpg.create_pool(world.owner_url, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            await set_route(conn, route, settings.s3_bucket)
            await init_offsets(conn, settings.consumer_group, settings.topic, {0: 0})
        async with s3_client(settings) as s3:
            objects = RoutedObjects(s3, settings.s3_bucket, 1 << 30)
            try:
                async with pool.acquire() as conn:
                    await objects.refresh(conn)
                await _flush(pool, settings, objects, _batch(list(sent.values()), 0))
            finally:
                await objects.aclose()
    finally:
        await pool.close()

    # The API role sees its own organization's bucket rows only (row security, migration 0011).
    api = await asyncpg.connect(world.api_url)
    try:
        for org, expected in ((world.a.org, [customer_bucket]), (world.b.org, []), ("", [])):
            async with api.transaction(readonly=True):
                await api.execute("SELECT set_config('app.current_org', $1, true)", org)
                seen = await api.fetch("SELECT bucket FROM organization_buckets")
            assert [r["bucket"] for r in seen] == expected
    finally:
        await api.close()

    app = app_for(world, aws_secret_access_key=SecretStr("not-the-secret"))
    async with api_client(app) as client:
        for event_id, value in sent.items():
            answer = await client.get(f"/v1/events/{event_id}", headers=world.a.headers)
            assert answer.status_code == 200, answer.text
            assert answer.content == value
        first = next(iter(sent))
        assert (await client.get(f"/v1/events/{first}", headers=world.b.headers)).status_code == 404
        # An event of the deployment's bucket: the broken default keys are what reads it.
        own = next(iter(world.a.events))
        assert (await client.get(f"/v1/events/{own}", headers=world.a.headers)).status_code == 502


async def test_the_worker_sends_each_organization_to_its_bucket(
    fresh_database_url: str,
    make_settings: Any,
    stack_info: StackInfo,
    customer_bucket: str,
    aws_profile: Path,
) -> None:
    """The production wiring: `omnilog ingest`'s worker reads the routes before its first batch."""
    await migrate(fresh_database_url)
    settings = make_settings(database_url=fresh_database_url, batch_max_events=50, batch_max_age_s=0.3)
    conn = await asyncpg.connect(fresh_database_url)
    try:
        await set_route(conn, _route(stack_info, customer_bucket), settings.s3_bucket)
    finally:
        await conn.close()
    await create_topic(settings, settings.topic, partitions=1)
    rng, now = random.Random(21), datetime.now(UTC)
    events = [
        dict(make_event(rng, now), organization_id=rng.choice([CUSTOMER_ORG, OTHER_ORG])) for _ in range(200)
    ]
    sent = await produce_events(settings, events)
    worker = build_worker(settings, registry=CollectorRegistry())
    task = asyncio.create_task(worker.run())
    try:
        offsets_end = len(sent)
        deadline = asyncio.get_running_loop().time() + 90
        while True:
            conn = await asyncpg.connect(fresh_database_url)
            try:
                rows = [
                    dict(r)
                    for r in await conn.fetch(
                        "SELECT organization_id::text AS org, object_uri FROM log_index"
                    )
                ]
            finally:
                await conn.close()
            if len(rows) == offsets_end or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.5)
    finally:
        worker.request_stop()
        assert await asyncio.wait_for(task, 60) == 0
    assert len(rows) == len(events)
    assert {(r["org"], parse_object_uri(r["object_uri"])[0]) for r in rows} == {
        (CUSTOMER_ORG, customer_bucket),
        (OTHER_ORG, settings.s3_bucket),
    }
    async with s3_client(settings) as s3:
        assert all(k.startswith(f"org/{CUSTOMER_ORG}/") for k in await _keys(s3, customer_bucket))
        assert all(k.startswith(f"org/{OTHER_ORG}/") for k in await _keys(s3, settings.s3_bucket))


class _LetterRecorder:
    """A dead-letter sink that keeps the letters (no Kafka needed to see what was set aside)."""

    def __init__(self) -> None:
        self.sent: list[DeadLetter] = []

    def prepare(self, letters: Sequence[DeadLetter]) -> PreparedLetters:
        recorder = self

        class _Prepared:
            offloads = 0

            async def offload(self) -> None:
                return None

            async def send(self) -> None:
                recorder.sent.extend(letters)

        return _Prepared()


async def test_a_customer_bucket_given_up_on_dead_letters_its_events_and_the_rest_commits(
    fresh_database_url: str, make_settings: Any, stack_info: StackInfo, aws_profile: Path
) -> None:
    """The profile may not use the organization's bucket: after the outage bound (0 here) the
    batch commits the other organization's events and dead-letters the customer's."""
    await migrate(fresh_database_url)
    settings = make_settings(database_url=fresh_database_url)
    forbidden = f"forbidden-{uuid.uuid4().hex[:12]}"
    ensure_bucket(int(stack_info.s3_endpoint_url.rsplit(":", 1)[1]), _credentials(stack_info), forbidden)
    rng = random.Random(8)
    customer, other = _events(rng, CUSTOMER_ORG, 10), _events(rng, OTHER_ORG, 10)
    letters = _LetterRecorder()
    pool = await asyncpg.create_pool(fresh_database_url, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO organization_buckets (organization_id, bucket, endpoint_url, region, profile) "
                "VALUES ($1::uuid, $2, $3, 'us-east-1', $4)",
                CUSTOMER_ORG,
                forbidden,
                stack_info.s3_endpoint_url,
                PROFILE,
            )
            await init_offsets(conn, settings.consumer_group, settings.topic, {0: 0})
        async with s3_client(settings) as s3:
            objects = RoutedObjects(s3, settings.s3_bucket, 1 << 30, outage_s=0)
            try:
                async with pool.acquire() as conn:
                    await objects.refresh(conn)
                report = await _flush(
                    pool, settings, objects, _batch([*customer.values(), *other.values()], 0), letters
                )
            finally:
                await objects.aclose()
        async with pool.acquire() as conn:
            indexed = {str(r["id"]) for r in await conn.fetch("SELECT id FROM log_index")}
            stored = await conn.fetchval("SELECT next_offset FROM ingest_offsets")
    finally:
        await pool.close()
    assert indexed == set(other)
    assert {orjson.loads(m.message.value or b"")["event_id"] for m in letters.sent} == set(customer)
    assert {m.reason for m in letters.sent} == {"storage_unavailable"}
    assert all(CUSTOMER_ORG in m.detail and PROFILE in m.detail for m in letters.sent)
    assert report.invalid == len(customer) and stored == len(customer) + len(other)


def test_logs_get_and_query_read_a_customer_bucket_with_the_profile(
    fresh_database_url: str,
    make_settings: Any,
    stack_info: StackInfo,
    customer_bucket: str,
    aws_profile: Path,
) -> None:
    # The deployment's keys are wrong: only the profile can read the customer's events.
    settings, env = _migrated_cli_env(
        stack_info, fresh_database_url, make_settings, AWS_SECRET_ACCESS_KEY="not-the-secret"
    )

    async def ingest() -> dict[str, bytes]:
        async with s3_client(settings) as s3:
            customer, _ = await _ingest_two_organizations(
                fresh_database_url, settings, s3, _route(stack_info, customer_bucket), random.Random(2)
            )
        return customer

    customer = asyncio.run(ingest())
    runner = CliRunner()
    event_id, value = next(iter(customer.items()))
    got = runner.invoke(cli, ["logs", "get", event_id], env=env)
    assert got.exit_code == 0, got.output
    assert got.output.encode().rstrip(b"\n") == value
    queried = runner.invoke(
        cli,
        ["logs", "query", "--org", CUSTOMER_ORG, "--with-body", "--format", "json", "--limit", "100"],
        env=env,
    )
    assert queried.exit_code == 0, queried.output
    bodies = {row["id"]: row.get("event") for row in map(orjson.loads, queried.output.splitlines())}
    assert len(bodies) == len(customer) and all(bodies[i] == orjson.loads(v) for i, v in customer.items())
