"""Stored offsets that no longer fit the log, on real Tansu and PostgreSQL.

- past the end: the topic is really deleted and re-created on the broker, between two runs of a
  worker and under a running one; with `earliest` every record of the new log is indexed exactly
  once, with `fail` the worker exits non-zero and nothing moves;
- before the start: Tansu 0.6.0 cannot delete records (DeleteRecords on its memory engine panics
  "not yet implemented", and it applies no retention), so that path runs the real worker code and
  real Postgres against a consumer that reports the log bounds a trimmed log would.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import OffsetOutOfRangeError
from prometheus_client import CollectorRegistry

from consumers.ingest.factory import build_worker
from consumers.ingest.offset_guard import OffsetGuard
from consumers.ingest.worker import IngestWorker
from pipeline.metrics import WorkerMetrics
from pipeline.processing.retry import RetryPolicy
from pipeline.settings import Settings
from sinks.migrate import migrate
from sinks.offsets import move_offset
from tests.integration.ingest_support import (
    Traffic,
    create_topic,
    make_event,
    start_worker,
    stored_offsets,
    verify_exactly_once,
    wait_caught_up,
)

pytestmark = pytest.mark.integration


def _count(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels or None) or 0.0


async def _produce(
    settings: Settings, per_partition: dict[int, int], seed: int, resend: Sequence[bytes] = ()
) -> Traffic:
    """Fresh events to the given partitions (plus `resend`, values sent before, to partition 0);
    the returned traffic knows every event and each partition's log end."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    traffic = Traffic()
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, linger_ms=5)
    await producer.start()
    try:
        futures = []
        for partition, count in per_partition.items():
            for _ in range(count):
                value = orjson.dumps(make_event(rng, now))
                traffic.valid[orjson.loads(value)["event_id"]] = value
                futures.append(await producer.send(settings.topic, value=value, partition=partition))
        for value in resend:
            futures.append(await producer.send(settings.topic, value=value, partition=0))
            traffic.resent += 1
        for future in futures:
            meta = await future
            traffic.end_offsets[meta.partition] = max(
                traffic.end_offsets.get(meta.partition, 0), meta.offset + 1
            )
    finally:
        await producer.stop()
    return traffic


async def _recreate_topic(settings: Settings, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        await admin.delete_topics([settings.topic])
    finally:
        await admin.close()
    await create_topic(settings, settings.topic, partitions)


async def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.2)


async def _wait_stored(
    database_url: str, settings: Settings, expected: dict[int, int], timeout: float
) -> None:
    """Until the stored offsets are exactly `expected` (not merely past them: they were)."""
    deadline = time.monotonic() + timeout
    while (stored := await stored_offsets(database_url, settings)) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"stored offsets {stored}, expected {expected}")
        await asyncio.sleep(0.3)


def _both(*rounds: Traffic, end_offsets: dict[int, int]) -> Traffic:
    """Every event of several rounds must be indexed once; the stored offsets are the last log's."""
    merged = Traffic(end_offsets=end_offsets)
    for r in rounds:
        merged.valid.update(r.valid)
    return merged


async def test_a_re_created_topic_is_read_from_its_first_record(fresh_database_url, make_settings):
    settings = make_settings(
        database_url=fresh_database_url, batch_max_events=150, batch_max_age_s=0.3, metrics_port=0
    )
    await migrate(fresh_database_url)
    await create_topic(settings, settings.topic, partitions=2)
    first = await _produce(settings, {0: 300, 1: 200}, seed=1)
    worker = build_worker(settings, registry=CollectorRegistry())
    task = asyncio.create_task(worker.run())
    try:
        await wait_caught_up(fresh_database_url, settings, first.end_offsets, timeout=120)
    finally:
        worker.request_stop()
        assert await asyncio.wait_for(task, 60) == 0

    # The topic is deleted and re-created while no worker runs: its offsets start again at 0, and
    # the stored ones (300, 200) are past the new log's end. Some events of the old log come again.
    await _recreate_topic(settings, partitions=2)
    again = list(first.valid.values())[:25]
    second = await _produce(settings, {0: 80, 1: 40}, seed=2, resend=again)
    assert second.end_offsets == {0: 105, 1: 40}
    registry = CollectorRegistry()
    worker = build_worker(settings, registry=registry)
    task = asyncio.create_task(worker.run())
    try:
        await _wait_for(
            lambda: _count(registry, "omnilog_offset_out_of_range_total", kind="past_end") == 2,
            60,
            "the worker detected both partitions past the end",
        )
        await _wait_stored(fresh_database_url, settings, second.end_offsets, timeout=120)
        # Without the reset, offsets 0..299 of the new log would have been skipped in silence.
        await verify_exactly_once(
            fresh_database_url, settings, _both(first, second, end_offsets=second.end_offsets)
        )
        assert _count(registry, "omnilog_events_duplicate_total") == len(again)
        assert _count(registry, "omnilog_offsets_lost_total") == 0

        # Re-created again under the running worker. Tansu answers a fetch past the end with no
        # records and a lower high watermark (never OFFSET_OUT_OF_RANGE), then would serve what
        # is produced later from the old offset on: the worker must notice before that.
        await _recreate_topic(settings, partitions=2)
        third = await _produce(settings, {0: 30, 1: 10}, seed=3)
        await _wait_for(
            lambda: _count(registry, "omnilog_offset_out_of_range_total", kind="past_end") == 4,
            60,
            "the running worker detected both partitions past the end",
        )
        fourth = await _produce(settings, {0: 200, 1: 60}, seed=4)  # beyond the old offsets
        ends = {0: 230, 1: 70}
        assert {p: third.end_offsets[p] + n for p, n in ((0, 200), (1, 60))} == ends == fourth.end_offsets
        await _wait_stored(fresh_database_url, settings, ends, timeout=120)
        await verify_exactly_once(
            fresh_database_url, settings, _both(first, second, third, fourth, end_offsets=ends)
        )
    finally:
        worker.request_stop()
        assert await asyncio.wait_for(task, 60) == 0


