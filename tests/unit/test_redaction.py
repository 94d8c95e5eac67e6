"""Emit-time redaction (paths and patterns) and the typed event builder."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.contract import ValidationPolicy, ValidEvent, validate_event
from pipeline.sdk.event_builder import GatewayRequestEvent, format_timestamp
from pipeline.sdk.producer import EventProducer
from pipeline.sdk.redaction import MARKER, RedactionConfig

ORG = "0190f0d8-0000-7000-8000-000000000001"
NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
POLICY = ValidationPolicy(max_age=timedelta(days=90), max_future_skew=timedelta(hours=1))


def test_paths_replace_whole_values_case_insensitively_through_lists() -> None:
    config = RedactionConfig(
        version=3, field_paths=("headers.authorization", "request.items.*.secret"), patterns=()
    )
    event = {
        "headers": {"Authorization": "Bearer abc", "accept": "application/json"},
        "request": {"items": [{"a": {"secret": 1}, "b": {"secret": [1, 2], "keep": "x"}}, "not-a-dict"]},
        "response": {"authorization": "stays: not on a configured path"},
    }
    out = config.redact(event)
    assert out["headers"] == {"Authorization": MARKER, "accept": "application/json"}
    assert out["request"]["items"][0] == {"a": {"secret": MARKER}, "b": {"secret": MARKER, "keep": "x"}}
    assert out["request"]["items"][1] == "not-a-dict"
    assert out["response"] == event["response"]
    assert out["redaction_version"] == 3
    # The caller's event is untouched.
    assert event["headers"]["Authorization"] == "Bearer abc"
    assert event["request"]["items"][0]["a"]["secret"] == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig", f"Authorization: {MARKER}"),
        ("token bearer abc-DEF_123.xyz== end", f"token {MARKER} end"),
        ("key=sk-proj-AbCdEfGhIjKlMnOpQrStUv123", f"key={MARKER}"),
        ("sk-ant-api03-abcdefghijklmnopqrstuvwx", MARKER),
        ("mail alice.smith+tag@example.co.uk now", f"mail {MARKER} now"),
        ("aws AKIAIOSFODNN7EXAMPLE", f"aws {MARKER}"),
        ("ghp_" + "a" * 36, MARKER),
        ("sk-short and plain words", "sk-short and plain words"),
        ("no secrets here: tools/call 200", "no secrets here: tools/call 200"),
    ],
)
def test_default_patterns(text: str, expected: str) -> None:
    assert RedactionConfig().redact_text(text) == expected


def test_patterns_scan_nested_free_form_fields_only() -> None:
    event = {
        "user_id": "bob@example.com",  # a typed index field: never rewritten by patterns
        "metadata": {"notes": ["contact bob@example.com", {"k": "sk-" + "x" * 20}], "n": 5, "ok": True},
        "extra_field": "bob@example.com",  # not in scan_fields
    }
    out = RedactionConfig().redact(event)
    assert out["user_id"] == "bob@example.com"
    assert out["metadata"] == {"notes": [f"contact {MARKER}", {"k": MARKER}], "n": 5, "ok": True}
    assert out["extra_field"] == "bob@example.com"


def test_config_refuses_paths_that_would_break_the_contract() -> None:
    with pytest.raises(ValueError, match="typed"):
        RedactionConfig(field_paths=("user_id",))
    with pytest.raises(ValueError, match="empty segment"):
        RedactionConfig(field_paths=("headers..x",))
    with pytest.raises(ValueError, match="scoped flag"):
        RedactionConfig(patterns=("(?i)secret",))
    with pytest.raises(ValueError, match="typed"):
        RedactionConfig(scan_fields=("organization_id",))


def test_producer_encoding_applies_redaction_and_key() -> None:
    producer = EventProducer("127.0.0.1:9", "t", redaction=RedactionConfig(version=7))
    server = str(uuid.uuid4())
    event = GatewayRequestEvent(
        organization_id=ORG,
        server_id=server,
        started_at=NOW,
        duration_ms=3,
        headers={"authorization": "Bearer x"},
        request={"params": {"arguments": {"password": "hunter2", "q": "mail a@b.io"}}},
    )
    key, value = producer.encode(event)
    decoded = orjson.loads(value)
    assert key == f"{ORG}:{server}".encode()
    assert decoded["headers"]["authorization"] == MARKER
    assert decoded["request"]["params"]["arguments"] == {"password": MARKER, "q": f"mail {MARKER}"}
    assert decoded["redaction_version"] == 7
    key, _ = producer.encode({"organization_id": ORG, "started_at": "x", "duration_ms": 1})
    assert key == f"{ORG}:_".encode()


def test_builder_formats_and_rejects() -> None:
    event = GatewayRequestEvent(
        organization_id=uuid.UUID(ORG), started_at=NOW + timedelta(microseconds=123_999), duration_ms=0
    )
    body = event.to_dict()
    assert body["started_at"] == "2026-03-10T12:00:00.123Z"
    assert body["organization_id"] == ORG
    assert uuid.UUID(body["event_id"]).version == 7
    assert set(body) == {"event_id", "organization_id", "started_at", "duration_ms", "schema_version"}
    with pytest.raises(ValueError, match="duration_ms"):
        GatewayRequestEvent(organization_id=ORG, started_at=NOW, duration_ms=-1)
    with pytest.raises(ValueError, match="timezone"):
        GatewayRequestEvent(organization_id=ORG, started_at=datetime(2026, 1, 1), duration_ms=1)
    with pytest.raises(ValueError, match="remote_ip"):
        GatewayRequestEvent(organization_id=ORG, started_at=NOW, duration_ms=1, remote_ip="10.0.0")
    with pytest.raises(ValueError, match="rpc_method"):
        GatewayRequestEvent(organization_id=ORG, started_at=NOW, duration_ms=1, rpc_method="x" * 101)
    with pytest.raises(ValueError, match="organization_id"):
        GatewayRequestEvent(organization_id="{" + ORG + "}", started_at=NOW, duration_ms=1)
    with pytest.raises(ValueError, match="extra"):
        GatewayRequestEvent(organization_id=ORG, started_at=NOW, duration_ms=1, extra={"level": "x"})
    assert (
        format_timestamp(datetime(2026, 1, 1, 1, 0, tzinfo=UTC) + timedelta(hours=-3))
        == "2025-12-31T22:00:00.000Z"
    )


# Everything the SDK can emit passes the worker's validator.

_uuids = st.uuids().map(str)
_ints = st.integers(0, 2**31 - 1)
_text = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=40)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8,
)


def _maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


_events = st.builds(
    GatewayRequestEvent,
    organization_id=st.uuids() | _uuids,
    started_at=st.datetimes(
        min_value=datetime(2026, 1, 1), max_value=datetime(2026, 3, 10, 12, 59), timezones=st.just(UTC)
    ),
    duration_ms=_ints,
    server_id=_maybe(_uuids),
    session_id=_maybe(_uuids),
    virtual_server_id=_maybe(_uuids),
    rpc_method=_maybe(st.text(max_size=100).filter(lambda s: "\x00" not in s)),
    level=_maybe(st.sampled_from(["trace", "debug", "info", "warn", "error", "fatal"])),
    status_code=_maybe(st.integers(100, 599)),
    error=_maybe(st.booleans()),
    bytes_in=_maybe(st.integers(0, 2**40)),
    bytes_out=_maybe(st.integers(0, 2**40)),
    user_id=_maybe(st.text(max_size=255).filter(lambda s: "\x00" not in s)),
    remote_ip=_maybe(st.ip_addresses().map(str)),
    client_id=_maybe(_uuids),
    connection_id=_maybe(_uuids),
    project_id=_maybe(_uuids),
    api_key_id=_maybe(_uuids),
    model=_maybe(st.text(max_size=50).filter(lambda s: "\x00" not in s)),
    event_type=_maybe(st.sampled_from(["api_call", "mcp_tool", "streaming"])),
    status=_maybe(st.sampled_from(["success", "error", "timeout", "rate_limited"])),
    input_tokens=_maybe(_ints),
    output_tokens=_maybe(_ints),
    cache_read_tokens=_maybe(_ints),
    cache_write_tokens=_maybe(_ints),
    cost_cents=_maybe(_ints),
    time_to_first_token_ms=_maybe(_ints),
    mcp_tool_name=_maybe(st.text(max_size=255).filter(lambda s: "\x00" not in s)),
    request=_json,
    response=_json,
    headers=_maybe(st.dictionaries(_text, _text, max_size=4)),
    metadata=_json,
    extra=st.dictionaries(st.sampled_from(["trace_id", "region", "x_custom"]), _json, max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(event=_events, redact=st.booleans())
def test_everything_the_sdk_emits_passes_the_validator(event: GatewayRequestEvent, redact: bool) -> None:
    producer = EventProducer("127.0.0.1:9", "t", redaction=RedactionConfig() if redact else None)
    _, value = producer.encode(event)
    result = validate_event(value, NOW, POLICY)
    assert isinstance(result, ValidEvent), (result, value[:300])
    assert result.event_id == str(event.event_id)
    assert result.duration_ms == event.duration_ms
    if redact:
        assert result.redaction_version == 1
