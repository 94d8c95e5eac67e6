"""The validator and the shipped JSON Schema agree on which events are valid (docs/contract.md §1).

The schema is checked with jsonschema's format checker (uuid, date-time via rfc3339-validator,
ipv4, ipv6) against the event as Python's standard `json` module parses it. The time window is not
expressible in JSON Schema, so `out_of_range_time` counts as "valid" here.
"""

from __future__ import annotations

import json
import string
from datetime import UTC, datetime, timedelta
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.contract import InvalidEvent, ValidationPolicy, ValidEvent, load_schema, validate_event

NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
POLICY = ValidationPolicy(max_age=timedelta(days=90), max_future_skew=timedelta(hours=1))
VALIDATOR = jsonschema.Draft202012Validator(
    load_schema(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
)
SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

UUID_FIELDS = (
    "event_id",
    "organization_id",
    "server_id",
    "session_id",
    "virtual_server_id",
    "client_id",
    "connection_id",
    "project_id",
    "api_key_id",
)
TEXT_LIMITS = {"rpc_method": 100, "user_id": 255, "model": 50, "mcp_tool_name": 255}
COUNTERS = {
    "duration_ms": 2**31 - 1,
    "bytes_in": 2**40,
    "bytes_out": 2**40,
    "input_tokens": 2**31 - 1,
    "output_tokens": 2**31 - 1,
    "cache_read_tokens": 2**31 - 1,
    "cache_write_tokens": 2**31 - 1,
    "cost_cents": 2**31 - 1,
    "time_to_first_token_ms": 2**31 - 1,
}
ENUMS = {
    "level": ["trace", "debug", "info", "warn", "error", "fatal"],
    "event_type": ["api_call", "mcp_tool", "streaming"],
    "status": ["success", "error", "timeout", "rate_limited"],
}
REQUIRED = ("event_id", "organization_id", "started_at", "duration_ms")


def test_format_checker_checks_every_format_the_schema_uses() -> None:
    # Without rfc3339-validator installed, jsonschema silently skips date-time.
    checkers = jsonschema.Draft202012Validator.FORMAT_CHECKER.checkers
    assert {"uuid", "date-time", "ipv4", "ipv6"} <= set(checkers)


# -- strategies ----------------------------------------------------------------------------------------

texts = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=20)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=10,
)


@st.composite
def uuids(draw: st.DrawFn) -> str:
    text = str(draw(st.uuids()))
    return text.upper() if draw(st.booleans()) else text


@st.composite
def timestamps(draw: st.DrawFn) -> str:
    moment = draw(st.datetimes(min_value=datetime(2026, 8, 26), max_value=datetime(2026, 11, 23, 12, 59)))
    offset_minutes = draw(st.integers(-23 * 60 - 59, 23 * 60 + 59))
    local = moment + timedelta(minutes=offset_minutes)
    text = local.strftime("%Y-%m-%dT%H:%M:%S")
    digits = draw(st.integers(0, 9))
    if digits:
        text += "." + "".join(
            draw(st.lists(st.sampled_from(string.digits), min_size=digits, max_size=digits))
        )
    if offset_minutes == 0 and draw(st.booleans()):
        text += draw(st.sampled_from(["Z", "z"]))
    else:
        sign = "+" if offset_minutes >= 0 else "-"
        text += f"{sign}{abs(offset_minutes) // 60:02d}:{abs(offset_minutes) % 60:02d}"
    if draw(st.booleans()):
        text = text[:10] + "t" + text[11:]
    return text


ipv4s = st.ip_addresses(v=4).map(str)
ipv6s = st.ip_addresses(v=6).map(str)


def integers_maybe_as_floats(minimum: int, maximum: int) -> st.SearchStrategy[int | float]:
    return st.integers(minimum, maximum).flatmap(
        lambda n: st.sampled_from([n, float(n)]) if abs(n) < 2**53 else st.just(n)
    )


def optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


OPTIONAL: dict[str, st.SearchStrategy[Any]] = {
    "schema_version": optional(st.sampled_from([1, 1.0])),
    **{name: optional(uuids()) for name in UUID_FIELDS[2:]},
    **{
        name: optional(st.text(max_size=limit).filter(lambda s: "\x00" not in s))
        for name, limit in TEXT_LIMITS.items()
    },
    **{name: optional(st.sampled_from(values)) for name, values in ENUMS.items()},
    **{
        name: optional(integers_maybe_as_floats(0, limit))
        for name, limit in COUNTERS.items()
        if name != "duration_ms"
    },
    "status_code": optional(integers_maybe_as_floats(100, 599)),
    "error": optional(st.booleans()),
    "remote_ip": optional(ipv4s | ipv6s),
    "redaction_version": optional(integers_maybe_as_floats(-(2**31), 2**31 - 1)),
    "request": json_values,
    "response": json_values,
    "headers": json_values,
    "metadata": json_values,
    "x_unknown": json_values,
}

