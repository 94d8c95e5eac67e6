"""Retention per organization and plan against real PostgreSQL and SeaweedFS: organizations on
each plan plus explicit values, events across 400 days of ages; after `omnilog maintain` exactly
the expected index rows, objects, ledger rows, usage and rollup rows remain, every remaining
pointer resolves, a dry run deletes nothing and predicts the real run, a plan change works both
ways, and an object whose delete failed is retried by the next run."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from botocore.exceptions import ClientError
from click.testing import CliRunner, Result
from prometheus_client.parser import text_string_to_metric_families

from pipeline.cli import cli
from pipeline.processing.layout import object_key, object_uri, parse_object_uri
from pipeline.settings import Settings
from sinks.janitor import expire_organization
from sinks.migrate import migrate
from sinks.objects import s3_client
from sinks.partitions import ensure_day_partitions
from tests.integration.cli_env import command_env

pytestmark = pytest.mark.integration

TODAY = datetime.now(UTC).date()
AGES = (0, 6, 7, 8, 29, 30, 31, 89, 91, 120, 364, 365, 366, 400)  # days before today
DEFAULT_ORG = "00000000-0000-0000-0000-000000000000"  # the seed's: enterprise, explicit 365 d
FREE, PRO, ENTERPRISE, EXPLICIT = (str(uuid.UUID(int=n)) for n in (0xF1, 0xF2, 0xF3, 0xF4))
UNREGISTERED = str(uuid.UUID(int=0xF5))  # named by events, not in organizations
ORGS = {FREE: ("free", None), PRO: ("pro", None), ENTERPRISE: ("enterprise", None), EXPLICIT: ("free", 45)}
EXPECTED_DAYS = {FREE: 7, PRO: 30, ENTERPRISE: 365, EXPLICIT: 45, DEFAULT_ORG: 365, UNREGISTERED: 90}


def _at(age: int) -> datetime:
    day = TODAY - timedelta(days=age)
    return datetime(day.year, day.month, day.day, 12, tzinfo=UTC)


async def _maintain(settings: Settings, *args: str) -> Result:
    # The command runs its own event loop: invoke it off this test's loop.
    return await asyncio.to_thread(
        CliRunner().invoke, cli, ["maintain", "--orphan-grace-hours", "0", *args], env=command_env(settings)
    )


async def _seed(conn: asyncpg.Connection, settings: Settings) -> None:
    for org, (plan, days) in ORGS.items():
        await conn.execute(
            "INSERT INTO organizations (id, name, slug, plan_type, log_retention_days)"
            " VALUES ($1::uuid, $2::text, $2::text, $3::plan_type_enum, $4)",
            org, f"org-{org[-2:]}", plan, days,
        )  # fmt: skip
    seeded_days = [TODAY - timedelta(days=a) for a in AGES]
    for table in ("log_index", "usage_events", "mcp_usage"):
        await ensure_day_partitions(conn, table, seeded_days)
    async with s3_client(settings) as s3:
        for org in EXPECTED_DAYS:
            for age in AGES:
                at = _at(age)
                key = object_key(org, at.date(), None, "retention")
                uri = object_uri(settings.s3_bucket, key)
                await s3.put_object(Bucket=settings.s3_bucket, Key=key, Body=b"x" * 10)
                await conn.execute(
                    "INSERT INTO ingest_objects (object_uri, organization_id, log_date, event_count,"
                    " byte_size) VALUES ($1, $2::uuid, $3, 2, 10)",
                    uri, org, at.date(),
                )  # fmt: skip
                for n in range(2):
                    await conn.execute(
                        "INSERT INTO log_index (id, organization_id, started_at, storage_provider,"
                        " object_uri, byte_offset, byte_length)"
                        " VALUES (gen_random_uuid(), $1::uuid, $2, 's3', $3, $4, 5)",
                        org, at, uri, n * 5,
                    )  # fmt: skip
                await conn.execute(
                    "INSERT INTO usage_events (time, org_id, request_id)"
                    " VALUES ($1, $2::uuid, gen_random_uuid())",
                    at, org,
                )  # fmt: skip
                await conn.execute(
                    "INSERT INTO mcp_usage (time, org_id, server_id, tool_name, request_id, status)"
                    " VALUES ($1, $2::uuid, gen_random_uuid(), 't', gen_random_uuid(), 'success')",
                    at, org,
                )  # fmt: skip
        for org in EXPECTED_DAYS:
            for age in (*AGES, 1000, 1824, 1826, 2000):
                at = _at(age)
                await conn.execute("INSERT INTO usage_hourly (bucket, org_id) VALUES ($1, $2::uuid)", at, org)
                await conn.execute("INSERT INTO usage_daily (bucket, org_id) VALUES ($1, $2::uuid)", at, org)


async def _ages(conn: asyncpg.Connection, sql: str, org: str) -> list[int]:
    return sorted({(TODAY - r[0].date()).days if isinstance(r[0], datetime) else (TODAY - r[0]).days
                   for r in await conn.fetch(sql, org)})  # fmt: skip


def _kept(days: int, ages: tuple[int, ...] = AGES) -> list[int]:
    return sorted(a for a in ages if a <= days)


async def _object_exists(s3: Any, uri: str) -> bool:
    bucket, key = parse_object_uri(uri)
    try:
        await s3.head_object(Bucket=bucket, Key=key)
    except ClientError:
        return False
    return True


async def _check_state(conn: asyncpg.Connection, settings: Settings, expected_days: dict[str, int]) -> None:
    for org, days in expected_days.items():
        kept = _kept(days)
        assert (
            await _ages(conn, "SELECT started_at FROM log_index WHERE organization_id = $1::uuid", org)
            == kept
        ), org
        assert (
            await _ages(conn, "SELECT log_date FROM ingest_objects WHERE organization_id = $1::uuid", org)
            == kept
        ), org
        usage = _kept(min(days, 90))
        assert await _ages(conn, "SELECT time FROM usage_events WHERE org_id = $1::uuid", org) == usage, org
        assert await _ages(conn, "SELECT time FROM mcp_usage WHERE org_id = $1::uuid", org) == usage, org
        every = (*AGES, 1000, 1824, 1826, 2000)
        assert await _ages(conn, "SELECT bucket FROM usage_hourly WHERE org_id = $1::uuid", org) == _kept(
            365, every
        )
        assert await _ages(conn, "SELECT bucket FROM usage_daily WHERE org_id = $1::uuid", org) == _kept(
            1825, every
        )
    async with s3_client(settings) as s3:
        # Every remaining pointer resolves; every object of an expired day is gone.
        for row in await conn.fetch("SELECT DISTINCT object_uri FROM log_index"):
            assert await _object_exists(s3, row[0]), row[0]
        listed: list[str] = []
        paginator = s3.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=settings.s3_bucket, Prefix="org/"):
            listed.extend(object_uri(settings.s3_bucket, o["Key"]) for o in page.get("Contents", []))
        ledger = {r[0] for r in await conn.fetch("SELECT object_uri FROM ingest_objects")}
        assert sorted(listed) == sorted(ledger)


@pytest.fixture
async def world(fresh_database_url: str, make_settings: Callable[..., Settings]) -> Settings:
    await migrate(fresh_database_url)
    settings = make_settings(database_url=fresh_database_url)
    conn = await asyncpg.connect(fresh_database_url)
    try:
        await _seed(conn, settings)
    finally:
        await conn.close()
    return settings


async def test_each_organization_keeps_its_plan_or_explicit_retention(world: Settings) -> None:
    settings = world
    dry = await _maintain(settings, "--dry-run")
    assert dry.exit_code == 0, dry.output
    would = orjson.loads(dry.output.splitlines()[-1])
    conn = await asyncpg.connect(settings.database_url.get_secret_value())
    try:
        # A dry run deletes nothing.
        assert await conn.fetchval("SELECT count(*) FROM log_index") == len(EXPECTED_DAYS) * len(AGES) * 2
        assert await conn.fetchval("SELECT first_kept_day FROM retention_horizon") is None

        result = await _maintain(settings)
        assert result.exit_code == 0, result.output
        summary = orjson.loads(result.output.splitlines()[-1])
        # Partitions are dropped past the longest retention (365 d), the rest per organization.
        assert summary["partition_retention_days"] == 365
        assert summary["retention_horizon"] == (TODAY - timedelta(days=365)).isoformat()
        assert summary["dropped_days"] == sorted((TODAY - timedelta(days=a)).isoformat() for a in (400, 366))
        await _check_state(conn, settings, EXPECTED_DAYS)
        # The dry run predicted the real run's deletions (index rows and objects per organization).
        assert would["would_delete"]["usage_rows"] + would["would_delete"]["index_rows"] > 0
        assert would["would_delete"]["objects"] == summary["deleted"]["objects"]
        assert would["would_delete"]["bytes"] == summary["deleted"]["bytes"]
        for org, counts in summary["organizations"].items():
            assert would["organizations"][org]["index_rows"] == counts["index_rows"], org
            assert would["organizations"][org]["objects"] == counts["objects"], org
        # Every deletion is on record, per organization.
        logged = await conn.fetch(
            "SELECT organization_id::text AS org, sum(index_rows) AS rows, sum(objects) AS objects"
            " FROM retention_cleanup_logs WHERE what = 'organization' AND NOT dry_run GROUP BY 1"
        )
        by_org = {r["org"]: (r["rows"], r["objects"]) for r in logged}
        free_expired = len([a for a in AGES if 7 < a <= 365])
        assert by_org[FREE] == (2 * free_expired, free_expired)
        assert (
            await conn.fetchval("SELECT count(*) FROM retention_cleanup_logs WHERE what = 'partitions'") == 1
        )

        # Plan changes, both ways: free -> enterprise never brings a deleted day back; pro -> an
        # explicit 7 days expires its older rows at the next run.
        await conn.execute("UPDATE organizations SET plan_type = 'enterprise' WHERE id = $1::uuid", FREE)
        await conn.execute("UPDATE organizations SET log_retention_days = 7 WHERE id = $1::uuid", PRO)
        again = await _maintain(settings)
        assert again.exit_code == 0, again.output
        await _check_state(conn, settings, {**EXPECTED_DAYS, FREE: 7, PRO: 7})
        # The partitions and objects past the horizon went with the first run; nothing is left to
        # delete a third time.
        third = orjson.loads((await _maintain(settings)).output.splitlines()[-1])
        assert third["organizations"] == {} and third["failures"] == 0
    finally:
        await conn.close()


def _gauges(path: Path) -> dict[str, float]:
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(path.read_text())
        for sample in family.samples
    }


async def test_a_failed_object_delete_keeps_its_ledger_row_and_is_retried(
    world: Settings, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    metrics = tmp_path / "maintain.prom"
    settings = world
    # The ledger names an object in a bucket that does not exist yet: its delete fails.
    other = f"{settings.s3_bucket}-gone"
    at = _at(29)  # a day with partitions, past the free plan's 7 days
    uri = object_uri(other, object_key(FREE, at.date(), None, "retention"))
    conn = await asyncpg.connect(settings.database_url.get_secret_value())
    try:
        await conn.execute(
            "INSERT INTO ingest_objects (object_uri, organization_id, log_date, event_count, byte_size)"
            " VALUES ($1, $2::uuid, $3, 1, 10)",
            uri, FREE, at.date(),
        )  # fmt: skip
        await conn.execute(
            "INSERT INTO log_index (id, organization_id, started_at, storage_provider, object_uri,"
            " byte_offset, byte_length) VALUES (gen_random_uuid(), $1::uuid, $2, 's3', $3, 0, 5)",
            FREE, at, uri,
        )  # fmt: skip
        first = await _maintain(settings, "--metrics-textfile", str(metrics))
        assert first.exit_code == 1, first.output
        gauges = _gauges(metrics)
        assert gauges["omnilog_maintain_last_success_timestamp_seconds"] == 0.0  # never succeeded yet
        assert gauges["omnilog_maintain_last_run_failed"] == 1.0
        assert gauges["omnilog_maintain_failed_objects"] == 1.0
        assert gauges["omnilog_maintain_last_run_duration_seconds"] > 0
        summary = orjson.loads(first.output.splitlines()[0])
        # The failed run's deletions are reported too (the other organizations' expired objects).
        assert gauges["omnilog_maintain_last_run_deleted_objects"] == summary["deleted"]["objects"] > 0
        assert gauges["omnilog_maintain_last_run_deleted_bytes"] == summary["deleted"]["bytes"] > 0
        assert summary["failures"] == 1 and summary["organizations"][FREE]["failed_objects"] == 1
        # The index row is gone, the ledger row stays for the retry.
        assert await conn.fetchval("SELECT count(*) FROM log_index WHERE object_uri = $1", uri) == 0
        assert await conn.fetchval("SELECT count(*) FROM ingest_objects WHERE object_uri = $1", uri) == 1
        assert await conn.fetchval(
            "SELECT count(*) FROM retention_cleanup_logs"
            " WHERE organization_id = $1::uuid AND error LIKE '%gone%'",
            FREE,
        ) == 1  # fmt: skip

        make_settings(OMNILOG_S3_BUCKET=other)  # creates the bucket
        async with s3_client(settings) as s3:
            await s3.put_object(Bucket=other, Key=parse_object_uri(uri)[1], Body=b"x")
            before = time.time()
            second = await _maintain(settings, "--metrics-textfile", str(metrics))
            assert second.exit_code == 0, second.output
            gauges = _gauges(metrics)
            assert gauges["omnilog_maintain_last_success_timestamp_seconds"] >= int(before)
            assert gauges["omnilog_maintain_last_run_failed"] == 0
            assert gauges["omnilog_maintain_failed_objects"] == 0
            assert not await _object_exists(s3, uri)
        assert await conn.fetchval("SELECT count(*) FROM ingest_objects WHERE object_uri = $1", uri) == 0
        await _check_state(conn, settings, EXPECTED_DAYS)
    finally:
        await conn.close()


class _IngestDuringDelete:
    """The real object store, except that while the expiry deletes its last page (the 8-day-old
    object: pages go oldest first) a worker's batch commits a new object and index rows for the
    same organization and an expired day the walk has already passed (29 days old)."""

    def __init__(self, s3: Any, conn: asyncpg.Connection, settings: Settings) -> None:
        self.s3, self.conn, self.settings = s3, conn, settings
        self.committed: list[str] = []

    async def delete_objects(self, **kwargs: Any) -> Any:
        last_page = (
            f"date={(TODAY - timedelta(days=8)).isoformat()}/" in kwargs["Delete"]["Objects"][0]["Key"]
        )
        if last_page and not self.committed:
            at = _at(29)
            key = object_key(FREE, at.date(), None, "late")
            uri = object_uri(self.settings.s3_bucket, key)
            await self.s3.put_object(Bucket=self.settings.s3_bucket, Key=key, Body=b"late")
            async with self.conn.transaction():  # the batch transaction: ledger row + index row
                await self.conn.execute(
                    "INSERT INTO ingest_objects (object_uri, organization_id, log_date, event_count,"
                    " byte_size) VALUES ($1, $2::uuid, $3, 1, 4)",
                    uri, FREE, at.date(),
                )  # fmt: skip
                await self.conn.execute(
                    "INSERT INTO log_index (id, organization_id, started_at, storage_provider,"
                    " object_uri, byte_offset, byte_length)"
                    " VALUES (gen_random_uuid(), $1::uuid, $2, 's3', $3, 0, 4)",
                    FREE, at, uri,
                )  # fmt: skip
            self.committed.append(uri)
        return await self.s3.delete_objects(**kwargs)


async def test_a_batch_committed_while_expiring_keeps_its_object_until_the_next_run(world: Settings) -> None:
    settings = world
    url = settings.database_url.get_secret_value()
    expirer, worker = await asyncpg.connect(url), await asyncpg.connect(url)
    try:
        async with s3_client(settings) as s3:
            store = _IngestDuringDelete(s3, worker, settings)
            first_kept = TODAY - timedelta(days=7)
            result = await expire_organization(expirer, store, FREE, first_kept, page=1, idle_ratio=0)  # type: ignore[arg-type]
            (late,) = store.committed
            assert result.failed_objects == 0 and result.objects == len([a for a in AGES if a > 7])
            # The late batch's rows and object survive this run, and its pointer resolves.
            assert await expirer.fetchval("SELECT count(*) FROM log_index WHERE object_uri = $1", late) == 1
            assert await _object_exists(s3, late)
            dangling = await expirer.fetchval(
                "SELECT count(*) FROM log_index i WHERE i.organization_id = $1::uuid AND NOT EXISTS"
                " (SELECT 1 FROM ingest_objects o WHERE o.object_uri = i.object_uri)",
                FREE,
            )
            assert dangling == 0
            # The next run expires it with the rest.
            again = await expire_organization(expirer, s3, FREE, first_kept, idle_ratio=0)
            assert (again.objects, again.index_rows) == (1, 1)
            assert not await _object_exists(s3, late)
    finally:
        await expirer.close()
        await worker.close()


async def test_raw_usage_rows_are_deleted_in_batches_across_day_partitions(world: Settings) -> None:
    conn = await asyncpg.connect(world.database_url.get_secret_value())
    try:
        # 12,000 rows over two expired days: three 5,000-row batches, spanning two partitions.
        for age in (29, 30):
            await conn.execute(
                "INSERT INTO usage_events (time, org_id, request_id)"
                " SELECT $1, $2::uuid, gen_random_uuid() FROM generate_series(1, 6000)",
                _at(age), PRO,
            )  # fmt: skip
        result = await expire_organization(conn, _NoObjects(), PRO, TODAY - timedelta(days=7), idle_ratio=0)  # type: ignore[arg-type]
        before = len([a for a in AGES if a > 7])
        assert result.usage_rows == 12_000 + 2 * before  # plus usage_events and mcp_usage seeded per day
        assert await _ages(conn, "SELECT time FROM usage_events WHERE org_id = $1::uuid", PRO) == _kept(7)
    finally:
        await conn.close()


class _NoObjects:
    async def delete_objects(self, **kwargs: Any) -> Any:
        return {}
