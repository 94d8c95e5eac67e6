"""The ingest worker against real Tansu, SeaweedFS and PostgreSQL (docs/contract.md §3, §4, §6)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import asyncpg
import orjson
import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from consumers.ingest.factory import build_worker
from pipeline.cli import cli
from sinks.migrate import migrate
from sinks.objects import ObjectWriter, s3_client
from sinks.readpath import QueryFilter, fetch_bodies, query_index
from tests.integration.ingest_support import (
    Traffic,
    create_topic,
    produce_traffic,
    start_worker,
    verify_exactly_once,
    wait_caught_up,
    wait_for_log,
    worker_env,
)

pytestmark = pytest.mark.integration


def _counter(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels or None)
    return value or 0.0


async def test_events_indexed_once_with_pointers_objects_and_dead_letters(fresh_database_url, make_settings):
    settings = make_settings(database_url=fresh_database_url, batch_max_events=700, batch_max_age_s=0.5)
    await migrate(fresh_database_url)
    await create_topic(settings, settings.topic, partitions=4)
    traffic = await produce_traffic(settings, count=3000, seed=11)
    registry = CollectorRegistry()
    worker = build_worker(settings, registry=registry)
    task = asyncio.create_task(worker.run())
    try:
        await wait_caught_up(fresh_database_url, settings, traffic.end_offsets, timeout=120)
    finally:
        worker.request_stop()
        assert await asyncio.wait_for(task, 60) == 0
    summary = await verify_exactly_once(fresh_database_url, settings, traffic)
    assert summary["indexed"] == len(traffic.valid) == 3000
    # Re-sent event_ids are indexed once and counted.
    assert _counter(registry, "omnilog_events_duplicate_total") == traffic.resent > 0
    assert _counter(registry, "omnilog_events_indexed_total") == 3000
    for reason in set(traffic.invalid.values()):
        expected = sum(1 for r in traffic.invalid.values() if r == reason)
        assert _counter(registry, "omnilog_events_dead_lettered_total", reason=reason) == expected
    # Several organizations and days ended in several objects, grouped, not one per event.
    assert 9 <= summary["objects"] < 500
    await _check_read_path(fresh_database_url, settings, traffic)


async def _check_read_path(database_url: str, settings, traffic: Traffic) -> None:
    """`logs query` pages cover each matching event exactly once; bodies and `logs get` return the
    exact bytes sent."""
    org = next(iter(orjson.loads(v)["organization_id"] for v in traffic.valid.values()))
    expected = {i for i, v in traffic.valid.items() if orjson.loads(v)["organization_id"] == org}
    errors = {i for i in expected if orjson.loads(traffic.valid[i])["status_code"] >= 400}
    conn = await asyncpg.connect(database_url)
    try:
        seen: list[str] = []
        cursor = None
        while True:
            rows, cursor = await query_index(conn, QueryFilter(organization_id=org), limit=250, cursor=cursor)
            seen += [str(r["id"]) for r in rows]
            if cursor is None:
                break
        assert len(seen) == len(set(seen)) and set(seen) == expected
        error_rows, _ = await query_index(
            conn, QueryFilter(organization_id=org, errors_only=True), limit=10_000
        )
        assert {str(r["id"]) for r in error_rows} == errors
        sample, _ = await query_index(conn, QueryFilter(organization_id=org), limit=40)
        async with s3_client(settings) as s3:
            bodies = await fetch_bodies(ObjectWriter(s3, settings.s3_bucket, 1 << 30), sample)
    finally:
        await conn.close()
    assert all(bodies[str(r["id"])] == traffic.valid[str(r["id"])] for r in sample)
    event_id = str(sample[0]["id"])
    env = {**os.environ, **worker_env(settings)}
    result = await asyncio.to_thread(CliRunner().invoke, cli, ["logs", "get", event_id], env=env)
    assert result.exit_code == 0, result.output
    assert result.output.strip().encode() == traffic.valid[event_id]


async def test_crash_at_every_stage_loses_and_duplicates_nothing(
    fresh_database_url, make_settings, tmp_path: Path
):
    """kill -9 between upload and the Postgres commit, between the Postgres and Kafka commits, and
    while uploading; many times; restarts resume from Postgres with no gap and no duplicate."""
    settings = make_settings(
        database_url=fresh_database_url,
        batch_max_events=250,
        batch_max_age_s=0.3,
        rebalance_drain_s=2.0,
        kafka_session_timeout_ms=3000,
    )
    await migrate(fresh_database_url)
    await create_topic(settings, settings.topic, partitions=3)
    traffic = await produce_traffic(settings, count=3000, seed=23)
    crashes = 0
    deadline = time.monotonic() + 150
    failpoints = "after_upload:0.15,after_postgres_commit:0.15,during_upload:0.03,after_kafka_commit:0.1"
    while time.monotonic() < deadline:
        proc = start_worker(settings, tmp_path / "worker.log", OMNILOG_FAILPOINTS=failpoints)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        if proc.returncode == -signal.SIGKILL:
            crashes += 1
        try:
            await wait_caught_up(fresh_database_url, settings, traffic.end_offsets, timeout=0.1)
            break
        except AssertionError:
            continue
    assert crashes >= 5, f"only {crashes} crashes happened; the test proved little"
    # A last clean worker run makes sure nothing is pending, then the books must balance.
    final_log = tmp_path / "final-worker.log"
    proc = start_worker(settings, final_log)
    try:
        await wait_caught_up(fresh_database_url, settings, traffic.end_offsets, timeout=60)
        # Caught up already before it started: a SIGTERM before the worker has installed its
        # handlers would kill it (-15) rather than test its drain, so wait until it is running.
        await wait_for_log(final_log, "partitions assigned", timeout=60)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    await verify_exactly_once(fresh_database_url, settings, traffic)


async def test_workers_joining_and_leaving_keep_exactly_once(
    fresh_database_url, make_settings, tmp_path: Path
):
    settings = make_settings(
        database_url=fresh_database_url, batch_max_events=400, batch_max_age_s=0.3, rebalance_drain_s=3.0
    )
    await migrate(fresh_database_url)
    await create_topic(settings, settings.topic, partitions=6)
    traffic = Traffic()
    producing = asyncio.create_task(_produce_in_waves(settings, traffic, waves=4))
    workers = [start_worker(settings, tmp_path / f"w{i}.log") for i in range(3)]
    await asyncio.sleep(8)
    # A SIGTERM before the worker installed its handlers kills it (-15) instead of testing its
    # drain; on a loaded machine start-up alone can take longer than 8 s.
    await wait_for_log(tmp_path / "w0.log", "partitions assigned", timeout=60)
    workers[0].send_signal(signal.SIGTERM)  # a graceful leave
    await asyncio.sleep(4)
    workers[1].kill()  # a crash
    await asyncio.sleep(2)
    workers.append(start_worker(settings, tmp_path / "w3.log"))  # a join
    await producing
    try:
        await wait_caught_up(fresh_database_url, settings, traffic.end_offsets, timeout=150)
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        # A SIGTERM'd worker ends within its grace period plus client timeouts (its watchdog
        # ends it at 35 s, exit 3). Never leave one running past the test if it does not.
        try:
            for proc in workers:
                proc.wait(timeout=40)
        finally:
            for proc in workers:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    assert workers[0].returncode == 0
    # Every stopped worker drained: none was ended by its watchdog (exit 3).
    assert [p.returncode for p in workers if p is not workers[1]] == [0, 0, 0]
    await verify_exactly_once(fresh_database_url, settings, traffic)


async def _produce_in_waves(settings, traffic: Traffic, waves: int) -> None:
    for wave in range(waves):
        await produce_traffic(settings, count=1000, seed=100 + wave, traffic=traffic)
        await asyncio.sleep(3)


async def test_s3_and_postgres_outages_lose_nothing(stack, fresh_database_url, make_settings, tmp_path: Path):
    settings = make_settings(
        database_url=fresh_database_url, batch_max_events=300, batch_max_age_s=0.3, retry_max_s=2.0
    )
    await migrate(fresh_database_url)
    await create_topic(settings, settings.topic, partitions=2)
    traffic = await produce_traffic(settings, count=1500, seed=5)
    proc = start_worker(settings, tmp_path / "worker.log")
    try:
        await asyncio.sleep(3)
        stack.stop_service("s3")
        await produce_traffic(settings, count=800, seed=6, traffic=traffic)
        await asyncio.sleep(5)
        assert proc.poll() is None, "the worker must wait out an S3 outage, not exit"
        stack.start_service("s3")
        await asyncio.sleep(3)
        stack.stop_service("postgres")
        await asyncio.sleep(5)
        assert proc.poll() is None, "the worker must wait out a Postgres outage, not exit"
        stack.start_service("postgres")
        await produce_traffic(settings, count=800, seed=7, traffic=traffic)
        await wait_caught_up(fresh_database_url, settings, traffic.end_offsets, timeout=120)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=40)
    await verify_exactly_once(fresh_database_url, settings, traffic)


async def test_sigterm_drains_within_grace_period(fresh_database_url, make_settings, tmp_path: Path):
    settings = make_settings(
        database_url=fresh_database_url, batch_max_events=100_000, batch_max_age_s=30.0, shutdown_grace_s=10.0
    )
    await migrate(fresh_database_url)
    await create_topic(settings, settings.topic, partitions=2)
    proc = start_worker(settings, tmp_path / "worker.log")
    traffic = await produce_traffic(settings, count=500, seed=9)
    await wait_for_log(tmp_path / "worker.log", "partitions assigned", timeout=30)
    await asyncio.sleep(3)  # consumed into the open batch, which is far from due
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert time.monotonic() - started <= settings.shutdown_grace_s + 5
    # The open batch was finished, not abandoned: everything consumed is committed.
    conn = await asyncpg.connect(fresh_database_url)
    try:
        indexed = await conn.fetchval("SELECT count(*) FROM log_index")
    finally:
        await conn.close()
    assert indexed == len(traffic.valid)


async def test_uploads_held_through_a_long_outage_are_renewed(
    stack, fresh_database_url, make_settings, monkeypatch
):
    """An upload older than REUPLOAD_AFTER_S is re-uploaded under a new key before the commit, so
    the janitor's orphan sweep can never delete an object a slow commit then points at."""
    from pipeline.processing import flush as flush_module

    monkeypatch.setattr(flush_module, "REUPLOAD_AFTER_S", 1.0)
    settings = make_settings(database_url=fresh_database_url, batch_max_age_s=0.3, retry_max_s=1.0)
    await migrate(fresh_database_url)
    await create_topic(settings, settings.topic, partitions=2)
    registry = CollectorRegistry()
    worker = build_worker(settings, registry=registry)
    task = asyncio.create_task(worker.run())
    try:
        deadline = time.monotonic() + 30
        while _counter(registry, "omnilog_worker_ready") != 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        stack.stop_service("postgres")
        traffic = await produce_traffic(settings, count=500, seed=31)
        # Uploaded, then the commit fails: waited for rather than slept on (a loaded machine took
        # longer than a fixed 4 s to get there), then held failing past REUPLOAD_AFTER_S.
        deadline = time.monotonic() + 60
        while _counter(registry, "omnilog_dependency_up", dependency="postgres") != 0:
            assert time.monotonic() < deadline, "the commit never failed while PostgreSQL was down"
            await asyncio.sleep(0.2)
        await asyncio.sleep(2)
        stack.start_service("postgres")
        await wait_caught_up(fresh_database_url, settings, traffic.end_offsets, timeout=60)
    finally:
        worker.request_stop()
        assert await asyncio.wait_for(task, 60) == 0
    await verify_exactly_once(fresh_database_url, settings, traffic)
    assert _counter(registry, "omnilog_orphaned_uploads_total") > 0


