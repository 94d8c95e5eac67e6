"""The worker's poll loop with two flushes in flight, against a fake consumer and the flush fakes.

The loop, backpressure, reaping and revoke are the worker's own code; Kafka is a list of records per
partition and every store is a fake from tests/unit/processing/fakes.py (ordered side-effect log,
offset compare-and-set), so these run in well under a second.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from consumers.ingest.worker import IngestWorker
from pipeline.processing.flush_pipeline import FlushPipeline
from pipeline.settings import load_settings
from tests.unit.processing.fakes import Harness, Record, event, harness

TOPIC = "in"


@dataclass
class FakeConsumer:
    """What the poll loop asks of aiokafka: fetches that honour pause and seek, and a commit."""

    records: dict[int, list[Record]]
    position: dict[int, int] = field(default_factory=dict)
    paused_partitions: set[TopicPartition] = field(default_factory=set)
    was_paused_with_two_in_flight: bool = False

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(TOPIC, p) for p in self.records}

    def paused(self) -> set[TopicPartition]:
        return set(self.paused_partitions)

    def pause(self, *tps: TopicPartition) -> None:
        self.paused_partitions.update(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused_partitions.difference_update(tps)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.position[tp.partition] = offset

    def highwater(self, tp: TopicPartition) -> int:
        return len(self.records[tp.partition])

    def last_poll_timestamp(self, tp: TopicPartition) -> None:
        return None

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        return None

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, list[Record]]:
        fetched: dict[TopicPartition, list[Record]] = {}
        for partition, records in self.records.items():
            tp = TopicPartition(TOPIC, partition)
            start = self.position.get(partition, 0)
            if tp not in self.paused_partitions and start < len(records):
                fetched[tp] = records[start : start + max_records]
                self.position[partition] = start + len(fetched[tp])
        if not fetched:
            await asyncio.sleep(timeout_ms / 1000)
        return fetched


@dataclass
class Rig:
    worker: IngestWorker
    consumer: FakeConsumer
    h: Harness

    def metric(self, name: str) -> float:
        return self.worker.registry.get_sample_value(name) or 0.0

    @property
    def flushes(self) -> FlushPipeline:
        assert self.worker._flushes is not None
        return self.worker._flushes


def _rig(events: int, batch_events: int = 3, drain_s: float = 5.0) -> Rig:
    """One partition holding `events` records; batches of `batch_events`, closed only when full;
    transactions held until the test sets `h.index.block`."""
    h = harness({0: 0})
    h.index.block = asyncio.Event()  # every transaction waits until the test sets it
    overrides = {
        "OMNILOG_TOPIC": TOPIC,
        "OMNILOG_BATCH_MAX_EVENTS": batch_events,
        "OMNILOG_BATCH_MAX_AGE_S": 60.0,
        "OMNILOG_REBALANCE_DRAIN_S": drain_s,
    }
    settings = load_settings(None, **overrides)
    worker = IngestWorker(settings, registry=CollectorRegistry())
    consumer = FakeConsumer({0: [Record(i, event()) for i in range(events)]})
    worker._consumer = consumer  # type: ignore[assignment]
    worker._ctx = h.ctx
    worker._flushes = FlushPipeline(h.ctx)
    worker._buffer.assign({0: 0})

    async def stored_positions(partitions: list[int], create: bool) -> dict[int, int]:
        return {p: h.index.offsets[p] for p in partitions}

    worker._load_positions = stored_positions  # type: ignore[method-assign]
    return Rig(worker, consumer, h)


@contextmanager
def _polling(rig: Rig) -> Iterator[asyncio.Task[None]]:
    task = asyncio.create_task(rig.worker._poll_loop())
    try:
        yield task
    finally:
        rig.worker.request_stop()


async def _until(condition: Callable[[], Any], timeout_s: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


async def _two_in_flight(rig: Rig) -> None:
    """With the first batch's transaction held open (the rig's index.block), wait until the loop
    has uploaded the second batch and paused behind both."""
    await _until(lambda: len(rig.h.index.begun) == 1 and rig.h.log.names().count("put") == 2)
    await _until(rig.consumer.paused)  # a third batch is full behind them: backpressure


async def test_the_loop_prepares_the_next_batch_during_a_commit_and_commits_in_order() -> None:
    rig = _rig(events=9)
    with _polling(rig) as loop:
        await _two_in_flight(rig)
        # Both batches in flight and the full buffer count towards the in-flight bytes.
        held = sum(b.size_bytes for b in rig.flushes.batches) + rig.worker._buffer.size_bytes
        assert len(rig.flushes) == 2 and rig.metric("omnilog_inflight_bytes") == held
        assert "commit" not in rig.h.log.names()
        rig.h.index.block.set()
        await _until(lambda: rig.h.index.offsets == {0: 9})
        await _until(lambda: len(rig.flushes) == 0)
    await asyncio.wait_for(loop, 2.0)

    commits = [ranges for name, ranges in rig.h.log.calls if name == "commit"]
    assert commits == [[(0, 0, 3)], [(0, 3, 6)], [(0, 6, 9)]]
    assert [ranges for ranges, _ in rig.h.index.begun] == commits  # each asked for once, in order
    assert rig.metric("omnilog_events_indexed_total") == 9
    assert rig.worker._committed == {0: 9}


async def test_a_fetch_onto_a_part_filled_buffer_never_makes_a_batch_above_its_event_limit() -> None:
    rig = _rig(events=2)  # batches of 3: the first fetch leaves the buffer at 2, not due
    assert rig.h.index.block is not None
    rig.h.index.block.set()
    with _polling(rig) as loop:
        await _until(lambda: len(rig.worker._buffer) == 2)
        rig.consumer.records[0] += [Record(i, event()) for i in range(2, 9)]  # a backlog arrives
        await _until(lambda: rig.h.index.offsets == {0: 9})
    await asyncio.wait_for(loop, 2.0)

    commits = [ranges for name, ranges in rig.h.log.calls if name == "commit"]
    assert commits == [[(0, 0, 3)], [(0, 3, 6)], [(0, 6, 9)]]


async def test_a_fenced_batch_discards_the_next_and_the_worker_rereads_its_positions() -> None:
    rig = _rig(events=9)
    with _polling(rig) as loop:
        await _two_in_flight(rig)
        rig.h.index.offsets[0] = 3  # another owner committed the first batch's range meanwhile
        rig.h.index.block.set()  # type: ignore[union-attr]
        await _until(lambda: rig.h.index.offsets == {0: 9} and len(rig.flushes) == 0)
    await asyncio.wait_for(loop, 2.0)

    # The discarded second batch (0, 3, 6) never asked for a transaction: the one that committed
    # [3, 6) is the batch re-read from the stored offset after the fence.
    assert [ranges for ranges, _ in rig.h.index.begun] == [[(0, 0, 3)], [(0, 3, 6)], [(0, 6, 9)]]
    assert rig.metric("omnilog_fenced_batches_total") == 1
    assert rig.metric("omnilog_events_indexed_total") == 6
    assert rig.h.metric("omnilog_orphaned_uploads_total") == 2  # the fenced batch's and the next's


async def test_a_revoke_with_two_in_flight_abandons_both_within_the_drain_budget() -> None:
    rig = _rig(events=9, drain_s=0.1)
    with _polling(rig) as loop:
        await _two_in_flight(rig)
    await asyncio.wait_for(loop, 2.0)  # (aiokafka calls on_revoked while the loop is in getmany)
    t0 = asyncio.get_running_loop().time()

    await rig.worker.on_revoked([0])

    assert asyncio.get_running_loop().time() - t0 < 1.0
    assert len(rig.flushes) == 0 and len(rig.worker._buffer) == 0 and rig.worker._buffer.positions == {}
    assert "commit" not in rig.h.log.names() and rig.h.index.offsets == {0: 0}
    assert rig.h.metric("omnilog_orphaned_uploads_total") == 2
    assert rig.metric("omnilog_fenced_batches_total") == 0


async def test_a_revoke_finishes_both_in_order_when_they_commit_within_the_budget() -> None:
    rig = _rig(events=9, drain_s=5.0)
    with _polling(rig) as loop:
        await _two_in_flight(rig)
    await asyncio.wait_for(loop, 2.0)
    asyncio.get_running_loop().call_later(0.05, rig.h.index.block.set)  # type: ignore[union-attr]

    await rig.worker.on_revoked([0])

    commits = [ranges for name, ranges in rig.h.log.calls if name == "commit"]
    assert commits == [[(0, 0, 3)], [(0, 3, 6)]] and rig.h.index.offsets == {0: 6}
    assert rig.metric("omnilog_events_indexed_total") == 6
    assert len(rig.worker._buffer) == 0  # the third batch, never started, is the next owner's
