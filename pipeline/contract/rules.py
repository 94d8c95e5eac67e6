"""The rules of docs/contract.md §1 that `validate_event` applies, and their explanations.

`validate_event` tests the common case inline (one type check and one comparison or pattern match
per field). Only when that quick test fails does it call a function here, which either accepts a
less common valid form (an integral float, an upper-case UUID) or raises `Reject` naming the rule.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import UTC, datetime
from typing import Final, NoReturn

from pipeline.contract.fields import (
    INT32_MAX,
    INT32_MIN,
    SCHEMA_VERSION,
    TIMESTAMP_PATTERN,
    UUID_PATTERN,
    InvalidReason,
)

# Canonical (lower-case) UUID text: the common case, accepted without a copy.
LOWER_UUID_MATCH: Final = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z", re.ASCII
).match
_UUID_MATCH: Final = re.compile(UUID_PATTERN + r"\Z", re.ASCII).match
_TIMESTAMP_MATCH: Final = re.compile(TIMESTAMP_PATTERN + r"\Z", re.ASCII).match
# Exactly what ipaddress.IPv4Address accepts: four decimal octets, no leading zeros.
IPV4_MATCH: Final = re.compile(
    r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\Z",
    re.ASCII,
).match


class Reject(Exception):
    """A broken rule; raised only for invalid events."""

    def __init__(self, reason: InvalidReason, detail: str) -> None:
        super().__init__(detail)
        self.reason: InvalidReason = reason
        self.detail = detail


def show(value: object) -> str:
    """A short repr for a detail message (dead letters must stay small)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_JSON_TYPES: Final = {
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    list: "array",
    dict: "object",
}


def type_name(value: object) -> str:
    return "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)


def missing(name: str) -> NoReturn:
    raise Reject("missing_field", f"{name}: required")


def uuid_text(name: str, value: object) -> str:
    """A UUID that is not canonical lower-case text: lower-cased, or rejected."""
    if type(value) is not str:
        raise Reject("bad_type", f"{name}: expected a UUID string, got {type_name(value)}")
    if _UUID_MATCH(value) is None:
        raise Reject("bad_uuid", f"{name}: not a UUID: {show(value)}")
    return value.lower()


def integer(name: str, value: object, minimum: int, maximum: int) -> int:
    """An integer that failed the quick test: an integral float within bounds, or rejected."""
    if type(value) is float and value.is_integer():
        number = int(value)
    elif type(value) is int:
        number = value
    else:
        raise Reject("bad_type", f"{name}: expected an integer, got {type_name(value)} {show(value)}")
    if number < minimum:
        if minimum == 0:
            raise Reject("negative_value", f"{name}: must be >= 0, got {show(number)}")
        raise Reject("out_of_range", f"{name}: must be {minimum}..{maximum}, got {show(number)}")
    if number > maximum:
        raise Reject("out_of_range", f"{name}: must be {minimum}..{maximum}, got {show(number)}")
    return number


def schema_version(value: object) -> None:
    """`schema_version` other than the integer 1 (or 1.0)."""
    if integer("schema_version", value, INT32_MIN, INT32_MAX) != SCHEMA_VERSION:
        raise Reject("unsupported_schema_version", f"schema_version: {show(value)} (this worker reads 1)")


def bad_text(name: str, value: object, max_length: int) -> NoReturn:
    if type(value) is not str:
        raise Reject("bad_type", f"{name}: expected a string, got {type_name(value)}")
    if len(value) > max_length:
        raise Reject("too_long", f"{name}: at most {max_length} characters, got {len(value)}")
    # PostgreSQL text cannot hold U+0000: storing it would fail the whole batch.
    raise Reject("bad_type", f"{name}: the NUL character (U+0000) is not allowed")


def bad_choice(name: str, value: object, allowed: frozenset[str]) -> NoReturn:
    if type(value) is not str:
        raise Reject("bad_type", f"{name}: expected a string, got {type_name(value)}")
    raise Reject("bad_enum", f"{name}: expected one of {', '.join(sorted(allowed))}, got {show(value)}")


def bad_bool(name: str, value: object) -> NoReturn:
    raise Reject("bad_type", f"{name}: expected a boolean, got {type_name(value)}")


def timestamp(value: object) -> datetime:
    """`started_at` as a UTC datetime."""
    if value is None:
        missing("started_at")
    if type(value) is not str:
        raise Reject("bad_type", f"started_at: expected an RFC 3339 string, got {type_name(value)}")
    if _TIMESTAMP_MATCH(value) is None:
        raise Reject("bad_timestamp", f"started_at: not an RFC 3339 timestamp with offset: {show(value)}")
    if value[10] == "t" or value[-1] == "z":
        value = value.upper()  # RFC 3339 allows lower case; fromisoformat does not
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise Reject("bad_timestamp", f"started_at: no such date or time: {show(value)}") from None
    if parsed.tzinfo is not UTC:
        try:
            parsed = parsed.astimezone(UTC)
        except OverflowError:
            raise Reject("out_of_range_time", f"started_at: {value} is outside any window") from None
    return parsed


def ip_text(value: object) -> str:
    """A `remote_ip` that is not a plain IPv4 literal: an IPv6 literal, or rejected."""
    if type(value) is not str:
        raise Reject("bad_type", f"remote_ip: expected a string, got {type_name(value)}")
    if ":" in value:
        try:
            address = ipaddress.IPv6Address(value)
        except ValueError:
            pass
        else:
            # PostgreSQL INET has no zone index ("fe80::1%eth0"); JSON Schema's ipv6 neither.
            if address.scope_id is None:
                return value
    raise Reject("bad_ip", f"remote_ip: not an IPv4 or IPv6 literal: {show(value)}")
