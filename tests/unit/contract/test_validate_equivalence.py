"""`validate_event` gives the verdict of the validator it replaced, on generated input.

The oracle (`legacy_validate`) is the validator before ids and addresses were remembered across
events. The verdict compared is everything a caller sees: every field of a valid event and its
stored line, or the reason, detail and exception of an invalid one. Events are drawn from small
pools of ids and addresses, so most are seen again (a hit in the remembered sets) and some first in
one field, then in another, or behind a broken earlier field.
"""

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
from pipeline.contract import validate as product
from pipeline.contract.fields import FIELDS, Kind
from tests.unit.contract import legacy_validate

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
POLICY = ValidationPolicy(max_age=timedelta(days=90), max_future_skew=timedelta(hours=1))
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_IDS = [str(uuid.UUID(int=n * 0x1F2E3D4C5B6A79881726354453627180 % 2**128)) for n in range(1, 9)]
_IPS = ["10.0.0.1", "192.0.2.254", "2001:db8::1", "::ffff:192.0.2.1", "fe80::1%eth0", "010.0.0.1", "1.2.3"]
_UUID_FIELDS = [f.name for f in FIELDS if f.kind is Kind.UUID and f.name != "event_id"]

ids = st.sampled_from(_IDS) | st.sampled_from(_IDS).map(str.upper) | st.uuids().map(str)
near_ids = st.sampled_from(_IDS).flatmap(
    lambda text: st.integers(0, 35).flatmap(
        lambda at: st.sampled_from(["", "g", "-", "A", "\x00", "é", " ", "0-"]).map(
            lambda ch: text[:at] + ch + text[at + 1 :]
        )
    )
)
json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what orjson.dumps can write
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
)


def verdict(result: ValidEvent | InvalidEvent) -> tuple[Any, ...]:
    if isinstance(result, InvalidEvent):
        return ("invalid", result.reason, result.detail, result.exception)
    return ("valid", dataclasses.asdict(result))


def assert_same_verdict(value: bytes | None) -> None:
    expected = verdict(legacy_validate.validate_event(value, NOW, POLICY))
    assert verdict(validate_event(value, NOW, POLICY)) == expected, value


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    """A valid event (mostly), its ids and addresses drawn from small pools so that they recur."""
    started = NOW - timedelta(seconds=draw(st.integers(0, 3600)))
    event: dict[str, Any] = {
        "event_id": draw(st.uuids()).hex if draw(st.booleans()) else str(draw(st.uuids())),
        "organization_id": draw(ids),
        "started_at": started.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "duration_ms": draw(st.integers(0, 10_000)),
    }
    for name in draw(st.lists(st.sampled_from(_UUID_FIELDS[1:]), max_size=4, unique=True)):
        event[name] = draw(ids | st.none())
    if draw(st.booleans()):
        event["remote_ip"] = draw(st.sampled_from(_IPS[:4]))
    if draw(st.booleans()):
        status_code = draw(st.sampled_from([200, 404, 500]))
        event.update(rpc_method="tools/call", status_code=status_code, user_id="u1")
    if draw(st.booleans()):
        event["request"] = draw(json_values)
    return event


@SETTINGS
@given(st.lists(events(), min_size=1, max_size=6))
def test_valid_events_in_a_row(batch: list[dict[str, Any]]) -> None:
    for event in batch:
        assert_same_verdict(orjson.dumps(event))


@SETTINGS
@given(
    events(),
    st.sampled_from(["organization_id", *_UUID_FIELDS, "remote_ip", "event_id"]),
    near_ids | st.sampled_from(_IPS) | ids | json_leaves,
    st.sampled_from([None, "duration_ms", "started_at", "event_id"]),
)
def test_one_id_or_address_broken_or_moved(
    event: dict[str, Any], name: str, value: Any, earlier_broken: str | None
) -> None:
    """Every id or address field, with a near-UUID, an id seen in another field, a bad address..."""
    assert_same_verdict(orjson.dumps(event))  # remember its ids first
    event[name] = value
    for _ in range(2):  # the second time, a remembered value must give the same verdict
        assert_same_verdict(orjson.dumps(event))
    if earlier_broken is not None:  # a known id behind a broken earlier field: the earlier reason
        event[earlier_broken] = -1 if earlier_broken == "duration_ms" else "x"
        assert_same_verdict(orjson.dumps(event))


@SETTINGS
@given(events(), st.sampled_from([f.name for f in FIELDS]), json_values)
def test_any_field_with_any_json(event: dict[str, Any], name: str, value: Any) -> None:
    event[name] = value
    assert_same_verdict(orjson.dumps(event))


@SETTINGS
@given(events(), st.integers(0, 2000), st.binary(max_size=8))
def test_bytes_cut_or_spliced(event: dict[str, Any], at: int, noise: bytes) -> None:
    raw = orjson.dumps(event)
    at %= len(raw) + 1
    for value in (raw[:at], raw[:at] + noise + raw[at:], raw[:at] + raw[at + 1 :]):
        assert_same_verdict(value)


@SETTINGS
@given(st.binary(max_size=300) | st.none())
def test_arbitrary_bytes(value: bytes | None) -> None:
    assert_same_verdict(value)


def test_the_remembered_sets_stay_bounded() -> None:
    for n in range(product._KNOWN_MAX + 10):
        event = {
            "event_id": str(uuid.UUID(int=n)),
            "organization_id": str(uuid.UUID(int=n + 1)),
            "started_at": "2026-11-29T11:00:00Z",
            "duration_ms": 1,
            "remote_ip": f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}",
        }
        assert isinstance(validate_event(orjson.dumps(event), NOW, POLICY), ValidEvent)
    assert 0 < len(product._KNOWN_IDS) <= product._KNOWN_MAX
    assert 0 < len(product._KNOWN_IPS) <= product._KNOWN_MAX


@pytest.mark.parametrize("ip", _IPS)
def test_an_address_seen_valid_stays_valid_and_an_invalid_one_never_becomes_so(ip: str) -> None:
    event = {"event_id": _IDS[0], "organization_id": _IDS[1], "started_at": "2026-11-29T11:00:00Z"}
    for _ in range(2):
        assert_same_verdict(orjson.dumps({**event, "duration_ms": 1, "remote_ip": ip}))
