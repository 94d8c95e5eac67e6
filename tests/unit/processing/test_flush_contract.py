"""Contract tests of the flush against fakes that fail, block, fence and time out.

Fast and deterministic: an injected clock for backoff and upload age, in-memory stores that record
every call in one ordered log, and assertions on exactly what was committed. A broken fence (a
commit whose ranges do not chain from the stored offsets) or a broken commit order (dead letters
or uploads after the transaction, the Kafka commit before it) fails here in seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta

import orjson
import pytest

from pipeline.processing import flush as flush_module
from pipeline.processing.batch import Batch, BatchBuffer, BatchLimits
from pipeline.processing.dead_letters import DeadLetterLimit, DeadLetterLimitExceeded
from pipeline.processing.flush import flush
from pipeline.processing.flush_pipeline import FlushPipeline, InFlight
from pipeline.processing.offsets import Fenced
from pipeline.processing.retry import ErrorKind, PermanentError
from tests.unit.processing.fakes import (
    NOW,
    NOW_MS,
    Harness,
    Record,
    event,
    harness,
    ids,
    make_batch,
    pg_error,
)


async def test_a_batch_lands_every_offset_in_exactly_one_place_in_order() -> None:
    h = harness({0: 10, 1: 0})
    good0 = [event() for _ in range(5)]
    good1 = [event() for _ in range(3)]
    batch = make_batch({0: 10, 1: 0}, {0: [*good0[:2], b"{oops", *good0[2:]], 1: [None, *good1]})

    report = await flush(h.ctx, batch)

    assert set(h.index.rows) == ids(good0 + good1)
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
    h = harness({0: 10})
    batch = make_batch({0: 10}, {0: [event(), event()]})
    h.index.offsets[0] = 12  # another owner committed this range meanwhile

    with pytest.raises(Fenced) as fenced:
        await flush(h.ctx, batch)

    assert fenced.value.partitions == [0]
    assert h.index.rows == {} and h.index.offsets == {0: 12}
    assert "commit" not in h.log.names() and "kafka" not in h.log.names()
    assert h.metric("omnilog_orphaned_uploads_total") == 1


async def test_unavailable_dependencies_are_retried_until_they_answer() -> None:
    h = harness({0: 0})
    values = [event() for _ in range(4)] + [b"[]"]
    h.objects.failures = [ConnectionResetError(), TimeoutError()]
    h.letters.failures = [ConnectionRefusedError()]
    h.index.failures = [pg_error("08006"), pg_error("40001"), pg_error("57P01")]

    await flush(h.ctx, make_batch({0: 0}, {0: values}))

    assert set(h.index.rows) == ids(values) and h.index.offsets == {0: 5}
    assert h.log.names().count("commit") == 1
    assert h.metric("omnilog_retry_attempts_total", operation="upload") == 2
    assert h.metric("omnilog_retry_attempts_total", operation="dlq") == 1
    assert h.metric("omnilog_retry_attempts_total", operation="postgres") == 3
    assert h.metric("omnilog_retrying_since_timestamp_seconds", operation="postgres") == 0
    assert len(h.clock.slept) == 6


async def test_a_row_postgres_refuses_is_dead_lettered_and_the_rest_committed() -> None:
    h = harness({0: 0})
    values = [event() for _ in range(50)]
    bad = orjson.loads(values[31])["event_id"]
    h.index.refuse = {bad}

    report = await flush(h.ctx, make_batch({0: 0}, {0: values}))

    assert set(h.index.rows) == ids(values) - {bad}
    assert h.index.offsets == {0: 50}
    assert [(m.message.offset, m.reason) for m in h.letters.sent] == [(31, "rejected_by_database")]
    assert h.letters.sent[0].message.value == values[31]  # read back from the object: as received
    assert [m.reason for m in report.letters] == ["rejected_by_database"]
    names = h.log.names()
    assert names.index("dead_letters") < names.index("commit")  # the letter before the commit
    assert names.count("probe") < 2 * 7  # bisection: O(log n) probes


async def test_a_data_error_no_message_explains_is_permanent() -> None:
    h = harness({0: 0})
    h.index.broken = pg_error("22003")  # even the empty batch fails: a schema problem

    with pytest.raises(PermanentError) as raised:
        await flush(h.ctx, make_batch({0: 0}, {0: [event(), event()]}))

    assert raised.value.kind is ErrorKind.DATA
    assert h.index.rows == {} and h.index.offsets == {0: 0} and h.letters.sent == []


async def test_a_fatal_error_is_raised_at_once_without_retrying() -> None:
    h = harness({0: 0})
    h.index.failures = [pg_error("42P01")]  # undefined table

    with pytest.raises(PermanentError) as raised:
        await flush(h.ctx, make_batch({0: 0}, {0: [event()]}))

    assert raised.value.kind is ErrorKind.FATAL and raised.value.operation == "postgres"
    assert h.clock.slept == [] and h.index.offsets == {0: 0}


async def test_events_the_horizon_passed_during_the_flush_are_expired() -> None:
    h = harness({0: 0})
    old = [event(started=NOW - timedelta(days=20)) for _ in range(3)]
    fresh = [event() for _ in range(3)]
    h.index.locked_horizon = (NOW - timedelta(days=10)).date()  # maintain moved it after the early read

    await flush(h.ctx, make_batch({0: 0}, {0: [*old, *fresh]}))

    assert set(h.index.rows) == ids(fresh) and h.index.offsets == {0: 6}
    assert sorted((m.message.offset, m.reason) for m in h.letters.sent) == [
        (0, "expired"),
        (1, "expired"),
        (2, "expired"),
    ]
    assert [m.message.value for m in sorted(h.letters.sent, key=lambda m: m.message.offset)] == old


async def test_a_prepared_batch_holds_its_values_only_in_its_objects() -> None:
    """Between encode and commit the raw values are let go (a batch in flight holds its gzip bodies);
    a dead letter found in the transaction still carries its message's value exactly as received,
    including a value with raw CR/LF whitespace (stored with spaces instead, so kept as it was)."""
    h = harness({0: 0})
    values = [event() for _ in range(4)]
    values[2] = values[2].replace(b"{", b"{\r\n", 1)
    refused = {orjson.loads(values[i])["event_id"] for i in (1, 2)}
    batch = make_batch({0: 0}, {0: list(values)})

    prepared = await flush_module.prepare(h.ctx, batch)

    assert [m.value for m in batch.messages] == [None, None, values[2], None]
    h.index.refuse = refused
    await flush_module.commit(h.ctx, prepared)
    assert sorted((m.message.offset, m.message.value) for m in h.letters.sent) == [
        (1, values[1]),
        (2, values[2]),
    ]
    assert set(h.index.rows) == ids([values[0], values[3]]) and h.index.offsets == {0: 4}


async def test_uploads_held_too_long_are_renewed_before_the_commit() -> None:
    h = harness({0: 0})
    values = [event() for _ in range(3)]

    async def long_outage() -> None:
        h.clock.now += flush_module.REUPLOAD_AFTER_S + 1  # the database was away for over an hour

    h.index.failures = [pg_error("08006")]
    h.ctx.retry.sleep = lambda seconds: long_outage()

    await flush(h.ctx, make_batch({0: 0}, {0: values}))

    puts = [key for name, key in h.log.calls if name == "put"]
    assert len(puts) == 2 and puts[0] != puts[1]  # the same object again, under a fresh key
    assert {i.object_uri for i in h.index.rows.values()} == {f"s3://logs/{puts[1]}"}
    assert h.metric("omnilog_orphaned_uploads_total") == 1


async def test_a_cancelled_flush_commits_nothing() -> None:
    h = harness({0: 0})
    h.index.block = asyncio.Event()
    task = asyncio.create_task(flush(h.ctx, make_batch({0: 0}, {0: [event()]})))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert h.index.rows == {} and h.index.offsets == {0: 0} and "kafka" not in h.log.names()
    assert h.metric("omnilog_orphaned_uploads_total") == 1


async def test_replaying_a_batch_after_a_crash_gives_the_same_verdicts() -> None:
    """Validation depends on the message and its record timestamp; when it is read matters only
    for an event older than the user sets the merger keeps (see the next test)."""
    h = harness({0: 0})
    stamp = NOW_MS - 30 * 86_400_000
    values = [event(started=NOW - timedelta(days=80)), event(started=NOW - timedelta(days=130))]
    for later in (NOW, NOW + timedelta(days=10)):
        buffer = BatchBuffer(BatchLimits(100, 10**9, 60.0))
        buffer.assign({0: 0})
        buffer.add(0, [Record(i, v, timestamp=stamp) for i, v in enumerate(values)])
        decoded = flush_module.decode(buffer.take().messages, h.ctx.policy, later, None)
        assert [(m.message.offset, m.reason) for m in decoded.letters] == [(1, "out_of_range_time")]
        assert len(decoded.valid) == 1


def test_an_event_older_than_the_user_sets_kept_is_dead_lettered_whatever_its_record() -> None:
    """A worker a month behind: the record's age would accept the event, but its windows' unique
    users are final (sinks/merger.py prunes their sets), so counting it could count a user twice."""
    h = harness({0: 0})
    old = make_batch({0: 0}, {0: [event(started=NOW - timedelta(days=100))]}).messages
    old[0].timestamp_ms = NOW_MS - 30 * 86_400_000
    decoded = flush_module.decode(old, h.ctx.policy, NOW, None)
    assert decoded.valid == [] and [m.reason for m in decoded.letters] == ["out_of_range_time"]
    assert "unique users" in decoded.letters[0].detail


# ---- the two halves, and pipelining: batch N+1 prepared while batch N commits -----------------


async def test_prepare_writes_nothing_the_offsets_depend_on_and_commit_makes_it_durable() -> None:
    h = harness({0: 0})
    good = [event(), event()]
    values: list[bytes | None] = [good[0], b"[]", good[1]]

    prepared = await flush_module.prepare(h.ctx, make_batch({0: 0}, {0: values}))

    assert h.log.names() == ["dead_letters", "put"] and h.index.begun == []
    report = await flush_module.commit(h.ctx, prepared)
    assert h.log.names()[2:] == ["commit", "kafka"]
    assert set(h.index.rows) == ids(good) and h.index.offsets == {0: 3} and report.invalid == 1


async def test_rows_that_cannot_be_built_ahead_are_left_to_the_transaction() -> None:
    h = harness({0: 0})
    h.index.prebuild_error = ValueError("a row builder's bug")
    good = [event(), event()]

    report = await flush_module.flush(h.ctx, make_batch({0: 0}, {0: list[bytes | None](good)}))

    assert set(h.index.rows) == ids(good) and h.index.offsets == {0: 2} and report.invalid == 0


async def test_a_discarded_batch_counts_its_uploads_as_orphans_and_commits_nothing() -> None:
    h = harness({0: 0})
    prepared = await flush_module.prepare(h.ctx, make_batch({0: 0}, {0: [event(), event()]}))

    flush_module.discard(h.ctx, prepared)

    assert h.metric("omnilog_orphaned_uploads_total") == 1
    assert h.index.begun == [] and h.index.offsets == {0: 0}


def _consecutive(sizes: tuple[int, int]) -> tuple[list[Batch], list[list[bytes | None]]]:
    """Two batches of partition 0 as the worker's buffer closes them: the second starts where the
    first ends."""
    buffer = BatchBuffer(BatchLimits(10_000, 10**9, 60.0))
    buffer.assign({0: 0})
    batches, values, offset = [], [], 0
    for size in sizes:
        batch_values: list[bytes | None] = [event() for _ in range(size)]
        buffer.add(0, [Record(offset + i, v) for i, v in enumerate(batch_values)])
        offset += size
        batches.append(buffer.take())
        values.append(batch_values)
    return batches, values


async def _until(condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


async def _second_prepared_while_first_commits(
    h: Harness,
) -> tuple[FlushPipeline, list[Batch], list[list[bytes | None]]]:
    """Batch N's transaction held open (h.index.block), batch N+1 started and uploaded meanwhile."""
    (first, second), values = _consecutive((3, 4))
    h.index.block = asyncio.Event()
    pipeline = FlushPipeline(h.ctx)
    pipeline.start(first)
    assert not pipeline.has_room()  # N is preparing: N+1 waits to be taken
    await _until(lambda: len(h.index.begun) == 1)  # N is in its transaction
    assert pipeline.has_room()
    pipeline.start(second)
    assert not pipeline.has_room()  # one committing, one preparing: the pipeline is full
    with pytest.raises(RuntimeError):
        pipeline.start(first)
    await _until(lambda: h.log.names().count("put") == 2)
    return pipeline, [first, second], values


