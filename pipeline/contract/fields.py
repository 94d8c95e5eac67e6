"""The gateway request event, schema version 1 (docs/contract.md §1), as one table.

Everything else that knows the event's shape reads it from here: the validator
(`pipeline.contract.validate`) takes its bounds and enumerations from these constants, the JSON
Schema (`pipeline.contract.schema`) is generated from `FIELDS`, and the producer SDK's builder
(`pipeline.sdk.event_builder`) checks the same bounds before an event leaves the gateway.

`FIELDS` is in the contract's table order, which is also the order of rejection: when several
rules are broken, the reason given is that of the first field in this order (after decoding and
"is it an object"). Tests hold the validator to that order.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Literal, get_args

SCHEMA_VERSION: Final = 1

Level = Literal["trace", "debug", "info", "warn", "error", "fatal"]
EventType = Literal["api_call", "mcp_tool", "streaming"]
UsageStatus = Literal["success", "error", "timeout", "rate_limited"]

LEVELS: Final[tuple[str, ...]] = get_args(Level)
ERROR_LEVELS: Final = frozenset({"error", "fatal"})
EVENT_TYPES: Final[tuple[str, ...]] = get_args(EventType)
STATUSES: Final[tuple[str, ...]] = get_args(UsageStatus)

INT32_MIN: Final = -(2**31)
INT32_MAX: Final = 2**31 - 1  # counters fit a PostgreSQL INTEGER column
BYTES_MAX: Final = 2**40  # 1 TiB: per-day sums stay far inside BIGINT
STATUS_CODE_MIN: Final = 100
STATUS_CODE_MAX: Final = 599
RPC_METHOD_MAX: Final = 100
USER_ID_MAX: Final = 255
MODEL_MAX: Final = 50
MCP_TOOL_NAME_MAX: Final = 255

# Pattern bodies (no anchors) shared by the validator and the JSON Schema.
UUID_PATTERN: Final = "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
# RFC 3339 date-time; the calendar (day of month, year 0) is left to the date parser.
TIMESTAMP_PATTERN: Final = (
    "[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])[Tt](?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
    "(?:\\.[0-9]+)?(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
)

InvalidReason = Literal[
    "not_utf8",
    "not_json",
    "not_object",
    "missing_field",
    "bad_type",
    "bad_uuid",
    "bad_timestamp",
    "bad_ip",
    "negative_value",
    "out_of_range",
    "too_long",
    "bad_enum",
    "out_of_range_time",
    "unsupported_schema_version",
    # Given by the worker, not by the validation rules:
    "expired",  # started_at's UTC day is before the retention horizon (its partition is dropped)
    "rejected_by_database",  # PostgreSQL refused the event's row (a data error no rule caught)
    "storage_unavailable",  # its organization's own bucket kept failing (docs/storage.md)
    "internal_error",  # an unexpected exception while decoding this one message
]
INVALID_REASONS: Final[tuple[str, ...]] = get_args(InvalidReason)


class Kind(StrEnum):
    """How a field's value is checked (and what JSON it takes)."""

    VERSION = "version"  # the integer SCHEMA_VERSION
    UUID = "uuid"  # 8-4-4-4-12 hex text, either case; stored lower-case
    TIMESTAMP = "timestamp"  # RFC 3339 date-time with an offset
    INTEGER = "integer"  # within [minimum, maximum]; an integral float counts
    TEXT = "text"  # at most max_length characters, no U+0000 (PostgreSQL text cannot hold it)
    CHOICE = "choice"  # one of `choices`
    BOOLEAN = "boolean"
    IP = "ip"  # an IPv4 or IPv6 literal, no zone index
    ANY = "any"  # any JSON: object storage only, never indexed


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    kind: Kind
    required: bool = False
    minimum: int | None = None
    maximum: int | None = None
    max_length: int | None = None
    choices: tuple[str, ...] = ()
    # What an absent or null value means, in words (None: it stays null). The validator computes it.
    default: str | None = None
    description: str | None = None