async def _store_offsets(database_url: str, settings: Settings, offsets: dict[int, int]) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.executemany(
            "INSERT INTO ingest_offsets (consumer_group, topic, partition, next_offset) "
            "VALUES ($1, $2, $3, $4)",
            [(settings.consumer_group, settings.topic, p, o) for p, o in offsets.items()],
        )
    finally:
        await conn.close()


async def test_fail_policy_stops_the_worker_and_moves_nothing(
    fresh_database_url, make_settings, tmp_path: Path
):
    settings = make_settings(database_url=fresh_database_url, batch_max_events=100, batch_max_age_s=0.3)
    await migrate(fresh_database_url)
    await create_topic(settings, settings.topic, partitions=2)
    await _produce(settings, {0: 50, 1: 50}, seed=5)
    await _store_offsets(fresh_database_url, settings, {0: 50, 1: 500})  # caught up; past the end (50)
    log_path = tmp_path / "worker.log"
    process = start_worker(settings, log_path, OMNILOG_OFFSET_OUT_OF_RANGE="fail")
    try:
        exit_code = await asyncio.to_thread(process.wait, 90)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"the worker did not stop: {log_path.read_text()[-3000:]}") from None
    assert exit_code == 1, log_path.read_text()[-3000:]
    assert await stored_offsets(fresh_database_url, settings) == {0: 50, 1: 500}
    conn = await asyncpg.connect(fresh_database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM log_index") == 0
    finally:
        await conn.close()
    lines = [orjson.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    refused = [line for line in lines if line.get("partition") == 1 and line.get("kind") == "past_end"]
    assert len(refused) == 1, lines
    assert refused[0]["level"] == "error"
    assert (refused[0]["stored_offset"], refused[0]["log_start"], refused[0]["log_end"]) == (500, 0, 50)
    assert any("offset_out_of_range" in str(line.get("operation")) for line in lines)


async def test_move_offset_is_a_compare_and_set(fresh_database_url, make_settings):
    settings = make_settings(database_url=fresh_database_url)
    await migrate(fresh_database_url)
    await _store_offsets(fresh_database_url, settings, {0: 5})
    conn = await asyncpg.connect(fresh_database_url)
    try:
        group, topic = settings.consumer_group, settings.topic
        assert not await move_offset(conn, group, topic, 0, expected=4, new=9)  # someone moved it
        assert not await move_offset(conn, group, topic, 1, expected=0, new=9)  # no such row
        assert await move_offset(conn, group, topic, 0, expected=5, new=2**63 - 1)
        assert not await move_offset(conn, group, topic, 0, expected=5, new=0)  # a zombie's late move
    finally:
        await conn.close()
    assert await stored_offsets(fresh_database_url, settings) == {0: 2**63 - 1}


class _TrimmedLogConsumer:
    """Stands in for aiokafka's consumer where the broker cannot trim a log: reports the bounds
    of a log whose start retention moved, raises what aiokafka raises (auto_offset_reset="none")
    on a fetch below it, and records the seeks."""

    def __init__(self, topic: str, bounds: dict[int, tuple[int, int]]) -> None:
        self.topic = topic
        self.bounds = bounds
        self.seeks: list[tuple[int, int]] = []
        self.fetch_errors: list[Exception] = []

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(self.topic, p) for p in self.bounds}

    async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.bounds[tp.partition][0] for tp in tps}

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.bounds[tp.partition][1] for tp in tps}

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.bounds[tp.partition][1]

    def last_poll_timestamp(self, tp: TopicPartition) -> int | None:
        return None  # no fetch answered: the bounds above are all there is

    async def committed(self, tp: TopicPartition) -> int | None:
        return None

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp.partition, offset))

    async def getmany(self, **_: Any) -> dict[TopicPartition, list[Any]]:
        if self.fetch_errors:
            raise self.fetch_errors.pop(0)
        return {}