async def test_the_next_batch_uploads_during_the_transaction_and_commits_after_it() -> None:
    h = harness({0: 0})
    pipeline, (first, second), values = await _second_prepared_while_first_commits(h)
    await asyncio.sleep(0.01)
    # N+1 uploaded while N's transaction is open, and did not ask for its own
    assert "commit" not in h.log.names() and len(h.index.begun) == 1
    assert pipeline.size_bytes == first.size_bytes + second.size_bytes

    asyncio.get_running_loop().call_later(0.02, h.index.block.set)  # type: ignore[union-attr]
    settled = await pipeline.settle(5.0)

    assert [f.batch for f in settled] == [first, second] and all(f.committed for f in settled)
    durable = [c for c in h.log.calls if c[0] in ("commit", "kafka")]
    assert durable == [
        ("commit", [(0, 0, 3)]),
        ("kafka", [(0, 3)]),
        ("commit", [(0, 3, 7)]),
        ("kafka", [(0, 7)]),
    ]
    # N+1's transaction was asked for only once N's had committed (and its Kafka commit was done)
    second_ranges, logged_before = h.index.begun[1]
    assert second_ranges == [(0, 3, 7)] and h.log.calls[logged_before - 1] == ("kafka", [(0, 3)])
    assert set(h.index.rows) == ids(values[0] + values[1]) and h.index.offsets == {0: 7}
    assert len(pipeline) == 0 and pipeline.has_room()


