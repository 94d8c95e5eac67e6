"""`omnilog maintain` against real PostgreSQL and SeaweedFS: what used to grow without bound is
expired. The whole values of oversized dead letters (under OMNILOG_DLQ_OBJECT_PREFIX) past the
dead-letter retention, and the server_stats deltas held for a server never registered once their
window is past the accepted lateness; each counted in the run's metrics and records."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from click.testing import CliRunner, Result
from prometheus_client.parser import text_string_to_metric_families

from pipeline.cli import cli
from pipeline.settings import Settings
from sinks.migrate import migrate
from sinks.objects import s3_client
from tests.integration.cli_env import command_env

pytestmark = pytest.mark.integration

DEFAULT_ORG = "00000000-0000-0000-0000-000000000000"  # the seed's organization
OTHER_ORG = str(uuid.UUID(int=0xB2))  # named by events, never registered
REGISTERED, UNREGISTERED = (str(uuid.UUID(int=n)) for n in (0xC1, 0xC2))


async def _maintain(settings: Settings, *args: str) -> Result:
    # The command runs its own event loop: invoke it off this test's loop.
    return await asyncio.to_thread(
        CliRunner().invoke,
        cli,
        ["maintain", "--orphan-grace-hours", "0", *args],
        env=command_env(
            settings,
            OMNILOG_DLQ_OBJECT_PREFIX=settings.dlq_object_prefix,
            OMNILOG_MAX_EVENT_AGE_DAYS=str(settings.max_event_age_days),
        ),
    )


def _samples(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(path.read_text())
        for s in family.samples
    }


async def _keys(s3: Any, bucket: str, prefix: str) -> set[str]:
    keys: set[str] = set()
    async for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.update(o["Key"] for o in page.get("Contents", []))
    return keys


async def _steps(url: str, what: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(
            "SELECT dry_run, organization_id::text AS org, objects, bytes, aggregate_rows, error "
            "FROM retention_cleanup_logs WHERE what = $1 ORDER BY id",
            what,
        )
    finally:
        await conn.close()


async def test_dead_letter_values_expire_past_their_retention(fresh_database_url, make_settings, tmp_path):
    settings = make_settings(database_url=fresh_database_url)
    await migrate(fresh_database_url)
    prefix, bucket = settings.dlq_object_prefix, settings.s3_bucket
    old = {f"{prefix}{settings.topic}/{i % 8}/{i}-{uuid.uuid4().hex}" for i in range(230)}
    async with s3_client(settings) as s3:
        await asyncio.gather(*(s3.put_object(Bucket=bucket, Key=k, Body=b"v" * 10) for k in old))
        # LastModified has whole seconds: 10 s apart, a cutoff 5 s before the young value's write
        # separates them even if maintain takes a few seconds to read the clock.
        await asyncio.sleep(10)
        cutoff = time.time() - 5
        young = f"{prefix}{settings.topic}/0/999-{uuid.uuid4().hex}"
        event_object = f"org/{DEFAULT_ORG}/date=2020-01-01/_/t-1.jsonl.gz"  # not a dead letter
        for key in (young, event_object):
            await s3.put_object(Bucket=bucket, Key=key, Body=b"v" * 10)

        # The default retention (the deployment's, 90 days here) keeps all of them.
        default = await _maintain(settings)
        assert default.exit_code == 0, default.output
        assert await _keys(s3, bucket, prefix) == {*old, young}

        # Past the cutoff: the 230 older values go, in pages of 100; the young one and the event
        # object stay.
        def retention() -> str:
            return str((time.time() - cutoff) / 86400)

        dry = await _maintain(settings, "--dead-letter-retention-days", retention(), "--dry-run")
        assert dry.exit_code == 0, dry.output
        assert orjson.loads(dry.output)["would_delete"]["dead_letter_values"] == len(old)
        assert await _keys(s3, bucket, prefix) == {*old, young}
        metrics = tmp_path / "maintain.prom"
        run = await _maintain(
            settings, "--dead-letter-retention-days", retention(), "--metrics-textfile", str(metrics)
        )
        assert run.exit_code == 0, run.output
        assert await _keys(s3, bucket, prefix) == {young}
        assert await _keys(s3, bucket, "org/") == {event_object}
    summary = orjson.loads(run.output)
    assert summary["dead_letter_values"] == summary["deleted"]["dead_letter_values"] == len(old)
    gauges = _samples(metrics)
    assert gauges[("omnilog_maintain_last_run_deleted_objects", ())] == len(old)
    assert gauges[("omnilog_maintain_last_run_deleted_bytes", ())] == 10 * len(old)
    steps = await _steps(fresh_database_url, "dead_letters")
    assert [(s["dry_run"], s["objects"], s["error"]) for s in steps] == [
        (False, 0, None),
        (True, len(old), None),
        (False, len(old), None),
    ]


async def test_a_prefix_overlapping_the_events_is_refused(fresh_database_url, make_settings):
    settings = make_settings(database_url=fresh_database_url, OMNILOG_DLQ_OBJECT_PREFIX="org/")
    await migrate(fresh_database_url)
    async with s3_client(settings) as s3:
        key = f"org/{DEFAULT_ORG}/date=2020-01-01/_/t-1.jsonl.gz"
        await s3.put_object(Bucket=settings.s3_bucket, Key=key, Body=b"v")
        await asyncio.sleep(2)
        run = await _maintain(settings, "--dead-letter-retention-days", str(1 / 86400))
        assert await _keys(s3, settings.s3_bucket, "org/") == {key}
    assert run.exit_code == 1, run.output  # the step failed, visibly
    [step] = await _steps(fresh_database_url, "dead_letters")
    assert step["objects"] == 0 and "overlaps org/" in step["error"]


_DELTA = (
    "INSERT INTO server_stats_deltas (slot, window_start, organization_id, server_id, window_seconds, "
    "sums, sketch) VALUES ($1, $2, $3::uuid, $4::uuid, 60, '{1,0,1}', ''::bytea)"
)


async def test_held_server_deltas_are_dropped_past_the_accepted_lateness(
    fresh_database_url, make_settings, tmp_path, caplog
):
    settings = make_settings(database_url=fresh_database_url, OMNILOG_MAX_EVENT_AGE_DAYS="30")
    await migrate(fresh_database_url)
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    past = now - timedelta(days=33)  # older than the 30 days accepted plus the day of margin
    recent = now - timedelta(days=29)
    conn = await asyncpg.connect(fresh_database_url)
    try:
        await conn.execute(
            "INSERT INTO mcp_servers (id, organization_id, name, protocol) "
            "VALUES ($1::uuid, $2::uuid, 'r', 'http')",
            REGISTERED, DEFAULT_ORG,
        )  # fmt: skip
        rows = [
            *((slot, past, DEFAULT_ORG, UNREGISTERED) for slot in (0, 5, 63)),  # dropped
            *((slot, past - timedelta(days=200), OTHER_ORG, UNREGISTERED) for slot in (1, 2)),  # dropped
            # another organization's registered server is not registered to OTHER_ORG: held, dropped
            (3, past, OTHER_ORG, REGISTERED),
            (4, recent, DEFAULT_ORG, UNREGISTERED),  # held, still reachable by a late event: kept
            (6, past, DEFAULT_ORG, REGISTERED),  # registered: the merger folds it, not ours
        ]
        await conn.executemany(_DELTA, rows)
        kept = {(4, recent), (6, past)}

        dry = await _maintain(settings, "--dry-run")
        assert dry.exit_code == 0, dry.output
        assert await conn.fetchval("SELECT count(*) FROM server_stats_deltas") == len(rows)
        metrics = tmp_path / "maintain.prom"
        with caplog.at_level(logging.WARNING, logger="omnilog.held_deltas"):
            run = await _maintain(settings, "--metrics-textfile", str(metrics))
        assert run.exit_code == 0, run.output
        left = await conn.fetch("SELECT slot, window_start FROM server_stats_deltas")
        assert {(r["slot"], r["window_start"]) for r in left} == kept
    finally:
        await conn.close()
    expected = {DEFAULT_ORG: 3, OTHER_ORG: 3}
    assert orjson.loads(dry.output)["held_server_deltas"] == expected
    summary = orjson.loads(run.output)
    assert summary["held_server_deltas"] == expected
    assert summary["deleted"]["held_server_deltas"] == 6 and summary["deleted"]["aggregate_rows"] == 0
    gauges = _samples(metrics)
    assert gauges[("omnilog_maintain_last_run_deleted_rows", (("kind", "held_server_deltas"),))] == 6
    assert gauges[("omnilog_maintain_last_run_deleted_rows", (("kind", "rollups"),))] == 0
    steps = await _steps(fresh_database_url, "held_server_deltas")
    assert sorted((s["dry_run"], s["org"], s["aggregate_rows"]) for s in steps) == sorted(
        (dry_run, org, count) for dry_run in (True, False) for org, count in expected.items()
    )
    logged = {r.organization_id: r.deltas for r in caplog.records if r.name == "omnilog.held_deltas"}
    assert logged == expected
