"""`started_at`: the fast path for the SDK's timestamp shape and the window test against a clock that
changes from record to record give the oracle's verdict (`legacy_validate`), detail included.

The fast path skips the pattern for `YYYY-MM-DDTHH:MM:SS.mmmZ`, so strings of exactly that shape
with any character in any place are drawn; the window is tested as `started_at - now`, so clocks and
policies are drawn up to the ends of the datetime range, where the window's bounds clamp.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.contract import InvalidEvent, ValidationPolicy, ValidEvent, validate_event
from tests.unit.contract import legacy_validate

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
WIDE = ValidationPolicy(max_age=timedelta.max, max_future_skew=timedelta.max)
SETTINGS = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SHAPE = "2026-11-29T11:59:58.123Z"

# Characters that stress a digit's place: other digits, Unicode digits, signs, separators, letters.
# (No lone surrogates: JSON text cannot carry them.)
odd_chars = st.sampled_from([*"0123456789+-:.,TtZz Wé\x00", "٣", "１", "²"]) | st.characters(
    exclude_categories=["Cs"]
)


def verdict(result: ValidEvent | InvalidEvent) -> tuple[Any, ...]:
    if isinstance(result, InvalidEvent):
        return ("invalid", result.reason, result.detail, result.exception)
    return ("valid", dataclasses.asdict(result))


def body(started_at: object) -> bytes:
    return orjson.dumps(
        {
            "event_id": "0b0e6e0c-1f1e-4c47-9d4a-0a1b2c3d4e5f",
            "organization_id": "6b1f3c9e-1111-4a2b-9c3d-123456789abc",
            "started_at": started_at,
            "duration_ms": 5,
        }
    )


def same_verdict(value: bytes, now: datetime, policy: ValidationPolicy) -> None:
    expected = verdict(legacy_validate.validate_event(value, now, policy))
    assert verdict(validate_event(value, now, policy)) == expected, (value, now, policy)


@st.composite
def near_shape(draw: st.DrawFn) -> str:
    """The SDK's shape with one to three characters replaced, or a real instant in that shape."""
    if draw(st.booleans()):
        instant = draw(st.datetimes(timezones=st.just(UTC)))
        return instant.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    text = list(SHAPE)
    for _ in range(draw(st.integers(1, 3))):
        text[draw(st.integers(0, len(text) - 1))] = draw(odd_chars)
    return "".join(text)


@SETTINGS
@given(near_shape(), st.sampled_from([WIDE, ValidationPolicy(timedelta(days=90), timedelta(hours=1))]))
def test_timestamps_of_the_sdk_shape_or_nearly(started_at: str, policy: ValidationPolicy) -> None:
    same_verdict(body(started_at), NOW, policy)


@SETTINGS
@given(st.datetimes(timezones=st.just(UTC)), st.datetimes(timezones=st.just(UTC)), st.integers(-3, 3))
def test_the_window_against_any_clock(started: datetime, now: datetime, days: int) -> None:
    """Clocks anywhere in the datetime range, events near them or far, policies from none to all."""
    stamp = started.isoformat(timespec="microseconds").replace("+00:00", "Z")
    for policy in (
        ValidationPolicy(timedelta(days=90), timedelta(hours=1)),
        ValidationPolicy(timedelta(0), timedelta(0)),
        ValidationPolicy(timedelta(days=days), timedelta(days=-days)),
        ValidationPolicy(timedelta.max, timedelta.max),
        ValidationPolicy(timedelta.min, timedelta.min),
        ValidationPolicy(timedelta(days=3_000_000), timedelta(days=-3_000_000)),
    ):
        same_verdict(body(stamp), now, policy)
        near = (now + timedelta(seconds=days)).isoformat() if datetime.min.year < now.year < 9999 else stamp
        same_verdict(body(near), now, policy)


def test_the_window_edges_to_the_microsecond() -> None:
    policy = ValidationPolicy(timedelta(days=90), timedelta(hours=1))
    for edge in (NOW - policy.max_age, NOW + policy.max_future_skew):
        for step in (-1, 0, 1):
            stamp = (edge + timedelta(microseconds=step)).isoformat().replace("+00:00", "Z")
            same_verdict(body(stamp), NOW, policy)


def test_a_naive_clock_fails_as_before() -> None:
    same_verdict(body(SHAPE), NOW.replace(tzinfo=None), ValidationPolicy(timedelta(days=1), timedelta(0)))
