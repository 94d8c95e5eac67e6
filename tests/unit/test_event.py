"""validate_event: every invalid kind with its reason and detail, defaults, line handling, time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import jsonschema
import orjson
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.commands.schema import command as schema_command
from pipeline.contract import InvalidEvent, ValidationPolicy, ValidEvent, load_schema, validate_event

NOW = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
POLICY = ValidationPolicy(max_age=timedelta(days=90), max_future_skew=timedelta(hours=1))
EVENT_ID = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
ORG_ID = "7f1c9e7a-1b2c-4d3e-8f40-5a6b7c8d9e0f"
OTHER_ID = "11111111-2222-4333-8444-555555555555"
MISSING = object()


def event(**fields: Any) -> dict[str, Any]:
    """A valid minimal event with `fields` set (MISSING removes one)."""
    base: dict[str, Any] = {
        "event_id": EVENT_ID,
        "organization_id": ORG_ID,
        "started_at": "2026-11-23T11:59:00.123Z",
        "duration_ms": 42,
    }
    base.update(fields)
    return {key: value for key, value in base.items() if value is not MISSING}


def check(value: bytes | None, now: datetime = NOW) -> ValidEvent | InvalidEvent:
    return validate_event(value, now, POLICY)


def valid(**fields: Any) -> ValidEvent:
    result = check(orjson.dumps(event(**fields)))
    assert isinstance(result, ValidEvent), result
    return result


def invalid(**fields: Any) -> InvalidEvent:
    result = check(orjson.dumps(event(**fields)))
    assert isinstance(result, InvalidEvent), result
    return result


# -- defaults and values ---------------------------------------------------------------------------


def test_minimal_event_gets_the_contract_defaults() -> None:
    result = valid()
    assert result.event_id == EVENT_ID
    assert result.organization_id == ORG_ID
    assert result.started_at == datetime(2026, 11, 23, 11, 59, 0, 123000, tzinfo=UTC)
    assert result.duration_ms == 42
    assert result.level == "info"
    assert result.error is False
    assert (result.bytes_in, result.bytes_out) == (0, 0)
    assert result.status_code is None
    assert result.server_id is None and result.remote_ip is None and result.redaction_version is None
    assert result.has_usage is False


def test_nulls_mean_defaults() -> None:
    result = valid(level=None, error=None, bytes_in=None, bytes_out=None, schema_version=None, server_id=None)
    assert (result.level, result.error, result.bytes_in, result.bytes_out) == ("info", False, 0, 0)
    assert result.server_id is None


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"status_code": 200}, False),
        ({"status_code": 399}, False),
        ({"status_code": 400}, True),
        ({"status_code": 503}, True),
        ({"level": "warn"}, False),
        ({"level": "error"}, True),
        ({"level": "fatal"}, True),
        ({"level": "error", "error": False}, False),
        ({"status_code": 500, "error": False}, False),
        ({"status_code": 200, "error": True}, True),
    ],
)
def test_error_flag_default(fields: dict[str, Any], expected: bool) -> None:
    assert valid(**fields).error is expected


def test_every_field_is_carried() -> None:
    fields: dict[str, Any] = {
        "schema_version": 1,
        "server_id": OTHER_ID,
        "session_id": OTHER_ID,
        "virtual_server_id": OTHER_ID,
        "rpc_method": "tools/call",
        "level": "debug",
        "status_code": 201,
        "bytes_in": 10,
        "bytes_out": 2**40,
        "user_id": "alice",
        "remote_ip": "203.0.113.9",
        "client_id": OTHER_ID,
        "connection_id": OTHER_ID,
        "project_id": OTHER_ID,
        "api_key_id": OTHER_ID,
        "model": "gpt-4o-mini",
        "event_type": "api_call",
        "status": "rate_limited",
        "input_tokens": 1,
        "output_tokens": 2,
        "cache_read_tokens": 3,
        "cache_write_tokens": 4,
        "cost_cents": 5,
        "time_to_first_token_ms": 2**31 - 1,
        "mcp_tool_name": "search",
        "redaction_version": -3,
        "request": {"a": [1, 2]},
        "response": None,
        "headers": {"x": "y"},
        "metadata": [1, "two"],
    }
    result = valid(**fields)
    for name, value in fields.items():
        if name not in {"schema_version", "request", "response", "headers", "metadata"}:
            assert getattr(result, name) == value, name
    assert result.has_usage is True


@pytest.mark.parametrize(
    "field",
    [
        "project_id",
        "api_key_id",
        "model",
        "event_type",
        "status",
        "input_tokens",
        "output_tokens",
        "cache_read_tokens",
        "cache_write_tokens",
        "cost_cents",
        "time_to_first_token_ms",
    ],
)
def test_any_usage_field_makes_a_usage_row(field: str) -> None:
    value: Any = {
        "project_id": OTHER_ID,
        "api_key_id": OTHER_ID,
        "model": "m",
        "event_type": "streaming",
        "status": "success",
    }.get(field, 0)
    assert valid(**{field: value}).has_usage is True
    assert valid(**{field: None}).has_usage is False


def test_uuids_are_made_canonical_lower_case() -> None:
    result = valid(
        event_id=EVENT_ID.upper(),
        server_id=OTHER_ID.upper(),
        project_id="ABCDEF01-2345-4789-8ABC-DEF012345678",
    )
    assert result.event_id == EVENT_ID
    assert result.server_id == OTHER_ID
    assert result.project_id == "abcdef01-2345-4789-8abc-def012345678"


def test_integral_floats_are_integers() -> None:
    result = valid(duration_ms=5.0, status_code=404.0, bytes_in=1e3, input_tokens=0.0, schema_version=1.0)
    assert result.duration_ms == 5 and type(result.duration_ms) is int
    assert result.status_code == 404 and type(result.status_code) is int
    assert result.bytes_in == 1000 and type(result.bytes_in) is int
    assert result.input_tokens == 0 and type(result.input_tokens) is int
    assert result.error is True


def test_ipv6_and_embedded_ipv4_are_ip_literals() -> None:
    assert valid(remote_ip="2001:db8::1").remote_ip == "2001:db8::1"
    assert valid(remote_ip="::ffff:192.0.2.1").remote_ip == "::ffff:192.0.2.1"
    assert valid(remote_ip="0.0.0.0").remote_ip == "0.0.0.0"
    assert valid(remote_ip="255.255.255.255").remote_ip == "255.255.255.255"


def test_strings_at_their_length_limit_are_accepted() -> None:
    result = valid(rpc_method="m" * 100, user_id="u" * 255, model="é" * 50, mcp_tool_name="t" * 255)
    assert len(result.model or "") == 50  # characters, not bytes


# -- time -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-23T17:29:00+05:30", datetime(2026, 11, 23, 11, 59, tzinfo=UTC)),
        ("2026-11-23T06:59:00.5-05:00", datetime(2026, 11, 23, 11, 59, 0, 500000, tzinfo=UTC)),
        ("2026-11-24T00:30:00+12:45", datetime(2026, 11, 23, 11, 45, tzinfo=UTC)),
        ("2026-11-23t11:59:00z", datetime(2026, 11, 23, 11, 59, tzinfo=UTC)),
        ("2026-11-23T11:59:00-00:00", datetime(2026, 11, 23, 11, 59, tzinfo=UTC)),
        ("2026-11-23T11:59:00.123456789Z", datetime(2026, 11, 23, 11, 59, 0, 123456, tzinfo=UTC)),
    ],
)
def test_started_at_is_converted_to_utc(text: str, expected: datetime) -> None:
    result = valid(started_at=text)
    assert result.started_at == expected
    assert result.started_at.utcoffset() == timedelta(0)
    assert result.started_at.tzinfo is UTC


def test_time_window_edges() -> None:
    assert isinstance(check(orjson.dumps(event(started_at="2026-11-23T13:00:00Z"))), ValidEvent)
    assert isinstance(check(orjson.dumps(event(started_at="2026-08-25T12:00:00Z"))), ValidEvent)
    late = invalid(started_at="2026-08-25T11:59:59.999Z")
    assert late.reason == "out_of_range_time" and late.detail.startswith("started_at:")
    early = invalid(started_at="2026-11-23T13:00:00.001Z")
    assert early.reason == "out_of_range_time"
    assert invalid(started_at="0001-01-01T00:00:00+01:00").reason == "out_of_range_time"


def test_window_follows_the_clock_it_is_given() -> None:
    value = orjson.dumps(event(started_at="2026-11-23T11:59:00Z"))
    assert isinstance(check(value, NOW), ValidEvent)
    assert isinstance(check(value, NOW + timedelta(days=91)), InvalidEvent)
    assert isinstance(check(value, NOW), ValidEvent)
    other = ValidationPolicy(max_age=timedelta(seconds=30), max_future_skew=timedelta(0))
    result = validate_event(value, NOW, other)
    assert isinstance(result, InvalidEvent) and result.reason == "out_of_range_time"


# -- line ---------------------------------------------------------------------------------------------


def test_line_is_the_received_bytes_with_unknown_fields_kept() -> None:
    value = (
        b'{ "organization_id":"%s", "event_id":"%s","started_at":"2026-11-23T11:59:00Z",'
        % (
            ORG_ID.encode(),
            EVENT_ID.upper().encode(),
        )
        + b'"duration_ms":1.0,"x-custom":{"deep":[1,2.50,"\\u00e9"]},"request":"\\n"}  '
    )
    result = check(value)
    assert isinstance(result, ValidEvent)
    assert result.line is value


@pytest.mark.parametrize("option", [orjson.OPT_INDENT_2, None])
def test_a_value_with_line_breaks_is_stored_compact(option: int | None) -> None:
    original = event(extra={"nested": ["a\nb", 1]}, request={"body": "line1\r\nline2"})
    if option is None:
        value = orjson.dumps(original).replace(b",", b",\r\n")
    else:
        value = orjson.dumps(original, option=option)
    assert b"\n" in value
    result = check(value)
    assert isinstance(result, ValidEvent)
    assert b"\n" not in result.line and b"\r" not in result.line
    assert orjson.loads(result.line) == original


# -- invalid kinds ------------------------------------------------------------------------------------

U = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
INVALID_FIELDS: list[tuple[dict[str, Any], str, str]] = [
    ({"event_id": MISSING}, "missing_field", "event_id"),
    ({"organization_id": MISSING}, "missing_field", "organization_id"),
    ({"started_at": MISSING}, "missing_field", "started_at"),
    ({"duration_ms": MISSING}, "missing_field", "duration_ms"),
    ({"event_id": None}, "missing_field", "event_id"),
    ({"duration_ms": None}, "missing_field", "duration_ms"),
    ({"event_id": 7}, "bad_type", "event_id"),
    ({"organization_id": [ORG_ID]}, "bad_type", "organization_id"),
    ({"event_id": "not-a-uuid"}, "bad_uuid", "event_id"),
    ({"event_id": U.replace("-", "")}, "bad_uuid", "event_id"),
    ({"event_id": "{" + U + "}"}, "bad_uuid", "event_id"),
    ({"event_id": "urn:uuid:" + U}, "bad_uuid", "event_id"),
    ({"event_id": U + "\n"}, "bad_uuid", "event_id"),
    ({"event_id": " " + U[1:]}, "bad_uuid", "event_id"),
    ({"event_id": U[:-1] + "g"}, "bad_uuid", "event_id"),
    ({"server_id": "x"}, "bad_uuid", "server_id"),
    ({"session_id": 1}, "bad_type", "session_id"),
    ({"virtual_server_id": "x"}, "bad_uuid", "virtual_server_id"),
    ({"client_id": U[:35]}, "bad_uuid", "client_id"),
    ({"connection_id": "x"}, "bad_uuid", "connection_id"),
    ({"project_id": "x"}, "bad_uuid", "project_id"),
    ({"api_key_id": True}, "bad_type", "api_key_id"),
    ({"started_at": "2026-11-23T11:59:00"}, "bad_timestamp", "started_at"),
    ({"started_at": "2026-11-23T11:59:00.123"}, "bad_timestamp", "started_at"),
    ({"started_at": "2026-11-23 11:59:00Z"}, "bad_timestamp", "started_at"),
    ({"started_at": "2026-11-23"}, "bad_timestamp", "started_at"),
    ({"started_at": "20261123T115900Z"}, "bad_timestamp", "started_at"),
    ({"started_at": "2026-W47-1T11:59:00Z"}, "bad_timestamp", "started_at"),
    ({"started_at": "2026-11-23T11:59:00,5Z"}, "bad_timestamp", "started_at"),
    ({"started_at": "2026-11-23T11:59Z"}, "bad_timestamp", "started_at"),
    ({"started_at": "2026-02-30T11:59:00Z"}, "bad_timestamp", "started_at"),
    ({"started_at": "2026-11-23T23:59:60Z"}, "bad_timestamp", "started_at"),
    ({"started_at": "2026-11-23T24:00:00Z"}, "bad_timestamp", "started_at"),
    ({"started_at": "2026-11-23T11:59:00+05:60"}, "bad_timestamp", "started_at"),
    ({"started_at": "2026-11-23T11:59:00+24:00"}, "bad_timestamp", "started_at"),
    ({"started_at": "0000-01-01T00:00:00Z"}, "bad_timestamp", "started_at"),
    ({"started_at": "2026-11-23T11:59:00Z\n"}, "bad_timestamp", "started_at"),
    ({"started_at": "２０２６-11-23T11:59:00Z"}, "bad_timestamp", "started_at"),
    ({"started_at": 1790000000}, "bad_type", "started_at"),
    ({"duration_ms": -1}, "negative_value", "duration_ms"),
    ({"duration_ms": 1.5}, "bad_type", "duration_ms"),
    ({"duration_ms": True}, "bad_type", "duration_ms"),
    ({"duration_ms": "5"}, "bad_type", "duration_ms"),
    ({"duration_ms": 2**31}, "out_of_range", "duration_ms"),
    ({"duration_ms": 1e300}, "out_of_range", "duration_ms"),
    ({"schema_version": 2}, "unsupported_schema_version", "schema_version"),
    ({"schema_version": 0}, "unsupported_schema_version", "schema_version"),
    ({"schema_version": "1"}, "bad_type", "schema_version"),
    ({"schema_version": True}, "bad_type", "schema_version"),
    ({"rpc_method": "m" * 101}, "too_long", "rpc_method"),
    ({"rpc_method": 3}, "bad_type", "rpc_method"),
    ({"rpc_method": "tools\x00call"}, "bad_type", "rpc_method"),
    ({"user_id": "u" * 256}, "too_long", "user_id"),
    ({"user_id": 12}, "bad_type", "user_id"),
    ({"model": "m" * 51}, "too_long", "model"),
    ({"model": "\x00"}, "bad_type", "model"),
    ({"mcp_tool_name": "t" * 256}, "too_long", "mcp_tool_name"),
    ({"mcp_tool_name": {}}, "bad_type", "mcp_tool_name"),
    ({"level": "warning"}, "bad_enum", "level"),
    ({"level": "INFO"}, "bad_enum", "level"),
    ({"level": 3}, "bad_type", "level"),
    ({"level": ["info"]}, "bad_type", "level"),
    ({"event_type": "api"}, "bad_enum", "event_type"),
    ({"status": "ok"}, "bad_enum", "status"),
    ({"status": {"a": 1}}, "bad_type", "status"),
    ({"status_code": 99}, "out_of_range", "status_code"),
    ({"status_code": 600}, "out_of_range", "status_code"),
    ({"status_code": -1}, "out_of_range", "status_code"),
    ({"status_code": "200"}, "bad_type", "status_code"),
    ({"error": "yes"}, "bad_type", "error"),
    ({"error": 1}, "bad_type", "error"),
    ({"bytes_in": -1}, "negative_value", "bytes_in"),
    ({"bytes_out": 2**40 + 1}, "out_of_range", "bytes_out"),
    ({"bytes_in": 0.5}, "bad_type", "bytes_in"),
    ({"remote_ip": "1.2.3"}, "bad_ip", "remote_ip"),
    ({"remote_ip": "01.2.3.4"}, "bad_ip", "remote_ip"),
    ({"remote_ip": "256.1.1.1"}, "bad_ip", "remote_ip"),
    ({"remote_ip": "1.2.3.4/32"}, "bad_ip", "remote_ip"),
    ({"remote_ip": "fe80::1%eth0"}, "bad_ip", "remote_ip"),
    ({"remote_ip": "1::2::3"}, "bad_ip", "remote_ip"),
    ({"remote_ip": "localhost"}, "bad_ip", "remote_ip"),
    ({"remote_ip": " 1.2.3.4"}, "bad_ip", "remote_ip"),
    ({"remote_ip": 16909060}, "bad_type", "remote_ip"),
    ({"input_tokens": -5}, "negative_value", "input_tokens"),
    ({"output_tokens": 2**31}, "out_of_range", "output_tokens"),
    ({"cache_read_tokens": "1"}, "bad_type", "cache_read_tokens"),
    ({"cache_write_tokens": -1.0}, "negative_value", "cache_write_tokens"),
    ({"cost_cents": 1.25}, "bad_type", "cost_cents"),
    ({"time_to_first_token_ms": -1}, "negative_value", "time_to_first_token_ms"),
    ({"redaction_version": 2**31}, "out_of_range", "redaction_version"),
    ({"redaction_version": "v1"}, "bad_type", "redaction_version"),
]


@pytest.mark.parametrize(("fields", "reason", "field"), INVALID_FIELDS)
def test_invalid_field(fields: dict[str, Any], reason: str, field: str) -> None:
    result = invalid(**fields)
    assert result.reason == reason
    assert result.detail.startswith(f"{field}:"), result.detail


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "not_json"),
        (b"", "not_json"),
        (b"{", "not_json"),
        (b'{"a":1}{"b":2}', "not_json"),
        (b"{'a': 1}", "not_json"),
        (b'{"a": NaN}', "not_json"),
        (b'{"a": "\\ud800"}', "not_json"),
        (b"\xef\xbb\xbf{}", "not_json"),
        (b"\xff\xfe{}", "not_utf8"),
        (b'{"event_id": "\xc3\x28"}', "not_utf8"),
        (b'{"a": "\xed\xa0\x80"}', "not_utf8"),
        (b"[]", "not_object"),
        (b"null", "not_object"),
        (b'"{}"', "not_object"),
        (b"42", "not_object"),
    ],
)
def test_undecodable_values(value: bytes | None, reason: str) -> None:
    result = check(value)
    assert isinstance(result, InvalidEvent)
    assert result.reason == reason
    assert result.detail


def test_tombstone_detail_says_so() -> None:
    result = check(None)
    assert isinstance(result, InvalidEvent) and "tombstone" in result.detail


def test_the_first_broken_rule_in_contract_order_wins() -> None:
    assert invalid(schema_version=2, event_id=MISSING).reason == "unsupported_schema_version"
    assert invalid(event_id="x", duration_ms=-1).detail.startswith("event_id:")
    assert invalid(started_at="2000-01-01T00:00:00Z", level="loud").reason == "bad_enum"


def test_details_stay_short() -> None:
    assert len(invalid(event_id="x" * 100_000).detail) < 200


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_never_raises_on_arbitrary_bytes(value: bytes) -> None:
    assert isinstance(check(value), ValidEvent | InvalidEvent)


# -- schema file and command --------------------------------------------------------------------------


def test_shipped_schema_is_a_valid_draft_2020_12_schema() -> None:
    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["required"] == ["event_id", "organization_id", "started_at", "duration_ms"]


def test_schema_command_prints_the_shipped_schema() -> None:
    result = CliRunner().invoke(schema_command, [])
    assert result.exit_code == 0, result.output
    assert orjson.loads(result.output) == load_schema()
