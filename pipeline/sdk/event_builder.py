"""A typed builder for the gateway request event (docs/contract.md §1, schema version 1).

`GatewayRequestEvent` has one attribute per contract field and checks the contract's rules when it
is built, so a mistake fails in the gateway (where it can be fixed) rather than in the dead-letter
topic. `to_dict()` gives the JSON object the producer encodes: UUIDs as lower-case text,
`started_at` as RFC 3339 UTC with milliseconds and `Z`, unset optional fields left out.
"""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, Final

import uuid_utils

from pipeline.contract.fields import (
    FIELDS,
    REQUIRED_NAMES,
    SCHEMA_VERSION,
    EventType,
    Kind,
    Level,
    UsageStatus,
)
from pipeline.contract.fields import Field as ContractField

__all__ = ["EventType", "GatewayRequestEvent", "Level", "UsageStatus", "format_timestamp", "new_event_id"]

UuidLike = str | uuid.UUID | uuid_utils.UUID

# The fields the builder checks: every typed field of the table but schema_version, which it sets.
_CHECKED: Final = tuple(f for f in FIELDS if f.kind not in {Kind.ANY, Kind.VERSION})


def new_event_id() -> str:
    """A fresh UUIDv7 (time-ordered, so index pages fill in order) as lower-case text."""
    return str(uuid_utils.uuid7())


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with milliseconds and `Z`, e.g. `2026-11-23T05:20:42.123Z`."""
    if moment.tzinfo is None:
        raise ValueError("started_at must be timezone-aware (naive datetimes are ambiguous)")
    utc = moment.astimezone(UTC)
    return (
        f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}T{utc.hour:02d}:{utc.minute:02d}:"
        f"{utc.second:02d}.{utc.microsecond // 1000:03d}Z"
    )


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class GatewayRequestEvent:
    """One request through the gateway. Required: organization_id, started_at, duration_ms."""

    organization_id: UuidLike
    started_at: datetime
    duration_ms: int
    event_id: UuidLike = field(default_factory=new_event_id)
    server_id: UuidLike | None = None
    session_id: UuidLike | None = None
    virtual_server_id: UuidLike | None = None
    rpc_method: str | None = None
    level: Level | None = None
    status_code: int | None = None
    error: bool | None = None
    bytes_in: int | None = None
    bytes_out: int | None = None
    user_id: str | None = None
    remote_ip: str | None = None
    client_id: UuidLike | None = None
    connection_id: UuidLike | None = None
    project_id: UuidLike | None = None
    api_key_id: UuidLike | None = None
    model: str | None = None
    event_type: EventType | None = None
    status: UsageStatus | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_write_tokens: int | None = None
    cost_cents: int | None = None
    time_to_first_token_ms: int | None = None
    mcp_tool_name: str | None = None
    redaction_version: int | None = None
    request: Any = None
    response: Any = None
    headers: Any = None
    metadata: Any = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # unknown fields, kept as given

    def __post_init__(self) -> None:
        # The bounds and enumerations are the validator's (pipeline.contract.fields), so an event
        # this accepts is one the ingest worker accepts (bar the started_at window, which depends
        # on the worker's clock).
        for spec in _CHECKED:
            value = getattr(self, spec.name)
            if value is None:
                if spec.required:
                    raise TypeError(f"{spec.name}: required")
                continue
            checked = _check(spec, value)
            if checked is not value:
                setattr(self, spec.name, checked)
        clash = _FIELD_NAMES.intersection(self.extra)
        if clash:
            raise ValueError(f"extra fields may not reuse contract names: {sorted(clash)}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of docs/contract.md §1 (unset optional fields omitted)."""
        out: dict[str, Any] = {
            "event_id": self.event_id,
            "organization_id": self.organization_id,
            "started_at": format_timestamp(self.started_at),
            "duration_ms": self.duration_ms,
            "schema_version": SCHEMA_VERSION,
        }
        for name in _OPTIONAL_NAMES:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        out.update(self.extra)
        return out

    @property
    def key(self) -> bytes:
        """The recommended Kafka message key: `<organization_id>:<server_id or _>`."""
        return f"{self.organization_id}:{self.server_id or '_'}".encode()


_FIELD_NAMES: Final = frozenset(f.name for f in fields(GatewayRequestEvent) if f.name != "extra") | {
    "schema_version"
}
_OPTIONAL_NAMES: Final = tuple(
    f.name for f in fields(GatewayRequestEvent) if f.name not in {*REQUIRED_NAMES, "extra"}
)


def _check(spec: ContractField, value: object) -> object:
    """`value` as the event carries it (a UUID becomes its text), or TypeError/ValueError."""
    name = spec.name
    match spec.kind:
        case Kind.UUID:
            return _uuid_text(name, value)
        case Kind.TIMESTAMP:
            if not isinstance(value, datetime):
                raise TypeError(f"{name}: expected a datetime, got {type(value).__name__}")
            if value.tzinfo is None:
                raise ValueError(f"{name} must be timezone-aware (naive datetimes are ambiguous)")
        case Kind.INTEGER:
            assert spec.minimum is not None and spec.maximum is not None
            _int_range(name, value, spec.minimum, spec.maximum)
        case Kind.TEXT:
            assert spec.max_length is not None
            _text(name, value, spec.max_length)
        case Kind.CHOICE:
            if value not in spec.choices:
                raise ValueError(f"{name}: expected one of {sorted(spec.choices)}, got {value!r}")
        case Kind.BOOLEAN:
            if type(value) is not bool:
                raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
        case Kind.IP:
            if not isinstance(value, str):
                raise TypeError(f"{name}: expected a str, got {type(value).__name__}")
            _ip(value)
        case Kind.VERSION | Kind.ANY:
            pass
    return value


def _uuid_text(name: str, value: object) -> str:
    if isinstance(value, uuid.UUID | uuid_utils.UUID):
        return str(value)
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a UUID, got {type(value).__name__}")
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        raise ValueError(f"{name}: not a UUID: {value!r}") from None
    text = str(parsed)
    if text != value.lower():  # uuid.UUID also accepts braces, URNs and missing dashes
        raise ValueError(f"{name}: expected the 8-4-4-4-12 UUID form, got {value!r}")
    return text


def _int_range(name: str, value: object, low: int, high: int) -> None:
    if type(value) is not int:
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name}: must be {low}..{high}, got {value}")


def _text(name: str, value: object, limit: int) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected a str, got {type(value).__name__}")
    if len(value) > limit:
        raise ValueError(f"{name}: at most {limit} characters, got {len(value)}")
    if "\x00" in value:
        raise ValueError(f"{name}: the NUL character is not allowed")


def _ip(value: str) -> None:
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"remote_ip: not an IPv4 or IPv6 literal: {value!r}") from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        raise ValueError(f"remote_ip: zone indexes are not allowed: {value!r}")