valid_events = st.fixed_dictionaries(
    {
        "event_id": uuids(),
        "organization_id": uuids(),
        "started_at": timestamps(),
        "duration_ms": integers_maybe_as_floats(0, 2**31 - 1),
    },
    optional=OPTIONAL,
)


GOOD_UUID = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
NOT_TEXT: list[Any] = [None, True, 0, 1.5, [], {}, ["x"], {"a": "b"}]
TIMESTAMP_PROBES = [
    "2026-11-23T11:59:00Z",
    "2026-11-23t11:59:00z",
    "2026-11-23T11:59:00.123456789+05:30",
    "2026-11-23T11:59:00-00:00",
    "2026-11-23T11:59:00",
    "2026-11-23T11:59:00.123",
    "2026-11-23 11:59:00Z",
    "2026-11-23T11:59Z",
    "2026-11-23T11:59:00.Z",
    "2026-11-23T11:59:00,5Z",
    "2026-02-29T11:59:00Z",
    "2024-02-29T11:59:00Z",
    "2026-04-31T11:59:00Z",
    "2026-11-23T23:59:60Z",
    "2026-11-23T24:00:00Z",
    "2026-11-23T11:60:00Z",
    "2026-11-23T11:59:00+05:60",
    "2026-11-23T11:59:00+24:00",
    "2026-11-23T11:59:00+23:59",
    "2026-11-23T11:59:00+0530",
    "2026-W47-1T11:59:00Z",
    "20261123T115900Z",
    "2026-11-23T11:59:00Z\n",
    " 2026-11-23T11:59:00Z",
    "0000-01-01T00:00:00Z",
    "0001-01-01T00:00:00+01:00",
    "9999-12-31T23:59:59-01:00",
    "1999-01-01T00:00:00Z",
    "2026-13-01T00:00:00Z",
    "2026-00-01T00:00:00Z",
    "2026-11-00T00:00:00Z",
    "\uff12026-11-23T11:59:00Z",
    "",
]
IP_PROBES = [
    "0.0.0.0",
    "255.255.255.255",
    "1.2.3",
    "1.2.3.4.5",
    "01.2.3.4",
    "1.2.3.04",
    "256.0.0.1",
    "1.2.3.4/32",
    " 1.2.3.4",
    "1.2.3.4 ",
    "1.2.3.4\n",
    "\u0661.2.3.4",
    "::",
    "::1",
    "2001:db8::8a2e:370:7334",
    "2001:DB8::1",
    "::ffff:1.2.3.4",
    "::1.02.3.4",
    "fe80::1%eth0",
    "fe80::1%1",
    "1::2::3",
    "12345::",
    "1:2:3:4:5:6:7:8",
    "1:2:3:4:5:6:7:8:9",
    "1:2:3:4:5:6:7::",
    "[::1]",
    "localhost",
    "",
]


def probes(name: str) -> list[Any]:
    """Fixed values for `name` at and just past its rules' edges, valid and invalid mixed."""
    if name in UUID_FIELDS:
        u = GOOD_UUID
        return [
            *NOT_TEXT,
            u,
            u.upper(),
            u[:-1],
            u + "0",
            u.replace("-", ""),
            "{" + u + "}",
            u[:8] + "_" + u[9:],
            u[:-1] + "g",
            " " + u[1:],
            u + "\n",
            u.replace("-", ":"),
            "urn:uuid:" + u,
            u[:-1] + "\u0661",
            "",
        ]
    if name in TEXT_LIMITS:
        limit = TEXT_LIMITS[name]
        return [
            *NOT_TEXT,
            "",
            "a" * limit,
            "a" * (limit + 1),
            "é" * limit,
            "é" * (limit + 1),
            "😀" * limit,
            "😀" * (limit + 1),
            "a\x00b",
            "\n",
        ]
    if name in ENUMS:
        values = ENUMS[name]
        return [*NOT_TEXT, *values, *(v.upper() for v in values), *(v + " " for v in values), "", "warning"]
    if name in COUNTERS:
        limit = COUNTERS[name]
        return [
            *NOT_TEXT,
            "1",
            0,
            -1,
            -0.0,
            -1.0,
            0.5,
            limit,
            limit + 1,
            float(limit),
            float(limit + 1),
            1e300,
            2**64,
            -(2**63),
        ]
    if name == "status_code":
        return [*NOT_TEXT, "200", 99, 100, 599, 600, 100.0, 599.0, 600.0, 200.5, -1]
    if name == "redaction_version":
        return [*NOT_TEXT, "1", -(2**31), -(2**31) - 1, 2**31 - 1, 2**31, 0, 3.0, 3.5]
    if name == "schema_version":
        return [*NOT_TEXT, "1", 1, 1.0, 2, 0, -1, 1.5]
    if name == "error":
        return [None, True, False, 0, 1, "true", [], {}]
    if name == "started_at":
        return [*NOT_TEXT, *TIMESTAMP_PROBES]
    if name == "remote_ip":
        return [*NOT_TEXT, *IP_PROBES]
    raise AssertionError(name)


