"""Contract tests of the flush against fakes that fail, block, fence and time out.

Fast and deterministic: an injected clock for backoff and upload age, in-memory stores that record
every call in one ordered log, and assertions on exactly what was committed. A broken fence (a
commit whose ranges do not chain from the stored offsets) or a broken commit order (dead letters
or uploads after the transaction, the Kafka commit before it) fails here in seconds.
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
import pytest
from prometheus_client import CollectorRegistry

from pipeline.contract import ValidationPolicy
from pipeline.metrics import WorkerMetrics
from pipeline.processing import flush as flush_module
from pipeline.processing.batch import Batch, BatchBuffer, BatchLimits
from pipeline.processing.dead_letters import DeadLetter, DeadLetterLimit
from pipeline.processing.flush import FlushContext, flush
from pipeline.processing.offsets import Fenced, HorizonMoved, PartitionRange
from pipeline.processing.retry import ErrorKind, PermanentError, RetryPolicy
from pipeline.processing.store import BatchOutcome, IndexedEvent, ObjectRecord

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)


def _pg_error(sqlstate: str) -> Exception:
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
    failures: list[Exception] = field(default_factory=list)  # raised by the next commits, in order
    refuse: set[str] = field(default_factory=set)  # event ids whose rows raise a check violation
    broken: Exception | None = None  # raised by every commit, even an empty one
    block: asyncio.Event | None = None

    async def load_horizon(self) -> date | None:
        return self.horizon

    async def commit(
        self,
        ranges: Sequence[PartitionRange],
        indexed: Sequence[IndexedEvent],
        objects: Sequence[ObjectRecord],
        *,
        check_horizon: bool = True,
        rollback: bool = False,
    ) -> BatchOutcome:
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
            raise _pg_error("23514")
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

    def bucket_for(self, organization_id: str) -> str:
        return self.bucket

    async def put(self, key: str, body: bytes, *, bucket: str | None = None) -> None:
        assert bucket in (None, self.bucket)
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


def _harness(offsets: dict[int, int]) -> Harness:
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


def _event(started: datetime = NOW - timedelta(minutes=5), **changes: Any) -> bytes:
    event = {
        "event_id": str(uuid.uuid4()),
        "organization_id": "00000000-0000-0000-0000-000000000001",
        "started_at": started.isoformat(),
        "duration_ms": 5,
        **changes,
    }
    return orjson.dumps(event)


def _batch(offsets: dict[int, int], values: dict[int, list[bytes | None]]) -> Batch:
    buffer = BatchBuffer(BatchLimits(10_000, 10**9, 60.0))
    buffer.assign(offsets)
    for partition, partition_values in values.items():
        start = offsets[partition]
        buffer.add(partition, [Record(start + i, v) for i, v in enumerate(partition_values)])
    return buffer.take()


def _ids(values: list[bytes | None]) -> set[str]:
    decoded = [orjson.loads(v) for v in values if v is not None]
    return {d["event_id"] for d in decoded if isinstance(d, dict)}


async def test_a_batch_lands_every_offset_in_exactly_one_place_in_order() -> None:
    h = _harness({0: 10, 1: 0})
    good0 = [_event() for _ in range(5)]
    good1 = [_event() for _ in range(3)]
    batch = _batch({0: 10, 1: 0}, {0: [*good0[:2], b"{oops", *good0[2:]], 1: [None, *good1]})

    report = await flush(h.ctx, batch)

    assert set(h.index.rows) == _ids(good0 + good1)
    assert h.index.offsets == {0: 16, 1: 4}
    assert sorted((m.message.partition, m.message.offset, m.reason) for m in h.letters.sent) == [
        (0, 12, "not_json"),
        (1, 0, "not_json"),
    ]
    names = h.log.names()
    # dead letters and every upload before the one commit; the Kafka commit last
    assert names[0] == "dead_letters" and names[-2:] == ["commit", "kafka"]
    assert set(names[1:-2]) == {"put"}
    assert all(i.object_uri.startswith("s3://logs/org/") for i in h.index.rows.values())
    assert {r.object_uri for r in h.index.ledger} == {i.object_uri for i in h.index.rows.values()}
    assert len(report.outcome.new_events) == 8 and report.invalid == 2


async def test_a_fenced_batch_writes_nothing_and_counts_its_orphans() -> None:
    h = _harness({0: 10})
    batch = _batch({0: 10}, {0: [_event(), _event()]})
    h.index.offsets[0] = 12  # another owner committed this range meanwhile

    with pytest.raises(Fenced) as fenced:
        await flush(h.ctx, batch)

    assert fenced.value.partitions == [0]
    assert h.index.rows == {} and h.index.offsets == {0: 12}
    assert "commit" not in h.log.names() and "kafka" not in h.log.names()
    assert h.metric("omnilog_orphaned_uploads_total") == 1


async def test_unavailable_dependencies_are_retried_until_they_answer() -> None:
    h = _harness({0: 0})
    values = [_event() for _ in range(4)] + [b"[]"]
    h.objects.failures = [ConnectionResetError(), TimeoutError()]
    h.letters.failures = [ConnectionRefusedError()]
    h.index.failures = [_pg_error("08006"), _pg_error("40001"), _pg_error("57P01")]

    await flush(h.ctx, _batch({0: 0}, {0: values}))

    assert set(h.index.rows) == _ids(values) and h.index.offsets == {0: 5}
    assert h.log.names().count("commit") == 1
    assert h.metric("omnilog_retry_attempts_total", operation="upload") == 2
    assert h.metric("omnilog_retry_attempts_total", operation="dlq") == 1
    assert h.metric("omnilog_retry_attempts_total", operation="postgres") == 3
    assert h.metric("omnilog_retrying_since_timestamp_seconds", operation="postgres") == 0
    assert len(h.clock.slept) == 6


async def test_a_row_postgres_refuses_is_dead_lettered_and_the_rest_committed() -> None:
    h = _harness({0: 0})
    values = [_event() for _ in range(50)]
    bad = orjson.loads(values[31])["event_id"]
    h.index.refuse = {bad}

    report = await flush(h.ctx, _batch({0: 0}, {0: values}))

    assert set(h.index.rows) == _ids(values) - {bad}
    assert h.index.offsets == {0: 50}
    assert [(m.message.offset, m.reason) for m in h.letters.sent] == [(31, "rejected_by_database")]
    assert [m.reason for m in report.letters] == ["rejected_by_database"]
    names = h.log.names()
    assert names.index("dead_letters") < names.index("commit")  # the letter before the commit
    assert names.count("probe") < 2 * 7  # bisection: O(log n) probes


async def test_a_data_error_no_message_explains_is_permanent() -> None:
    h = _harness({0: 0})
    h.index.broken = _pg_error("22003")  # even the empty batch fails: a schema problem

    with pytest.raises(PermanentError) as raised:
        await flush(h.ctx, _batch({0: 0}, {0: [_event(), _event()]}))

    assert raised.value.kind is ErrorKind.DATA
    assert h.index.rows == {} and h.index.offsets == {0: 0} and h.letters.sent == []


async def test_a_fatal_error_is_raised_at_once_without_retrying() -> None:
    h = _harness({0: 0})
    h.index.failures = [_pg_error("42P01")]  # undefined table

    with pytest.raises(PermanentError) as raised:
        await flush(h.ctx, _batch({0: 0}, {0: [_event()]}))

    assert raised.value.kind is ErrorKind.FATAL and raised.value.operation == "postgres"
    assert h.clock.slept == [] and h.index.offsets == {0: 0}


async def test_events_the_horizon_passed_during_the_flush_are_expired() -> None:
    h = _harness({0: 0})
    old = [_event(started=NOW - timedelta(days=20)) for _ in range(3)]
    fresh = [_event() for _ in range(3)]
    h.index.locked_horizon = (NOW - timedelta(days=10)).date()  # maintain moved it after the early read

    await flush(h.ctx, _batch({0: 0}, {0: [*old, *fresh]}))

    assert set(h.index.rows) == _ids(fresh) and h.index.offsets == {0: 6}
    assert sorted((m.message.offset, m.reason) for m in h.letters.sent) == [
        (0, "expired"),
        (1, "expired"),
        (2, "expired"),
    ]


async def test_uploads_held_too_long_are_renewed_before_the_commit() -> None:
    h = _harness({0: 0})
    values = [_event() for _ in range(3)]

    async def long_outage() -> None:
        h.clock.now += flush_module.REUPLOAD_AFTER_S + 1  # the database was away for over an hour

    h.index.failures = [_pg_error("08006")]
    h.ctx.retry.sleep = lambda seconds: long_outage()

    await flush(h.ctx, _batch({0: 0}, {0: values}))

    puts = [key for name, key in h.log.calls if name == "put"]
    assert len(puts) == 2 and puts[0] != puts[1]  # the same object again, under a fresh key
    assert {i.object_uri for i in h.index.rows.values()} == {f"s3://logs/{puts[1]}"}
    assert h.metric("omnilog_orphaned_uploads_total") == 1


async def test_a_cancelled_flush_commits_nothing() -> None:
    h = _harness({0: 0})
    h.index.block = asyncio.Event()
    task = asyncio.create_task(flush(h.ctx, _batch({0: 0}, {0: [_event()]})))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert h.index.rows == {} and h.index.offsets == {0: 0} and "kafka" not in h.log.names()
    assert h.metric("omnilog_orphaned_uploads_total") == 1


async def test_replaying_a_batch_after_a_crash_gives_the_same_verdicts() -> None:
    """Validation depends on the message and its record timestamp, never on when it is read."""
    h = _harness({0: 0})
    stamp = NOW_MS - 30 * 86_400_000
    values = [_event(started=NOW - timedelta(days=100)), _event(started=NOW - timedelta(days=130))]
    for later in (NOW, NOW + timedelta(days=60)):
        buffer = BatchBuffer(BatchLimits(100, 10**9, 60.0))
        buffer.assign({0: 0})
        buffer.add(0, [Record(i, v, timestamp=stamp) for i, v in enumerate(values)])
        decoded = flush_module.decode(buffer.take().messages, h.ctx.policy, later, None)
        assert [(m.message.offset, m.reason) for m in decoded.letters] == [(1, "out_of_range_time")]
        assert len(decoded.valid) == 1
