"""In-memory fakes of everything a flush touches, for the flush and pipeline contract tests.

They record every side effect in one ordered log, take an injected clock for backoff and upload
age, and check the offset compare-and-set like PostgreSQL does, so a commit out of order fails.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import orjson
from prometheus_client import CollectorRegistry

from pipeline.contract import ValidationPolicy
from pipeline.metrics import WorkerMetrics
from pipeline.processing.batch import Batch, BatchBuffer, BatchLimits
from pipeline.processing.dead_letters import DeadLetter, DeadLetterLimit
from pipeline.processing.flush import FlushContext
from pipeline.processing.offsets import Fenced, HorizonMoved, PartitionRange
from pipeline.processing.retry import RetryPolicy
from pipeline.processing.store import BatchOutcome, IndexedEvent, ObjectRecord

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)


def pg_error(sqlstate: str) -> Exception:
    cls = asyncpg.PostgresError.get_message_class_for_sqlstate(sqlstate)  # type: ignore[attr-defined]
    error: Exception = cls(f"sqlstate {sqlstate}")
    return error


@dataclass
class Log:
    """Every side effect, in order: what the tests check the commit order against."""

    calls: list[tuple[str, Any]] = field(default_factory=list)

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


@dataclass
class FakeIndex:
    log: Log
    offsets: dict[int, int]  # the stored next_offset per partition
    rows: dict[str, IndexedEvent] = field(default_factory=dict)
    ledger: list[ObjectRecord] = field(default_factory=list)
    horizon: date | None = None
    locked_horizon: date | None = None  # what the transaction sees, when maintain moved it meanwhile
    prebuild_error: Exception | None = None  # raised by building the rows ahead
    failures: list[Exception] = field(default_factory=list)  # raised by the next commits, in order
    refuse: set[str] = field(default_factory=set)  # event ids whose rows raise a check violation
    broken: Exception | None = None  # raised by every commit, even an empty one
    block: asyncio.Event | None = None
    # Each transaction as it is asked for: its ranges, and how many side effects were logged before.
    begun: list[tuple[list[tuple[int, int, int]], int]] = field(default_factory=list)

    async def load_horizon(self) -> date | None:
        return self.horizon

    def prebuild(self, ranges: Sequence[PartitionRange], indexed: Sequence[IndexedEvent]) -> object:
        if self.prebuild_error is not None:
            raise self.prebuild_error
        return [i.event.event_id for i in indexed]

    async def commit(
        self,
        ranges: Sequence[PartitionRange],
        indexed: Sequence[IndexedEvent],
        objects: Sequence[ObjectRecord],
        *,
        check_horizon: bool = True,
        rollback: bool = False,
        prebuilt: object = None,
    ) -> BatchOutcome:
        if not rollback:
            self.begun.append(([(r.partition, r.start, r.end) for r in ranges], len(self.log.calls)))
        if self.block is not None:
            await self.block.wait()
        if self.failures:
            raise self.failures.pop(0)
        if self.broken is not None:
            raise self.broken
        moved = [r.partition for r in ranges if self.offsets.get(r.partition) != r.start]
        if moved:
            raise Fenced(moved)
        horizon = self.locked_horizon or self.horizon
        if (
            check_horizon
            and horizon is not None
            and any(i.event.started_at.date() < horizon for i in indexed)
        ):
            raise HorizonMoved(horizon)
        if any(i.event.event_id in self.refuse for i in indexed):
            raise pg_error("23514")
        new = [i for i in indexed if i.event.event_id not in self.rows]
        outcome = BatchOutcome([i.event for i in new], len(indexed) - len(new), NOW)
        if rollback:
            self.log.calls.append(("probe", len(indexed)))
            return outcome
        for r in ranges:
            self.offsets[r.partition] = r.end
        self.rows.update({i.event.event_id: i for i in new})
        self.ledger.extend(objects)
        self.log.calls.append(("commit", [(r.partition, r.start, r.end) for r in ranges]))
        return outcome


@dataclass
class FakeObjects:
    log: Log
    bucket: str = "logs"
    stored: dict[str, bytes] = field(default_factory=dict)
    failures: list[Exception] = field(default_factory=list)
    block: asyncio.Event | None = None  # a put waits until it is set

    def bucket_for(self, organization_id: str) -> str:
        return self.bucket

    async def put(self, key: str, body: bytes, *, bucket: str | None = None) -> None:
        assert bucket in (None, self.bucket)
        if self.block is not None:
            await self.block.wait()
        if self.failures:
            raise self.failures.pop(0)
        self.stored[key] = body
        self.log.calls.append(("put", key))


@dataclass
class FakePrepared:
    sink: FakeDeadLetters
    letters: Sequence[DeadLetter]
    offloads: int = 0

    async def offload(self) -> None:
        return None

    async def send(self) -> None:
        if self.sink.failures:
            raise self.sink.failures.pop(0)
        self.sink.sent.extend(self.letters)
        self.sink.log.calls.append(("dead_letters", [(m.message.offset, m.reason) for m in self.letters]))


@dataclass
class FakeDeadLetters:
    log: Log
    sent: list[DeadLetter] = field(default_factory=list)
    failures: list[Exception] = field(default_factory=list)

    def prepare(self, letters: Sequence[DeadLetter]) -> FakePrepared:
        return FakePrepared(self, letters)


@dataclass
class Clock:
    now: float = 1000.0
    slept: list[float] = field(default_factory=list)

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@dataclass
class Harness:
    ctx: FlushContext
    index: FakeIndex
    objects: FakeObjects
    letters: FakeDeadLetters
    log: Log
    clock: Clock
    registry: CollectorRegistry

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels or None) or 0.0


def harness(offsets: dict[int, int]) -> Harness:
    log, clock, registry = Log(), Clock(), CollectorRegistry()
    metrics = WorkerMetrics(registry)
    index, objects, letters = FakeIndex(log, dict(offsets)), FakeObjects(log), FakeDeadLetters(log)

    async def commit_kafka(batch: Batch) -> None:
        log.calls.append(("kafka", [(r.partition, r.end) for r in batch.ranges]))

    ctx = FlushContext(
        topic="in",
        index=index,
        objects=objects,
        dead_letters=letters,
        metrics=metrics,
        policy=ValidationPolicy(max_age=timedelta(days=90), max_future_skew=timedelta(hours=1)),
        member_bytes=4096,
        gzip_level=1,
        retry=RetryPolicy(metrics, 5.0, clock=lambda: clock.now, sleep=clock.sleep),
        dlq_limit=DeadLetterLimit(0.9, 10_000),
        commit_kafka=commit_kafka,
        clock=lambda: NOW,
        monotonic=clock.monotonic,
    )
    return Harness(ctx, index, objects, letters, log, clock, registry)


@dataclass
class Record:
    offset: int
    value: bytes | None
    key: bytes | None = None
    timestamp: int = NOW_MS


def event(started: datetime = NOW - timedelta(minutes=5), **changes: Any) -> bytes:
    fields = {
        "event_id": str(uuid.uuid4()),
        "organization_id": "00000000-0000-0000-0000-000000000001",
        "started_at": started.isoformat(),
        "duration_ms": 5,
        **changes,
    }
    return orjson.dumps(fields)


def make_batch(offsets: dict[int, int], values: dict[int, list[bytes | None]]) -> Batch:
    buffer = BatchBuffer(BatchLimits(10_000, 10**9, 60.0))
    buffer.assign(offsets)
    for partition, partition_values in values.items():
        start = offsets[partition]
        buffer.add(partition, [Record(start + i, v) for i, v in enumerate(partition_values)])
    return buffer.take()


def ids(values: list[bytes | None]) -> set[str]:
    decoded = [orjson.loads(v) for v in values if v is not None]
    return {d["event_id"] for d in decoded if isinstance(d, dict)}
