"""The decode stage is total: no bytes make it raise, and every message ends as exactly one valid
event or one dead letter. Stored lines are single-line JSON that re-validates to the same event."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.contract import InvalidEvent, ValidationPolicy, ValidEvent, validate_event
from pipeline.processing.batch import Message
from pipeline.processing.flush import decode

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)
POLICY = ValidationPolicy(max_age=timedelta(days=90), max_future_skew=timedelta(hours=1))


def _event(**changes: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "organization_id": str(uuid.uuid4()),
        "started_at": "2026-11-29T11:00:00.123Z",
        "duration_ms": 12,
    }
    event.update(changes)
    return event


def _message(value: bytes | None, offset: int = 0, timestamp_ms: int = NOW_MS) -> Message:
    return Message(0, offset, value, len(value or b""), None, timestamp_ms)


def _fields(event: ValidEvent) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(event).items() if k != "line"}


json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def _check_one_outcome(values: list[bytes | None]) -> None:
    messages = [_message(v, i) for i, v in enumerate(values)]
    decoded = decode(messages, POLICY, NOW, horizon=None)
    valid_offsets = {decoded.source[e.event_id].offset for e in decoded.valid}
    letter_offsets = {letter.message.offset for letter in decoded.letters}
    assert not valid_offsets & letter_offsets
    # Each message is a valid event, a dead letter or an in-batch duplicate of an earlier valid one.
    assert len(valid_offsets) + len(letter_offsets) + decoded.in_batch_duplicates == len(messages)
    for event in decoded.valid:
        assert b"\n" not in event.line and b"\r" not in event.line
        again = validate_event(event.line, NOW, POLICY)
        assert isinstance(again, ValidEvent) and _fields(again) == _fields(event)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=300) | st.none(), max_size=8))
def test_arbitrary_bytes_never_raise(values: list[bytes | None]) -> None:
    _check_one_outcome(values)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(json_values, st.sampled_from(["free", "request", "duration_ms", "event_id", "user_id", "bytes_in"]))
def test_generated_json_in_any_field_never_raises(value: Any, name: str) -> None:
    try:
        raw = orjson.dumps(_event(**{name: value}))
    except (TypeError, orjson.JSONEncodeError):
        return  # integers beyond 64 bits: encoded by hand below
    _check_one_outcome([raw])


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=1, max_size=40), st.integers(min_value=0, max_value=200))
def test_line_breaks_and_noise_anywhere(noise: bytes, at: int) -> None:
    raw = orjson.dumps(_event(free={"a": [1, 2, {"b": "c"}]}))
    at = min(at, len(raw))
    _check_one_outcome(
        [raw[:at] + b"\r\n" + raw[at:], raw[:at] + noise + raw[at:], raw.replace(b",", b",\r\n")]
    )


@pytest.mark.parametrize("depth", [10, 255, 300, 1000, 1024, 1025, 5000])
def test_deep_nesting_is_an_event_or_a_letter(depth: int) -> None:
    nested = b'{"a":' * depth + b"1" + b"}" * depth
    raw = orjson.dumps(_event()).rstrip(b"}") + b',\r\n"free":' + nested + b"}"
    _check_one_outcome([raw])
    result = validate_event(raw, NOW, POLICY)
    if depth < 1024:
        assert isinstance(result, ValidEvent)
        assert result.line == raw.replace(b"\r\n", b"  ")  # same bytes, same length, one line
    else:
        assert isinstance(result, InvalidEvent) and result.reason == "not_json"


def test_huge_integers_in_free_form_fields_are_kept_exactly() -> None:
    raw = orjson.dumps(_event()).rstrip(b"}") + b',\n"n": 123456789012345678901234567890123}'
    result = validate_event(raw, NOW, POLICY)
    assert isinstance(result, ValidEvent)
    assert b"123456789012345678901234567890123" in result.line  # not re-serialised as a float


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "not_json"),
        (b"", "not_json"),
        (b"\xef\xbb\xbf{}", "not_json"),
        (b'{"a":"\\ud800"}', "not_json"),
        (b'{"a":NaN}', "not_json"),
        (b"\xff\xfe", "not_utf8"),
        (b"[]", "not_object"),
    ],
)
def test_hostile_values_have_their_reason(raw: bytes | None, reason: str) -> None:
    result = validate_event(raw, NOW, POLICY)
    assert isinstance(result, InvalidEvent) and result.reason == reason


def test_an_unexpected_exception_is_one_dead_letter_naming_its_class(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.contract.validate as event_module

    def broken(*args: object) -> object:
        raise KeyError("boom")

    good = orjson.dumps(_event())
    # Whichever way started_at is parsed (the SDK's shape, or the full rules), the parse fails.
    monkeypatch.setattr(event_module.rules, "timestamp", broken)
    monkeypatch.setattr(event_module, "_from_iso", broken)
    decoded = decode([_message(good, 0), _message(b"{}", 1)], POLICY, NOW, horizon=None)
    letters = {letter.message.offset: letter for letter in decoded.letters}
    assert letters[0].reason == "internal_error" and letters[0].exception == "KeyError"
    assert letters[1].reason == "missing_field"


def test_the_window_is_measured_from_the_record_timestamp() -> None:
    """A replay later gives the same verdict: the reference is the record's timestamp (down to the
    floor of flush.counted_since, which a worker less than a day behind never reaches)."""
    record_ms = NOW_MS - 12 * 3_600_000  # produced half a day before the worker reads it
    record = datetime.fromtimestamp(record_ms / 1000, UTC)
    started = record - timedelta(days=89, hours=20)  # 90 days 8 h before NOW: too old for NOW's window
    raw = orjson.dumps(_event(started_at=started.isoformat()))
    for later in (NOW, NOW + timedelta(hours=6)):
        decoded = decode([_message(raw, 0, record_ms)], POLICY, later, horizon=None)
        assert len(decoded.valid) == 1, later
    too_old = orjson.dumps(_event(started_at=(started - timedelta(days=6)).isoformat()))
    decoded = decode([_message(too_old, 0, record_ms)], POLICY, NOW, horizon=None)
    assert [letter.reason for letter in decoded.letters] == ["out_of_range_time"]


def test_a_record_stamped_in_the_future_is_judged_by_the_clock() -> None:
    future_ms = NOW_MS + 10 * 86_400_000
    raw = orjson.dumps(_event(started_at=(NOW + timedelta(days=9)).isoformat()))
    decoded = decode([_message(raw, 0, future_ms)], POLICY, NOW, horizon=None)
    assert [letter.reason for letter in decoded.letters] == ["out_of_range_time"]
    no_stamp = decode([_message(orjson.dumps(_event()), 0, -1)], POLICY, NOW, horizon=None)
    assert len(no_stamp.valid) == 1


def test_events_before_the_retention_horizon_are_expired() -> None:
    horizon = NOW.date()
    old = orjson.dumps(_event(started_at=(NOW - timedelta(days=1)).isoformat()))
    fresh = orjson.dumps(_event())
    decoded = decode([_message(old, 0), _message(fresh, 1)], POLICY, NOW, horizon=horizon)
    assert [(letter.message.offset, letter.reason) for letter in decoded.letters] == [(0, "expired")]
    assert [decoded.source[e.event_id].offset for e in decoded.valid] == [1]


def test_upper_case_ids_are_stored_lower_case_and_deduplicated() -> None:
    event_id = str(uuid.uuid4())
    upper = orjson.dumps(_event(event_id=event_id.upper()))
    lower = orjson.dumps(_event(event_id=event_id))
    decoded = decode([_message(upper, 0), _message(lower, 1)], POLICY, NOW, horizon=None)
    assert [e.event_id for e in decoded.valid] == [event_id]
    assert decoded.in_batch_duplicates == 1