async def test_a_fenced_batch_takes_the_next_one_with_it() -> None:
    h = harness({0: 0})
    pipeline, (first, second), _ = await _second_prepared_while_first_commits(h)
    # Another owner committed N's range: N is fenced, and N+1's compare-and-set *would* succeed.
    h.index.offsets[0] = first.ranges[0].end
    h.index.block.set()  # type: ignore[union-attr]

    settled = await pipeline.settle(5.0)

    assert [f.batch for f in settled] == [first, second]
    assert isinstance(settled[0].task.exception(), Fenced)
    assert settled[1].failed and not settled[1].committed
    assert len(h.index.begun) == 1  # N+1 never asked for a transaction
    assert h.index.rows == {} and h.index.offsets == {0: 3} and "kafka" not in h.log.names()
    assert h.metric("omnilog_orphaned_uploads_total") == 2  # one object each, counted once


async def test_taking_a_failed_batch_discards_the_one_still_preparing() -> None:
    h = harness({0: 0})
    (first, second), _ = _consecutive((2, 2))
    h.index.block = asyncio.Event()
    h.objects.block = asyncio.Event()
    h.objects.block.set()
    pipeline = FlushPipeline(h.ctx)
    pipeline.start(first)
    await _until(lambda: len(h.index.begun) == 1)
    h.objects.block.clear()  # N+1's upload now hangs
    pipeline.start(second)
    h.index.failures = [pg_error("42P01")]  # N's transaction fails permanently
    h.index.block.set()
    taken: list[InFlight] = []
    while not taken:
        taken = await pipeline.take_finished()
        await asyncio.sleep(0.001)

    assert [f.batch for f in taken] == [first, second]
    assert isinstance(taken[0].task.exception(), PermanentError) and taken[1].task.cancelled()
    assert len(pipeline) == 0 and h.index.offsets == {0: 0} and len(h.index.begun) == 1