@pytest.fixture
async def pool(fresh_database_url: str) -> AsyncIterator[asyncpg.Pool]:
    await migrate(fresh_database_url)
    async with asyncpg.create_pool(fresh_database_url, min_size=1, max_size=2) as pool:
        yield pool


def _worker_on(settings: Settings, pool: asyncpg.Pool, consumer: _TrimmedLogConsumer) -> IngestWorker:
    worker = IngestWorker(settings, registry=CollectorRegistry())
    worker._pool = pool
    worker._consumer = consumer  # type: ignore[assignment]  # a stand-in with the same calls
    return worker


async def test_records_deleted_before_they_were_read_are_counted_and_skipped_once(
    fresh_database_url, make_settings, pool
):
    settings = make_settings(database_url=fresh_database_url)
    await _store_offsets(fresh_database_url, settings, {0: 3, 1: 7})
    consumer = _TrimmedLogConsumer(settings.topic, {0: (10, 20), 1: (0, 20)})
    worker = _worker_on(settings, pool, consumer)

    # At assignment: partition 0's offsets 3..9 were deleted unread.
    await worker.on_assigned([0, 1])
    assert sorted(consumer.seeks) == [(0, 10), (1, 7)]
    assert await stored_offsets(fresh_database_url, settings) == {0: 10, 1: 7}
    assert _count(worker.registry, "omnilog_offset_out_of_range_total", kind="before_start") == 1
    assert _count(worker.registry, "omnilog_offsets_lost_total") == 7
    assert worker.exit_code == 0 and worker._buffer.positions == {0: 10, 1: 7}

    # While consuming: retention moves partition 0's start past the fetch position again.
    consumer.seeks.clear()
    consumer.bounds[0] = (15, 30)
    consumer.fetch_errors.append(OffsetOutOfRangeError({TopicPartition(settings.topic, 0): 10}))
    assert await worker._fetch(consumer) == {}
    assert sorted(consumer.seeks) == [(0, 15), (1, 7)]
    assert await stored_offsets(fresh_database_url, settings) == {0: 15, 1: 7}
    assert _count(worker.registry, "omnilog_offset_out_of_range_total", kind="before_start") == 2
    assert _count(worker.registry, "omnilog_offsets_lost_total") == 12
    assert not worker._stop.is_set()


async def test_fail_policy_before_the_start_stops_without_a_seek(fresh_database_url, make_settings, pool):
    settings = make_settings(database_url=fresh_database_url, offset_out_of_range="fail")
    await _store_offsets(fresh_database_url, settings, {0: 3})
    consumer = _TrimmedLogConsumer(settings.topic, {0: (10, 20)})
    worker = _worker_on(settings, pool, consumer)
    await worker.on_assigned([0])
    assert consumer.seeks == []
    assert await stored_offsets(fresh_database_url, settings) == {0: 3}
    assert worker.exit_code == 1 and worker._stop.is_set()
    ready, reason = worker._readiness()
    assert not ready and "offset_out_of_range" in reason
    assert _count(worker.registry, "omnilog_fatal_errors_total", operation="offset_out_of_range") == 1
    assert _count(worker.registry, "omnilog_offsets_lost_total") == 0


async def test_a_move_raced_by_another_writer_resumes_from_what_is_stored(
    fresh_database_url, make_settings, pool
):
    """The guard read 3; before its move, a batch (or the partition's new owner) stored 12. The
    compare-and-set fails, nothing is overwritten, no loss is counted, and 12 is where to resume."""
    settings = make_settings(database_url=fresh_database_url)
    await _store_offsets(fresh_database_url, settings, {0: 12})
    consumer = _TrimmedLogConsumer(settings.topic, {0: (10, 20)})
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    guard = OffsetGuard(
        "earliest", settings.topic, settings.consumer_group, metrics, RetryPolicy(metrics, 0.1)
    )
    assert await guard.fit(consumer, pool, {0: 3}) == {0: 12}
    assert await stored_offsets(fresh_database_url, settings) == {0: 12}
    assert _count(registry, "omnilog_offset_out_of_range_total", kind="before_start") == 1
    assert _count(registry, "omnilog_offsets_lost_total") == 0
