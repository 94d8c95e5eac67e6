"""Errors are classified once, against the real PostgreSQL: a row PostgreSQL refuses is traced to
its message and dead-lettered while the rest commits; an error no message explains stops the worker
with a non-zero exit instead of looping."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from consumers.ingest.factory import build_worker
from sinks.migrate import migrate
from tests.integration.ingest_support import (
    create_topic,
    make_event,
    produce_events,
    read_dead_letters,
    wait_caught_up,
)

pytestmark = pytest.mark.integration


async def test_a_row_postgres_refuses_is_dead_lettered_and_the_rest_commits(
    fresh_database_url, make_settings
):
    settings = make_settings(
        database_url=fresh_database_url, batch_max_events=400, batch_max_age_s=0.5, metrics_port=0
    )
    await migrate(fresh_database_url)
    # A rule no validator knows about stands for any data error one event can cause.
    conn = await asyncpg.connect(fresh_database_url)
    try:
        await conn.execute("ALTER TABLE log_index ADD CONSTRAINT test_no_teapots CHECK (status_code <> 418)")
    finally:
        await conn.close()
    await create_topic(settings, settings.topic, partitions=1)
    rng = random.Random(3)
    now = datetime.now(UTC)
    events = [make_event(rng, now) for _ in range(300)]
    for i in (17, 150, 151, 299):
        events[i]["status_code"] = 418
    sent = await produce_events(settings, events)
    teapots = {offset for offset, e in sent.items() if e["status_code"] == 418}

    registry = CollectorRegistry()
    worker = build_worker(settings, registry=registry)
    task = asyncio.create_task(worker.run())
    try:
        await wait_caught_up(fresh_database_url, settings, {0: max(sent) + 1}, timeout=60)
    finally:
        worker.request_stop()
        assert await asyncio.wait_for(task, 60) == 0

    conn = await asyncpg.connect(fresh_database_url)
    try:
        indexed = {r[0] for r in await conn.fetch("SELECT id::text FROM log_index")}
    finally:
        await conn.close()
    assert indexed == {e["event_id"] for o, e in sent.items() if o not in teapots}
    letters = await read_dead_letters(settings)
    assert letters == {(0, offset): "rejected_by_database" for offset in teapots}
    assert (
        registry.get_sample_value("omnilog_events_dead_lettered_total", {"reason": "rejected_by_database"})
        == 4
    )


async def test_an_error_no_message_explains_stops_the_worker(fresh_database_url, make_settings):
    settings = make_settings(
        database_url=fresh_database_url, batch_max_events=100, batch_max_age_s=0.3, metrics_port=0
    )
    await migrate(fresh_database_url)
    await create_topic(settings, settings.topic, partitions=1)
    conn = await asyncpg.connect(fresh_database_url)
    try:
        # Every batch now fails the same way, whatever it holds: retrying cannot help.
        await conn.execute("ALTER TABLE ingest_objects RENAME TO ingest_objects_gone")
    finally:
        await conn.close()
    rng = random.Random(4)
    sent = await produce_events(settings, [make_event(rng, datetime.now(UTC)) for _ in range(50)])

    registry = CollectorRegistry()
    worker = build_worker(settings, registry=registry)
    exit_code = await asyncio.wait_for(worker.run(), 60)
    assert exit_code != 0
    assert registry.get_sample_value("omnilog_worker_ready") == 0
    assert registry.get_sample_value("omnilog_fatal_errors_total", {"operation": "postgres"}) == 1
    # Nothing moved: the next worker (after the fix) starts where this one did.
    conn = await asyncpg.connect(fresh_database_url)
    try:
        stored = await conn.fetchval(
            "SELECT next_offset FROM ingest_offsets WHERE topic = $1", settings.topic
        )
        assert stored == min(sent)
        assert await conn.fetchval("SELECT count(*) FROM log_index") == 0
    finally:
        await conn.close()
