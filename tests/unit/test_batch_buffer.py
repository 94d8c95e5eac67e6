from dataclasses import dataclass

import pytest

from pipeline.processing.batch import BatchBuffer, BatchLimits
from pipeline.processing.dead_letters import DeadLetterLimit, DeadLetterLimitExceeded


@dataclass
class Record:
    offset: int
    value: bytes | None
    key: bytes | None = None
    timestamp: int = -1


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _buffer(max_events: int = 10, max_bytes: int = 1000, max_age_s: float = 2.0) -> tuple[BatchBuffer, Clock]:
    clock = Clock()
    return BatchBuffer(BatchLimits(max_events, max_bytes, max_age_s), clock=clock), clock


def test_ranges_chain_from_the_stored_offset() -> None:
    buf, _ = _buffer()
    buf.assign({0: 5, 1: 0})
    buf.add(0, [Record(5, b"a"), Record(6, b"b")])
    buf.add(1, [Record(0, b"c")])
    first = buf.take()
    assert [(r.partition, r.start, r.end) for r in first.ranges] == [(0, 5, 7), (1, 0, 1)]
    buf.add(0, [Record(9, b"d")])  # a gap (compaction, markers) still chains from 7
    second = buf.take()
    assert [(r.partition, r.start, r.end) for r in second.ranges] == [(0, 7, 10)]


def test_stale_and_unowned_records_are_dropped() -> None:
    buf, _ = _buffer()
    buf.assign({0: 5})
    assert buf.add(0, [Record(3, b"old"), Record(5, b"new")]) == 1
    assert buf.add(0, [Record(5, b"again")]) == 0
    assert buf.add(7, [Record(0, b"not ours")]) == 0
    assert len(buf) == 1


def test_due_on_count_bytes_and_age_even_without_new_records() -> None:
    buf, clock = _buffer(max_events=3, max_bytes=10, max_age_s=2.0)
    buf.assign({0: 0})
    assert not buf.due()
    buf.add(0, [Record(0, b"ab")])
    assert not buf.due()
    clock.now += 2.0
    assert buf.due()  # a quiet partition still flushes on time
    buf.take()
    buf.add(0, [Record(1, b"x" * 10)])
    assert buf.due() and buf.full()  # encoded bytes bound
    buf.take()
    buf.add(0, [Record(2, b""), Record(3, b""), Record(4, None)])
    assert buf.full()


def test_revoke_drops_only_that_partition() -> None:
    buf, _ = _buffer()
    buf.assign({0: 0, 1: 0})
    buf.add(0, [Record(0, b"aa")])
    buf.add(1, [Record(0, b"bbb")])
    buf.revoke([1])
    assert len(buf) == 1 and buf.size_bytes == 2
    assert buf.add(1, [Record(1, b"late")]) == 0
    assert [r.partition for r in buf.take().ranges] == [0]


def test_reset_restarts_at_given_offsets() -> None:
    buf, _ = _buffer()
    buf.assign({0: 0})
    buf.add(0, [Record(0, b"a"), Record(1, b"b")])
    buf.take()
    buf.add(0, [Record(2, b"c")])
    buf.reset({0: 0})
    assert len(buf) == 0
    assert buf.add(0, [Record(0, b"a")]) == 1


def test_dead_letter_limit_trips_on_ratio_over_window() -> None:
    limit = DeadLetterLimit(max_ratio=0.5, window=100)
    limit.check(50, 50)  # fewer than the window seen: never trips
    limit.check(40, 0)
    with pytest.raises(DeadLetterLimitExceeded, match="OMNILOG_DLQ_MAX_RATIO"):
        limit.check(60, 60)


def test_dead_letter_limit_forgets_old_batches() -> None:
    limit = DeadLetterLimit(max_ratio=0.5, window=100)
    limit.check(100, 45)
    for _ in range(10):
        limit.check(100, 10)
    limit.check(100, 49)
