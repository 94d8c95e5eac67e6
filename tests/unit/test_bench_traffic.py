"""The benchmark's ordered backlog: started_at and the event_id's UUIDv7 time follow the position."""

from __future__ import annotations

import itertools
import time
import uuid
from datetime import UTC, datetime, timedelta

import orjson

from bench.harness import traffic
from pipeline.contract import ValidationPolicy, ValidEvent, validate_event


def test_an_ordered_backlog_restamps_time_and_id_in_position_order() -> None:
    values = traffic.values(50, seed=3)
    end_ms = int(time.time() * 1000)
    stamped = [traffic.in_arrival_order(v, i, len(values), end_ms, 0) for i, v in enumerate(values)]
    assert [len(v) for v in stamped] == [len(v) for v in values]
    started = []
    for value in stamped:
        event = orjson.loads(value)
        started_ms = int(datetime.fromisoformat(event["started_at"]).timestamp() * 1000)
        assert uuid.UUID(event["event_id"]).int >> 80 == started_ms  # the UUIDv7 time prefix
        started.append(started_ms)
        policy = ValidationPolicy(max_age=timedelta(days=1), max_future_skew=timedelta(hours=1))
        assert isinstance(validate_event(value, datetime.now(UTC), policy), ValidEvent)
    assert started == sorted(started)
    assert end_ms - started[0] >= int(traffic.SPAN_HOURS * 3_600_000) - 1


def test_jitter_keeps_each_event_near_its_position() -> None:
    values = traffic.values(20, seed=4)
    end_ms = int(time.time() * 1000)
    step = int(traffic.SPAN_HOURS * 3_600_000) // 20
    for i, value in enumerate(values):
        event = orjson.loads(traffic.in_arrival_order(value, i, 20, end_ms, 2_000))
        started_ms = int(datetime.fromisoformat(event["started_at"]).timestamp() * 1000)
        expected = end_ms - int(traffic.SPAN_HOURS * 3_600_000) + i * step
        assert abs(started_ms - expected) <= 2_000


def test_ordered_values_are_the_backlog_as_produce_backlog_sends_it() -> None:
    raw = traffic.values(30, seed=5)
    ordered = traffic.values(30, seed=5, ordered=True)
    assert len(ordered) == len(raw) and ordered != raw
    times = []
    for before, after in zip(raw, ordered, strict=True):
        a, b = orjson.loads(before), orjson.loads(after)
        # only the time fields move: the same event otherwise, the id's random bits kept
        assert {k: v for k, v in a.items() if k not in ("started_at", "event_id")} == {
            k: v for k, v in b.items() if k not in ("started_at", "event_id")
        }
        assert a["event_id"][13:] == b["event_id"][13:]
        times.append(uuid.UUID(b["event_id"]).int >> 80)
    step = int(traffic.SPAN_HOURS * 3_600_000) // 30
    assert all(
        later - earlier >= step - 2 * traffic.ORDER_JITTER_MS for earlier, later in itertools.pairwise(times)
    )


def test_a_live_event_is_stamped_at_its_send_time_id_included() -> None:
    moment_ms = int(time.time() * 1000)
    event = orjson.loads(traffic.stamped_at(traffic.values(1, seed=6)[0], moment_ms))
    assert uuid.UUID(event["event_id"]).int >> 80 == moment_ms
    assert int(datetime.fromisoformat(event["started_at"]).timestamp() * 1000) == moment_ms