async def test_lag_is_exact_and_never_negative(fresh_database_url, make_settings):
    """Lag = high watermark (from fetch responses, right on Tansu) − the stored next offset."""
    settings = make_settings(database_url=fresh_database_url, batch_max_events=100_000, batch_max_age_s=4.0)
    await migrate(fresh_database_url)
    await create_topic(settings, settings.topic, partitions=2)
    traffic = await produce_traffic(settings, count=600, seed=41, resend_fraction=0.0)
    registry = CollectorRegistry()
    worker = build_worker(settings, registry=registry)
    task = asyncio.create_task(worker.run())

    def lag(partition: int) -> float | None:
        return registry.get_sample_value(
            "omnilog_consumer_lag_messages", {"topic": settings.topic, "partition": str(partition)}
        )

    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(lag(p) != end for p, end in traffic.end_offsets.items()):
            await asyncio.sleep(0.1)
        # Consumed but not yet committed (the batch is not due): the whole backlog is lag.
        assert {p: lag(p) for p in traffic.end_offsets} == {
            p: float(e) for p, e in traffic.end_offsets.items()
        }
        await wait_caught_up(fresh_database_url, settings, traffic.end_offsets, timeout=30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(lag(p) != 0 for p in traffic.end_offsets):
            await asyncio.sleep(0.1)
        assert all(lag(p) == 0 for p in traffic.end_offsets)
    finally:
        worker.request_stop()
        assert await asyncio.wait_for(task, 60) == 0
