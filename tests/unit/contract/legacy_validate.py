"""The validator as it was before the remembered ids (commit ab9a8ef), kept as the test oracle.

`tests/unit/contract/test_validate_equivalence.py` holds the product's `validate_event` to this
one's verdict (the same event fields, or the same reason and detail) on generated input; the bench
(`bench/validate_speed.py`) times the two side by side. Its rules module is the product's (`rules`
is unchanged), so this file is only the order of the checks and their quick tests. Not to be
edited except to follow a deliberate change of the contract.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

import orjson

from pipeline.contract import rules
from pipeline.contract.fields import (
    BYTES_MAX,
    ERROR_LEVELS,
    EVENT_TYPES,
    INT32_MAX,
    INT32_MIN,
    LEVELS,
    MCP_TOOL_NAME_MAX,
    MODEL_MAX,
    RPC_METHOD_MAX,
    STATUS_CODE_MAX,
    STATUS_CODE_MIN,
    STATUSES,
    USER_ID_MAX,
)
from pipeline.contract.rules import IPV4_MATCH, LOWER_UUID_MATCH, Reject
from pipeline.contract.validate import InvalidEvent, ValidationPolicy, ValidEvent

__all__ = ["validate_event"]

# Sets for the membership tests of the hot path (the table holds them as ordered tuples).
_LEVELS: Final = frozenset(LEVELS)
_EVENT_TYPES: Final = frozenset(EVENT_TYPES)
_STATUSES: Final = frozenset(STATUSES)


# The accepted started_at window for the last (now, policy) seen: a batch validates with one clock
# reading, so the window is computed once per batch rather than once per event. One tuple, replaced
# whole, so concurrent callers never pair a window with another call's key.
_window: tuple[datetime, ValidationPolicy, datetime, datetime] | None = None
_LOWEST: Final = datetime.min.replace(tzinfo=UTC)
_LINE_BREAKS_TO_SPACES: Final = bytes.maketrans(b"\r\n", b"  ")
_HIGHEST: Final = datetime.max.replace(tzinfo=UTC)
_new_object: Final = object.__new__


def _window_for(now: datetime, policy: ValidationPolicy) -> tuple[datetime, datetime]:
    global _window
    try:
        low = max(now - policy.max_age, _LOWEST)
    except OverflowError:
        low = _LOWEST
    try:
        high = min(now + policy.max_future_skew, _HIGHEST)
    except OverflowError:
        high = _HIGHEST
    _window = (now, policy, low, high)
    return low, high


def _decode_failure(value: bytes, exc: orjson.JSONDecodeError) -> InvalidEvent:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError as bad:
        return InvalidEvent("not_utf8", f"byte {bad.start}: {bad.reason}")
    return InvalidEvent("not_json", str(exc))


def validate_event(value: bytes | None, now: datetime, policy: ValidationPolicy) -> ValidEvent | InvalidEvent:
    """Validate one Kafka message value at `now` (tz-aware) under `policy`.

    `now` is the reference of the accepted `started_at` window: the worker passes the record's
    Kafka timestamp (capped at its own clock), so a replayed message gets the same verdict. The
    window is recomputed only when `now` changes.
    Never raises for any input bytes: an `InvalidEvent` says why (its `reason` is a metric label);
    an unexpected exception is an `internal_error` naming the exception class.
    """
    try:
        return _validate(value, now, policy)
    except Exception as exc:
        detail = f"{type(exc).__name__}: {exc}"
        return InvalidEvent("internal_error", detail[:512], type(exc).__name__)


def _validate(value: bytes | None, now: datetime, policy: ValidationPolicy) -> ValidEvent | InvalidEvent:
    if value is None:
        return InvalidEvent("not_json", "value is null (a tombstone), not a JSON object")
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return _decode_failure(value, exc)
    if type(obj) is not dict:
        return InvalidEvent("not_object", f"expected a JSON object, got {rules.type_name(obj)}")
    try:
        return _event(obj, value, now, policy)
    except Reject as reject:
        return InvalidEvent(reject.reason, reject.detail)


def _event(obj: dict[str, Any], value: bytes, now: datetime, policy: ValidationPolicy) -> ValidEvent:
    # Each field: a quick inline test of the common valid form; anything else goes to `rules`,
    # which accepts the rarer valid forms or raises Reject. Order = the documented reason order.
    get = obj.get
    version = get("schema_version")
    if version is not None and (type(version) is not int or version != 1):
        rules.schema_version(version)

    event_id = get("event_id")
    if event_id is None:
        rules.missing("event_id")
    if type(event_id) is not str or LOWER_UUID_MATCH(event_id) is None:
        event_id = rules.uuid_text("event_id", event_id)
    organization_id = get("organization_id")
    if organization_id is None:
        rules.missing("organization_id")
    if type(organization_id) is not str or LOWER_UUID_MATCH(organization_id) is None:
        organization_id = rules.uuid_text("organization_id", organization_id)
    started_at = rules.timestamp(get("started_at"))
    duration_ms = get("duration_ms")
    if duration_ms is None:
        rules.missing("duration_ms")
    if type(duration_ms) is not int or not 0 <= duration_ms <= INT32_MAX:
        duration_ms = rules.integer("duration_ms", duration_ms, 0, INT32_MAX)

    server_id = get("server_id")
    if server_id is not None and (type(server_id) is not str or LOWER_UUID_MATCH(server_id) is None):
        server_id = rules.uuid_text("server_id", server_id)
    session_id = get("session_id")
    if session_id is not None and (type(session_id) is not str or LOWER_UUID_MATCH(session_id) is None):
        session_id = rules.uuid_text("session_id", session_id)
    virtual_server_id = get("virtual_server_id")
    if virtual_server_id is not None and (
        type(virtual_server_id) is not str or LOWER_UUID_MATCH(virtual_server_id) is None
    ):
        virtual_server_id = rules.uuid_text("virtual_server_id", virtual_server_id)
    rpc_method = get("rpc_method")
    if rpc_method is not None and (
        type(rpc_method) is not str or len(rpc_method) > RPC_METHOD_MAX or "\x00" in rpc_method
    ):
        rules.bad_text("rpc_method", rpc_method, RPC_METHOD_MAX)
    level = get("level")
    if level is None:
        level = "info"
    elif type(level) is not str or level not in _LEVELS:
        rules.bad_choice("level", level, _LEVELS)
    status_code = get("status_code")
    if status_code is not None and (
        type(status_code) is not int or not STATUS_CODE_MIN <= status_code <= STATUS_CODE_MAX
    ):
        status_code = rules.integer("status_code", status_code, STATUS_CODE_MIN, STATUS_CODE_MAX)
    error = get("error")
    if error is None:
        error = (status_code is not None and status_code >= 400) or level in ERROR_LEVELS
    elif type(error) is not bool:
        rules.bad_bool("error", error)
    bytes_in = get("bytes_in")
    if bytes_in is None:
        bytes_in = 0
    elif type(bytes_in) is not int or not 0 <= bytes_in <= BYTES_MAX:
        bytes_in = rules.integer("bytes_in", bytes_in, 0, BYTES_MAX)
    bytes_out = get("bytes_out")
    if bytes_out is None:
        bytes_out = 0
    elif type(bytes_out) is not int or not 0 <= bytes_out <= BYTES_MAX:
        bytes_out = rules.integer("bytes_out", bytes_out, 0, BYTES_MAX)
    user_id = get("user_id")
    if user_id is not None and (type(user_id) is not str or len(user_id) > USER_ID_MAX or "\x00" in user_id):
        rules.bad_text("user_id", user_id, USER_ID_MAX)
    remote_ip = get("remote_ip")
    if remote_ip is not None and (type(remote_ip) is not str or IPV4_MATCH(remote_ip) is None):
        remote_ip = rules.ip_text(remote_ip)
    client_id = get("client_id")
    if client_id is not None and (type(client_id) is not str or LOWER_UUID_MATCH(client_id) is None):
        client_id = rules.uuid_text("client_id", client_id)
    connection_id = get("connection_id")
    if connection_id is not None and (
        type(connection_id) is not str or LOWER_UUID_MATCH(connection_id) is None
    ):
        connection_id = rules.uuid_text("connection_id", connection_id)
    project_id = get("project_id")
    if project_id is not None and (type(project_id) is not str or LOWER_UUID_MATCH(project_id) is None):
        project_id = rules.uuid_text("project_id", project_id)
    api_key_id = get("api_key_id")
    if api_key_id is not None and (type(api_key_id) is not str or LOWER_UUID_MATCH(api_key_id) is None):
        api_key_id = rules.uuid_text("api_key_id", api_key_id)
    model = get("model")
    if model is not None and (type(model) is not str or len(model) > MODEL_MAX or "\x00" in model):
        rules.bad_text("model", model, MODEL_MAX)
    event_type = get("event_type")
    if event_type is not None and (type(event_type) is not str or event_type not in _EVENT_TYPES):
        rules.bad_choice("event_type", event_type, _EVENT_TYPES)
    status = get("status")
    if status is not None and (type(status) is not str or status not in _STATUSES):
        rules.bad_choice("status", status, _STATUSES)
    input_tokens = get("input_tokens")
    if input_tokens is not None and (type(input_tokens) is not int or not 0 <= input_tokens <= INT32_MAX):
        input_tokens = rules.integer("input_tokens", input_tokens, 0, INT32_MAX)
    output_tokens = get("output_tokens")
    if output_tokens is not None and (type(output_tokens) is not int or not 0 <= output_tokens <= INT32_MAX):
        output_tokens = rules.integer("output_tokens", output_tokens, 0, INT32_MAX)
    cache_read = get("cache_read_tokens")
    if cache_read is not None and (type(cache_read) is not int or not 0 <= cache_read <= INT32_MAX):
        cache_read = rules.integer("cache_read_tokens", cache_read, 0, INT32_MAX)
    cache_write = get("cache_write_tokens")
    if cache_write is not None and (type(cache_write) is not int or not 0 <= cache_write <= INT32_MAX):
        cache_write = rules.integer("cache_write_tokens", cache_write, 0, INT32_MAX)
    cost_cents = get("cost_cents")
    if cost_cents is not None and (type(cost_cents) is not int or not 0 <= cost_cents <= INT32_MAX):
        cost_cents = rules.integer("cost_cents", cost_cents, 0, INT32_MAX)
    ttft_ms = get("time_to_first_token_ms")
    if ttft_ms is not None and (type(ttft_ms) is not int or not 0 <= ttft_ms <= INT32_MAX):
        ttft_ms = rules.integer("time_to_first_token_ms", ttft_ms, 0, INT32_MAX)
    mcp_tool_name = get("mcp_tool_name")
    if mcp_tool_name is not None and (
        type(mcp_tool_name) is not str or len(mcp_tool_name) > MCP_TOOL_NAME_MAX or "\x00" in mcp_tool_name
    ):
        rules.bad_text("mcp_tool_name", mcp_tool_name, MCP_TOOL_NAME_MAX)
    redaction_version = get("redaction_version")
    if redaction_version is not None and (
        type(redaction_version) is not int or not INT32_MIN <= redaction_version <= INT32_MAX
    ):
        redaction_version = rules.integer("redaction_version", redaction_version, INT32_MIN, INT32_MAX)

    window = _window
    if window is not None and window[0] == now and window[1] is policy:
        low, high = window[2], window[3]
    else:
        low, high = _window_for(now, policy)
    if not low <= started_at <= high:
        raise Reject(
            "out_of_range_time",
            f"started_at: {started_at.isoformat()} is outside [{low.isoformat()}, {high.isoformat()}]",
        )

    # JSON Lines holds one event per line. In valid JSON a raw CR or LF byte can only be whitespace
    # between tokens (inside strings they must be escaped, and UTF-8 never uses those bytes in a
    # multi-byte character), so turning them into spaces keeps the value's meaning, length and
    # every other byte: no re-serialisation, hence no depth limit and no precision loss.
    # (An int needle makes `in` a plain memchr: several times faster than a bytes needle.)
    line = value.translate(_LINE_BREAKS_TO_SPACES) if 10 in value or 13 in value else value
    # Built by named assignments, not through the keyword __init__: matching 31 keyword arguments
    # costs about 1.5 µs per event (15% of this function, measured); an assignment costs what a
    # positional argument does, and names each value. Tests check that every field is set.
    event: ValidEvent = _new_object(ValidEvent)
    event.line = line
    event.event_id = event_id
    event.organization_id = organization_id
    event.started_at = started_at
    event.duration_ms = duration_ms
    event.server_id = server_id
    event.session_id = session_id
    event.virtual_server_id = virtual_server_id
    event.rpc_method = rpc_method
    event.level = level
    event.status_code = status_code
    event.error = error
    event.bytes_in = bytes_in
    event.bytes_out = bytes_out
    event.user_id = user_id
    event.remote_ip = remote_ip
    event.client_id = client_id
    event.connection_id = connection_id
    event.project_id = project_id
    event.api_key_id = api_key_id
    event.model = model
    event.event_type = event_type
    event.status = status
    event.input_tokens = input_tokens
    event.output_tokens = output_tokens
    event.cache_read_tokens = cache_read
    event.cache_write_tokens = cache_write
    event.cost_cents = cost_cents
    event.time_to_first_token_ms = ttft_ms
    event.mcp_tool_name = mcp_tool_name
    event.redaction_version = redaction_version
    return event
