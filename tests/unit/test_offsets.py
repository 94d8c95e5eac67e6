"""Stored offsets outside their partition's log: the decision, the setting, and the guard's
detection logic without servers (the moves themselves are tested on Postgres in
tests/integration/test_offsets.py)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from consumers.ingest.offset_guard import (
    Action,
    Decision,
    OffsetGuard,
    OffsetsOutOfRange,
    OutOfRange,
    Policy,
    reconcile,
)
from pipeline.metrics import WorkerMetrics
from pipeline.processing.retry import PermanentError, RetryPolicy
from pipeline.settings import ConfigError, load_settings

TOPIC = "t"
BIG = 2**63 - 1  # Kafka offsets are int64


@pytest.mark.parametrize("policy", ["earliest", "fail"])
@pytest.mark.parametrize(
    ("stored", "start", "end"),
    [
        (0, 0, 0),  # empty log, never read
        (5, 5, 5),  # everything before 5 deleted, all read
        (5, 5, 9),  # at the log start
        (7, 5, 9),  # inside
        (9, 5, 9),  # caught up: the next offset to be written
        (BIG, 0, BIG),
    ],
)
def test_an_offset_inside_the_log_is_kept(stored: int, start: int, end: int, policy: Policy) -> None:
    assert reconcile(stored, start, end, policy) == Decision(Action.KEEP, stored)


def test_before_the_start_resumes_at_the_first_record_left_and_counts_the_gap() -> None:
    assert reconcile(3, 10, 20, "earliest") == Decision(Action.MOVE, 10, OutOfRange.BEFORE_START, lost=7)
    assert reconcile(0, BIG - 1, BIG, "earliest").lost == BIG - 1


def test_past_the_end_re_reads_the_log_from_its_start() -> None:
    # A re-created topic: the records now there were never read under these offsets.
    assert reconcile(500, 0, 40, "earliest") == Decision(Action.MOVE, 0, OutOfRange.PAST_END)
    # ... and if retention already trimmed the new log, from the first record still there.
    assert reconcile(500, 12, 40, "earliest") == Decision(Action.MOVE, 12, OutOfRange.PAST_END)
    assert reconcile(BIG, 0, 0, "earliest") == Decision(Action.MOVE, 0, OutOfRange.PAST_END)


def test_the_fail_policy_moves_nothing() -> None:
    assert reconcile(3, 10, 20, "fail") == Decision(Action.FAIL, 3, OutOfRange.BEFORE_START, lost=7)
    assert reconcile(500, 0, 40, "fail") == Decision(Action.FAIL, 500, OutOfRange.PAST_END)


@pytest.mark.parametrize(("stored", "start", "end"), [(0, 5, 4), (0, -1, 4), (-1, 0, 4)])
def test_inconsistent_bounds_or_offsets_are_refused(stored: int, start: int, end: int) -> None:
    with pytest.raises(ValueError):
        reconcile(stored, start, end, "earliest")


def test_the_setting_defaults_to_earliest_and_accepts_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMNILOG_OFFSET_OUT_OF_RANGE", raising=False)
    assert load_settings().offset_out_of_range == "earliest"
    monkeypatch.setenv("OMNILOG_OFFSET_OUT_OF_RANGE", "fail")
    assert load_settings().offset_out_of_range == "fail"


def test_an_unknown_policy_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMNILOG_OFFSET_OUT_OF_RANGE", "latest")  # would skip records: not offered
    with pytest.raises(ConfigError, match="OMNILOG_OFFSET_OUT_OF_RANGE"):
        load_settings()


class _Consumer:
    """Log bounds as a broker lists them, and the high watermark of each partition's last fetch."""

    def __init__(self, bounds: dict[int, tuple[int, int]], highwater: dict[int, int | None]) -> None:
        self.bounds = bounds
        self.highwaters = highwater
        self.polled_ms: dict[int, int] = {}

    async def beginning_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.bounds[tp.partition][0] for tp in partitions}

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.bounds[tp.partition][1] for tp in partitions}

    def highwater(self, partition: TopicPartition) -> int | None:
        return self.highwaters[partition.partition]

    def last_poll_timestamp(self, partition: TopicPartition) -> int | None:
        if self.highwaters[partition.partition] is None:
            return None
        return self.polled_ms.get(partition.partition, int(time.time() * 1000))

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(TOPIC, p) for p in self.highwaters}


class _NoPool:
    """The guard must not touch Postgres unless it moves an offset."""

    def acquire(self) -> Any:
        raise AssertionError("Postgres used although nothing was to be moved")


def _guard(policy: Policy) -> tuple[OffsetGuard, CollectorRegistry]:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    return OffsetGuard(policy, TOPIC, "g", metrics, RetryPolicy(metrics, max_backoff_s=0.01)), registry


def _count(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels or None) or 0.0


async def test_offsets_inside_their_logs_are_kept_without_a_write() -> None:
    guard, registry = _guard("fail")
    consumer = _Consumer({0: (0, 10), 1: (5, 9)}, {0: None, 1: None})
    assert await guard.fit(consumer, _NoPool(), {0: 10, 1: 5}) == {0: 10, 1: 5}  # type: ignore[arg-type]
    assert _count(registry, "omnilog_offset_out_of_range_total", kind="past_end") == 0