async def test_a_batch_failing_while_preparing_lets_the_one_before_commit() -> None:
    h = harness({0: 0})
    h.ctx.dlq_limit = DeadLetterLimit(0.5, 1)
    h.index.block = asyncio.Event()
    (first,), _ = _consecutive((3,))
    bad = make_batch({0: 3}, {0: [b"{oops"] * 3})  # every message invalid: the limit trips
    pipeline = FlushPipeline(h.ctx)
    pipeline.start(first)
    await _until(lambda: len(h.index.begun) == 1)
    pipeline.start(bad)
    await pipeline.wait(2.0)
    assert not pipeline.has_room()  # a failed batch must be taken before another starts
    h.index.block.set()

    settled = await pipeline.settle(5.0)

    assert settled[0].committed and isinstance(settled[1].task.exception(), DeadLetterLimitExceeded)
    assert h.index.offsets == {0: 3} and len(h.index.begun) == 1 and h.letters.sent == []


async def test_a_revoke_with_two_in_flight_abandons_both_within_its_budget() -> None:
    h = harness({0: 0})
    pipeline, batches, _ = await _second_prepared_while_first_commits(h)
    t0 = asyncio.get_running_loop().time()

    settled = await pipeline.settle(0.05)

    assert asyncio.get_running_loop().time() - t0 < 0.5
    assert [f.batch for f in settled] == batches and all(f.task.cancelled() for f in settled)
    assert h.index.rows == {} and h.index.offsets == {0: 0} and "kafka" not in h.log.names()
    assert h.metric("omnilog_orphaned_uploads_total") == 2
    assert len(pipeline) == 0 and pipeline.has_room()
