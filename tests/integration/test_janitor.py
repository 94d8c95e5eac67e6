"""Object housekeeping against real SeaweedFS and PostgreSQL: orphans, retention, multipart."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.processing.layout import encode_lines, object_key, object_uri
from sinks.janitor import expire_before_horizon, sweep_orphans
from sinks.migrate import migrate
from sinks.objects import ObjectWriter, s3_client
from sinks.partitions import ensure_day_partitions
from sinks.retention import advance_horizon
from tests.integration.cli_env import command_env

pytestmark = pytest.mark.integration

ORG = "00000000-0000-4000-8000-00000000000a"
_LEDGER_INSERT = (
    "INSERT INTO ingest_objects (object_uri, organization_id, log_date, event_count, byte_size)"
    " VALUES ($1, $2, $3, 1, 1)"
)


async def _exists(s3, bucket: str, key: str) -> bool:
    listing = await s3.list_objects_v2(Bucket=bucket, Prefix=key)
    return any(o["Key"] == key for o in listing.get("Contents", []))


async def test_orphan_sweep_deletes_only_unrecorded_objects(fresh_database_url, make_settings):
    settings = make_settings(database_url=fresh_database_url)
    await migrate(fresh_database_url)
    today = datetime.now(UTC).date()
    recorded, orphan = (object_key(ORG, today, None, "t") for _ in range(2))
    conn = await asyncpg.connect(fresh_database_url)
    try:
        async with s3_client(settings) as s3:
            for key in (recorded, orphan):
                await s3.put_object(Bucket=settings.s3_bucket, Key=key, Body=b"x")
            await conn.execute(
                _LEDGER_INSERT, object_uri(settings.s3_bucket, recorded), ORG, today,
            )  # fmt: skip
            # Within the grace period nothing is touched: a flush may be about to commit it.
            assert await sweep_orphans(conn, s3, settings.s3_bucket, grace=timedelta(hours=1)) == 0
            assert await sweep_orphans(conn, s3, settings.s3_bucket, grace=timedelta(seconds=0)) == 1
            assert await _exists(s3, settings.s3_bucket, recorded)
            assert not await _exists(s3, settings.s3_bucket, orphan)
    finally:
        await conn.close()


async def test_retention_removes_index_rows_and_objects_together(fresh_database_url, make_settings):
    settings = make_settings(database_url=fresh_database_url)
    await migrate(fresh_database_url)
    today = datetime.now(UTC).date()
    old_day, new_day = today - timedelta(days=100), today - timedelta(days=1)
    conn = await asyncpg.connect(fresh_database_url)
    keys = {}
    try:
        # Partitions are dropped past the longest organization retention (the seed's default
        # organization keeps 365 days): at 90 days, the old day goes with its partition.
        await conn.execute("UPDATE organizations SET log_retention_days = 90")
        await ensure_day_partitions(conn, "log_index", [old_day, new_day])
        async with s3_client(settings) as s3:
            for day in (old_day, new_day):
                key = object_key(ORG, day, None, "t")
                keys[day] = key
                uri = object_uri(settings.s3_bucket, key)
                await s3.put_object(Bucket=settings.s3_bucket, Key=key, Body=b"x")
                await conn.execute(
                    _LEDGER_INSERT, uri, ORG, day,
                )  # fmt: skip
                await conn.execute(
                    "INSERT INTO log_index (id, organization_id, started_at, storage_provider, object_uri,"
                    " byte_offset, byte_length) VALUES (gen_random_uuid(), $1, $2, 's3', $3, 0, 1)",
                    ORG, datetime(day.year, day.month, day.day, 12, tzinfo=UTC), uri,
                )  # fmt: skip
    finally:
        await conn.close()

    env = command_env(settings)
    # The command runs its own event loop: invoke it off this test's loop.
    result = await asyncio.to_thread(CliRunner().invoke, cli, ["maintain", "--retention-days", "90"], env=env)
    assert result.exit_code == 0, result.output
    assert old_day.isoformat() in result.output and '"expired_objects":1' in result.output

    conn = await asyncpg.connect(fresh_database_url)
    try:
        days = [r["d"] for r in await conn.fetch("SELECT started_at::date AS d FROM log_index")]
        ledger = [r["log_date"] for r in await conn.fetch("SELECT log_date FROM ingest_objects")]
    finally:
        await conn.close()
    assert days == [new_day] and ledger == [new_day]
    async with s3_client(settings) as s3:
        assert not await _exists(s3, settings.s3_bucket, keys[old_day])
        assert await _exists(s3, settings.s3_bucket, keys[new_day])


async def test_large_objects_use_multipart_upload_and_read_back_whole(make_settings):
    settings = make_settings()
    lines = [b'{"n":%d,"pad":"%s"}' % (i, os.urandom(600).hex().encode()) for i in range(12_000)]
    encoded = encode_lines(lines, level=0)  # ~14 MiB: level 0 keeps it above the 5 MiB threshold
    assert len(encoded.body) > 10 * 1024 * 1024
    key = object_key(ORG, datetime.now(UTC).date(), None, "multipart")
    async with s3_client(settings) as s3:
        writer = ObjectWriter(s3, settings.s3_bucket, multipart_threshold=5 * 1024 * 1024)
        await writer.put(key, encoded.body)
        head = await s3.head_object(Bucket=settings.s3_bucket, Key=key)
        assert head["ContentLength"] == len(encoded.body)
        assert "-" in head["ETag"]  # a multipart ETag is "<md5 of part md5s>-<parts>"
        offset, length = encoded.pointers[7000]
        member = await writer.get_range(settings.s3_bucket, key, offset, length)
        assert member == encoded.body[offset : offset + length]


async def test_expiry_before_the_horizon_pages_and_keeps_the_ledger_rows_of_failed_deletes(
    fresh_database_url, make_settings
):
    settings = make_settings()
    await migrate(fresh_database_url)
    old_day = datetime.now(UTC).date() - timedelta(days=100)
    keys = [object_key(ORG, old_day, None, "t") for _ in range(5)]
    # One ledger row names a bucket that does not exist: its delete fails.
    missing = object_uri(f"{settings.s3_bucket}-gone", object_key(ORG, old_day, None, "t"))
    conn = await asyncpg.connect(fresh_database_url)
    try:
        async with s3_client(settings) as s3:
            for key in keys:
                await s3.put_object(Bucket=settings.s3_bucket, Key=key, Body=b"x")
                await conn.execute(_LEDGER_INSERT, object_uri(settings.s3_bucket, key), ORG, old_day)
            await conn.execute(_LEDGER_INSERT, missing, ORG, old_day)
            await advance_horizon(conn, old_day + timedelta(days=1))
            # Pages of 2: the keyset walk reaches every row, and a failed row does not stop it.
            result = await expire_before_horizon(conn, s3, old_day + timedelta(days=1), page=2)
            assert (result.objects, result.failed_objects) == (5, 1)
            assert result.errors and "NoSuchBucket" in result.errors[0]
            assert [r[0] for r in await conn.fetch("SELECT object_uri FROM ingest_objects")] == [missing]
            for key in keys:
                assert not await _exists(s3, settings.s3_bucket, key)
    finally:
        await conn.close()