async def test_past_the_listed_end_waits_for_a_fetch_to_confirm() -> None:
    # Tansu lists the end of a log made of one 50-record batch as 1: acting on that alone would
    # restart a caught-up partition from its start.
    guard, registry = _guard("fail")
    consumer = _Consumer({0: (0, 1)}, {0: None})
    assert await guard.fit(consumer, _NoPool(), {0: 50}) == {0: 50}  # type: ignore[arg-type]
    consumer.highwaters[0] = 50  # the first fetch at 50 answers: the log does end at 50
    assert not guard.past_end_suspected(consumer, {0: 50})
    assert await guard.fit(consumer, _NoPool(), {0: 50}) == {0: 50}  # type: ignore[arg-type]
    assert _count(registry, "omnilog_offset_out_of_range_total", kind="past_end") == 0


async def test_past_the_end_is_acted_on_when_a_fetch_confirms_it() -> None:
    guard, registry = _guard("fail")
    refused = _Consumer({0: (0, 40), 1: (0, 40)}, {0: None, 1: None})
    guard.note_refused([1])  # Kafka: OFFSET_OUT_OF_RANGE for partition 1's position
    with pytest.raises(PermanentError) as raised:
        await guard.fit(refused, _NoPool(), {0: 500, 1: 500})  # type: ignore[arg-type]
    assert isinstance(raised.value.cause, OffsetsOutOfRange) and raised.value.cause.partitions == [1]
    # Tansu: no error, but the fetch at 500 answers with a high watermark of 40.
    shrunk = _Consumer({0: (0, 1)}, {0: 40})
    assert guard.past_end_suspected(shrunk, {0: 500})
    with pytest.raises(PermanentError):
        await guard.fit(shrunk, _NoPool(), {0: 500})  # type: ignore[arg-type]
    assert _count(registry, "omnilog_offset_out_of_range_total", kind="past_end") == 2


async def test_fail_policy_counts_every_partition_out_of_range_and_stops_without_moving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard, registry = _guard("fail")
    consumer = _Consumer({0: (0, 10), 1: (5, 9), 2: (0, 3)}, {0: None, 1: None, 2: 3})
    with pytest.raises(PermanentError) as raised:
        await guard.fit(consumer, _NoPool(), {0: 10, 1: 2, 2: 8})  # type: ignore[arg-type]
    assert raised.value.operation == "offset_out_of_range"
    assert isinstance(raised.value.cause, OffsetsOutOfRange) and raised.value.cause.partitions == [1, 2]
    assert _count(registry, "omnilog_offset_out_of_range_total", kind="before_start") == 1
    assert _count(registry, "omnilog_offset_out_of_range_total", kind="past_end") == 1
    assert _count(registry, "omnilog_offsets_lost_total") == 0  # nothing was skipped
    lines = [r for r in caplog.records if r.name == "omnilog.offsets"]
    assert [(r.levelname, getattr(r, "partition", None)) for r in lines] == [("ERROR", 1), ("ERROR", 2)]
    assert (getattr(lines[0], "stored_offset", None), getattr(lines[0], "log_start", None)) == (2, 5)


async def test_a_negative_log_start_from_the_broker_stops_the_worker() -> None:
    guard, _ = _guard("earliest")
    consumer = _Consumer({0: (-1, 3)}, {0: None})
    with pytest.raises(PermanentError, match="inconsistent log bounds"):
        await guard.fit(consumer, _NoPool(), {0: 5})  # type: ignore[arg-type]


def test_only_a_high_watermark_fetched_since_the_last_seek_raises_suspicion() -> None:
    guard, _ = _guard("earliest")
    consumer = _Consumer({}, {0: 100, 1: None, 2: 7})
    positions = {0: 100, 1: 50, 2: 7}
    assert not guard.past_end_suspected(consumer, positions)  # caught up, never fetched, caught up
    consumer.highwaters[2] = 3  # the log shrank under partition 2 (a re-created topic)
    assert guard.past_end_suspected(consumer, positions)
    # A seek forward (a fenced batch re-reads from an offset another owner stored): the
    # watermark still known is from before, and says nothing about the new position.
    consumer.polled_ms[2] = int(time.time() * 1000) - 5
    guard.note_seek([2])
    assert not guard.past_end_suspected(consumer, positions)
    consumer.polled_ms[2] = int(time.time() * 1000) + 1  # a fetch at the new position answered
    assert guard.past_end_suspected(consumer, positions)
    positions[2] = 0  # moved to the new log's start
    assert not guard.past_end_suspected(consumer, positions)


def test_partitions_not_owned_or_of_another_topic_are_not_suspected() -> None:
    guard, _ = _guard("earliest")
    consumer = _Consumer({}, {0: 1})
    assert not guard.past_end_suspected(consumer, {5: 10})  # buffered position of a partition not owned
    other = OffsetGuard("earliest", "other-topic", "g", WorkerMetrics(CollectorRegistry()), guard._retry)
    assert not other.past_end_suspected(consumer, {0: 10})
