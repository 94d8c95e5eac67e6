"""Retention races with a running worker (docs/contract.md §6): after maintain drops a day, events
of that day are dead-lettered `expired`, its partition is never re-created, nothing stalls."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from consumers.ingest.factory import build_worker
from sinks.index import Horizon
from sinks.migrate import migrate
from sinks.partitions import drop_expired
from sinks.retention import lock_horizon
from tests.integration.ingest_support import (
    create_topic,
    make_event,
    produce_events,
    read_dead_letters,
    wait_caught_up,
)

pytestmark = pytest.mark.integration


def _at(rng: random.Random, start: datetime, count: int) -> list[dict]:
    """Events that started within 10 minutes after `start`."""
    events = []
    for _ in range(count):
        event = make_event(rng, start)
        event["started_at"] = (start + timedelta(seconds=rng.randint(0, 600))).isoformat()
        events.append(event)
    return events


async def _partitions(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        "SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = 'log_index'::regclass"
    )
    return {r[0] for r in rows}


async def _stale_load(conn: object) -> None:
    return None  # as if read just before maintain moved the horizon


@pytest.mark.parametrize(
    "stale_read", [False, True], ids=["horizon-read-at-flush-start", "horizon-moved-mid-flush"]
)
async def test_events_of_a_dropped_day_are_expired_and_the_day_stays_dropped(
    fresh_database_url, make_settings, stale_read: bool
):
    settings = make_settings(
        database_url=fresh_database_url, batch_max_events=100, batch_max_age_s=0.3, metrics_port=0
    )
    await migrate(fresh_database_url)
    await create_topic(settings, settings.topic, partitions=1)
    rng = random.Random(8)
    now = datetime.now(UTC)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    old_day = today - timedelta(days=5)
    recent = now - timedelta(minutes=20)

    registry = CollectorRegistry()
    worker = build_worker(settings, registry=registry)
    if stale_read:
        # The flush's early read misses the move: the transaction's share-locked read, and the
        # partition guard before it, must catch it.
        worker._horizon = Horizon(load=_stale_load, lock=lock_horizon)
    task = asyncio.create_task(worker.run())
    conn = await asyncpg.connect(fresh_database_url)
    try:
        # The worker indexes events of the old day: their partition exists and is in its cache.
        first = await produce_events(settings, _at(rng, old_day, 50) + _at(rng, recent, 50))
        await wait_caught_up(fresh_database_url, settings, {0: max(first) + 1}, timeout=60)
        old_partition = next(p for p in await _partitions(conn) if old_day.strftime("%Y%m%d") in p)

        # maintain: a 3-day retention drops the old day while the worker runs.
        dropped = await drop_expired(conn, retention_days=3, today=today.date())
        assert old_day.date() in dropped
        assert old_partition not in await _partitions(conn)

        second = await produce_events(settings, _at(rng, old_day, 30) + _at(rng, recent, 30))
        await wait_caught_up(fresh_database_url, settings, {0: max(second) + 1}, timeout=60)
        assert old_partition not in await _partitions(conn), "an expired day was re-created"
        indexed = {r[0] for r in await conn.fetch("SELECT id::text FROM log_index")}
    finally:
        await conn.close()
        worker.request_stop()
        assert await asyncio.wait_for(task, 60) == 0

    expected_expired = {
        o for o, e in second.items() if e["started_at"].startswith(old_day.date().isoformat())
    }
    assert len(expected_expired) == 30
    kept = [e for o, e in second.items() if o not in expected_expired]
    assert {e["event_id"] for e in kept} <= indexed
    letters = await read_dead_letters(settings)
    assert letters == {(0, o): "expired" for o in expected_expired}
    assert registry.get_sample_value("omnilog_events_dead_lettered_total", {"reason": "expired"}) == 30