def _uuid(name: str, *, required: bool = False, description: str | None = None) -> Field:
    return Field(name, Kind.UUID, required=required, description=description)


def _counter(name: str) -> Field:
    return Field(name, Kind.INTEGER, minimum=0, maximum=INT32_MAX)


def _byte_counter(name: str) -> Field:
    description = "Default 0; at most 2^40 (1 TiB)."
    return Field(name, Kind.INTEGER, minimum=0, maximum=BYTES_MAX, default="0", description=description)


def _text(name: str, max_length: int, description: str | None = None) -> Field:
    return Field(name, Kind.TEXT, max_length=max_length, description=description)


def _data_plane(name: str) -> Field:
    return Field(name, Kind.ANY, description="Any JSON; stored in object storage only.")


FIELDS: Final[tuple[Field, ...]] = (
    Field(
        "schema_version",
        Kind.VERSION,
        default="1",
        description="Default 1; other versions are not read by this schema's consumers.",
    ),
    _uuid("event_id", required=True, description="Dedup key (UUIDv7 recommended)."),
    _uuid("organization_id", required=True),
    Field(
        "started_at",
        Kind.TIMESTAMP,
        required=True,
        description=(
            "RFC 3339 date-time with offset, e.g. 2026-11-23T05:20:42.123Z. Leap seconds are not accepted."
        ),
    ),
    Field("duration_ms", Kind.INTEGER, required=True, minimum=0, maximum=INT32_MAX),
    _uuid("server_id"),
    _uuid("session_id"),
    _uuid("virtual_server_id"),
    _text("rpc_method", RPC_METHOD_MAX, "e.g. tools/call"),
    Field("level", Kind.CHOICE, choices=LEVELS, default="info", description="Default info."),
    Field(
        "status_code",
        Kind.INTEGER,
        minimum=STATUS_CODE_MIN,
        maximum=STATUS_CODE_MAX,
        description=f"A protocol status code, {STATUS_CODE_MIN}..{STATUS_CODE_MAX}.",
    ),
    Field(
        "error",
        Kind.BOOLEAN,
        default="status_code >= 400, or level error or fatal",
        description="Default: status_code >= 400, or level error or fatal.",
    ),
    _byte_counter("bytes_in"),
    _byte_counter("bytes_out"),
    _text("user_id", USER_ID_MAX),
    Field("remote_ip", Kind.IP, description="An IPv4 or IPv6 literal (no zone index)."),
    _uuid("client_id"),
    _uuid("connection_id"),
    _uuid("project_id"),
    _uuid("api_key_id"),
    _text("model", MODEL_MAX),
    Field("event_type", Kind.CHOICE, choices=EVENT_TYPES),
    Field("status", Kind.CHOICE, choices=STATUSES),
    _counter("input_tokens"),
    _counter("output_tokens"),
    _counter("cache_read_tokens"),
    _counter("cache_write_tokens"),
    _counter("cost_cents"),
    _counter("time_to_first_token_ms"),
    _text("mcp_tool_name", MCP_TOOL_NAME_MAX),
    Field(
        "redaction_version",
        Kind.INTEGER,
        minimum=INT32_MIN,
        maximum=INT32_MAX,
        description="A signed 32-bit integer.",
    ),
    _data_plane("request"),
    _data_plane("response"),
    _data_plane("headers"),
    _data_plane("metadata"),
)

FIELDS_BY_NAME: Final = {f.name: f for f in FIELDS}
REQUIRED_NAMES: Final = tuple(f.name for f in FIELDS if f.required)
# The fields with a type: indexed in PostgreSQL (or, for schema_version, read by the worker).
TYPED_NAMES: Final = tuple(f.name for f in FIELDS if f.kind is not Kind.ANY)
DATA_PLANE_NAMES: Final = tuple(f.name for f in FIELDS if f.kind is Kind.ANY)
