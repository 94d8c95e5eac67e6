"""Unique users stay exact for a worker that lags behind its topic (docs/aggregates.md).

A flush judges an event's age from its record's Kafka timestamp (pipeline/processing/flush.py
`decode`), so a worker days behind accepts events up to max_event_age_days older than their
records; the merger prunes the user sets of windows older than max_event_age_days + 1 days before
*now* (sinks/merger.py `prune_user_sets`). An event accepted for a window whose set was pruned
would count its user as new a second time.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson
import pytest

from pipeline.contract import ValidationPolicy, ValidEvent
from pipeline.processing.batch import Message
from pipeline.processing.flush import decode
from sinks import merger
from sinks.aggregates import build_extensions
from sinks.migrate import migrate
from sinks.partitions import ensure_day_partitions

pytestmark = pytest.mark.integration

MAX_AGE_DAYS = 90
POLICY = ValidationPolicy(max_age=timedelta(days=MAX_AGE_DAYS), max_future_skew=timedelta(minutes=5))
ORG = str(uuid.UUID(int=0xA100))
PROJECT = str(uuid.UUID(int=0xC100))


def _decoded(started: datetime, recorded: datetime, now: datetime) -> ValidEvent | None:
    """The event as a flush decodes it from a record stamped `recorded`, read at `now` (None: it
    was dead-lettered)."""
    body = {
        "event_id": str(uuid.uuid4()),
        "organization_id": ORG,
        "started_at": started.isoformat(),
        "duration_ms": 7,
        "user_id": "user-1",
        "project_id": PROJECT,
        "model": "gpt-x",
        "input_tokens": 3,
    }
    value = orjson.dumps(body)
    message = Message(0, 0, value, len(value), timestamp_ms=int(recorded.timestamp() * 1000))
    decoded = decode([message], POLICY, now, horizon=None)
    assert len(decoded.valid) + len(decoded.letters) == 1
    return decoded.valid[0] if decoded.valid else None


async def _commit(conn: asyncpg.Connection, event: ValidEvent) -> None:
    """What the batch transaction writes for one new event: usage rows and deltas."""
    for table in ("usage_events", "mcp_usage"):
        await ensure_day_partitions(conn, table, {event.started_at.date()})
    async with conn.transaction():
        for extension in build_extensions():
            await extension.write(conn, [event], 0)


async def test_a_lagging_worker_counts_a_user_once_across_the_hourly_prune(fresh_database_url: str) -> None:
    """Two events of one user, hour and key, read from a backlog days old: the first two days ago,
    the second now, after the merger's prune. Whatever the flush accepts is counted once, and the
    user once."""
    await migrate(fresh_database_url)
    now = datetime.now(UTC)
    recorded = now - timedelta(days=4)  # the records' time: the worker is days behind its topic
    started = (recorded - timedelta(days=MAX_AGE_DAYS - 1)).replace(minute=10, second=0, microsecond=0)
    first = _decoded(started, recorded, now - timedelta(days=2))
    second = _decoded(started + timedelta(minutes=20), recorded, now)
    assert first is not None  # within max age of its record, and not older than the user sets kept
    conn = await asyncpg.connect(fresh_database_url)
    try:
        await _commit(conn, first)
        await merger.merge_until_clean(conn)
        await merger.prune_user_sets(conn, MAX_AGE_DAYS, now)  # the merger's hourly prune
        if second is not None:
            await _commit(conn, second)
            await merger.merge_until_clean(conn)
        hourly = await conn.fetchrow(
            "SELECT request_count, unique_users FROM usage_hourly WHERE org_id = $1", uuid.UUID(ORG)
        )
        daily = await conn.fetchrow(
            "SELECT unique_users FROM usage_daily WHERE org_id = $1 AND user_id IS NULL", uuid.UUID(ORG)
        )
    finally:
        await conn.close()
    assert hourly is not None and daily is not None
    assert hourly["request_count"] == 1 + (second is not None)
    assert (hourly["unique_users"], daily["unique_users"]) == (1, 1)