def wild(name: str) -> st.SearchStrategy[Any]:
    """Random wrong-ish values for `name`."""
    if name in TEXT_LIMITS:
        return st.text(min_size=TEXT_LIMITS[name] - 2, max_size=TEXT_LIMITS[name] + 2) | json_values
    if name in COUNTERS or name in {"status_code", "redaction_version", "schema_version"}:
        return (
            st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False) | json_values
        )
    if name == "remote_ip":
        return ipv4s.map(lambda ip: ip.replace(".", ".0", 1)) | ipv6s.map(lambda ip: ip + "%1") | texts
    return json_values


MUTABLE_FIELDS = sorted(
    [
        *UUID_FIELDS,
        *TEXT_LIMITS,
        *ENUMS,
        *COUNTERS,
        "started_at",
        "status_code",
        "remote_ip",
        "schema_version",
        "error",
        "redaction_version",
    ]
)
ALL_PROBES = [(name, value) for name in MUTABLE_FIELDS for value in probes(name)]


@st.composite
def mutated_events(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """A valid event with one field replaced by a wrong (or nearly right) value, or dropped."""
    event = dict(draw(valid_events))
    name = draw(st.sampled_from(MUTABLE_FIELDS))
    if draw(st.integers(0, 9)) == 0:
        event.pop(name, None)
        return event, f"drop {name}"
    event[name] = draw(st.sampled_from(probes(name)) | wild(name))
    return event, f"{name}={event[name]!r}"


# -- the properties ------------------------------------------------------------------------------------


def encode(event: dict[str, Any]) -> bytes:
    # The standard library writes integers of any size, as producers in other languages may.
    return json.dumps(event, ensure_ascii=False).encode()


def validator_accepts(event: dict[str, Any]) -> tuple[bool, ValidEvent | InvalidEvent]:
    result = validate_event(encode(event), NOW, POLICY)
    accepted = isinstance(result, ValidEvent) or result.reason == "out_of_range_time"
    return accepted, result


def schema_accepts(event: dict[str, Any]) -> bool:
    # The schema sees the event as a standard JSON parser reads the same bytes.
    return VALIDATOR.is_valid(json.loads(encode(event)))


@SETTINGS
@given(valid_events)
def test_valid_events_pass_both(event: dict[str, Any]) -> None:
    result = validate_event(encode(event), NOW, POLICY)
    assert isinstance(result, ValidEvent), result
    errors = [error.message for error in VALIDATOR.iter_errors(json.loads(encode(event)))]
    assert not errors
    assert result.started_at.tzinfo is UTC
    assert result.event_id == str(event["event_id"]).lower()


@SETTINGS
@given(mutated_events())
def test_validator_and_schema_agree_on_mutations(case: tuple[dict[str, Any], str]) -> None:
    event, mutation = case
    accepted, result = validator_accepts(event)
    assert accepted == schema_accepts(event), (mutation, result)


@SETTINGS
@given(valid_events, st.sampled_from(MUTABLE_FIELDS), json_values)
def test_agree_on_any_json_value_in_any_field(event: dict[str, Any], name: str, value: Any) -> None:
    event = {**event, name: value}
    accepted, result = validator_accepts(event)
    assert accepted == schema_accepts(event), (name, value, result)


BASE_EVENT = {
    "event_id": GOOD_UUID,
    "organization_id": "7f1c9e7a-1b2c-4d3e-8f40-5a6b7c8d9e0f",
    "started_at": "2026-11-23T11:00:00Z",
    "duration_ms": 1,
}


@pytest.mark.parametrize(
    ("name", "value"), ALL_PROBES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(ALL_PROBES)]
)
def test_agree_at_every_probe(name: str, value: Any) -> None:
    event = {**BASE_EVENT, name: value}
    accepted, result = validator_accepts(event)
    assert accepted == schema_accepts(event), result


def test_probes_include_both_outcomes_for_every_field() -> None:
    # Guards the probe lists themselves: each field must have accepted and rejected probes.
    for name in MUTABLE_FIELDS:
        outcomes = {validator_accepts({**BASE_EVENT, name: value})[0] for value in probes(name)}
        assert outcomes == {True, False}, name


@pytest.mark.parametrize("name", REQUIRED)
def test_required_fields_are_required_by_both(name: str) -> None:
    event = {
        "event_id": "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
        "organization_id": "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5c",
        "started_at": "2026-11-23T11:00:00Z",
        "duration_ms": 1,
    }
    assert validator_accepts(event)[0] and schema_accepts(event)
    del event[name]
    assert not validator_accepts(event)[0]
    assert not schema_accepts(event)
