"""Raw usage rows (seed 001 §4.1, §4.3 as adapted in 0002_usage.sql), written in the batch
transaction for the events seen for the first time, so no unique key is needed.

- `usage_events`: one row per event carrying usage fields (`ValidEvent.has_usage`).
- `mcp_usage`: one row per MCP tool call, i.e. an event with `event_type = 'mcp_tool'` or an
  `mcp_tool_name`, that names its server (`server_id` is NOT NULL there).

Mappings (docs/aggregates.md): `request_id` = event_id, `latency_ms` = duration_ms; a missing
`status` is 'error' when the event is an error, else 'success'; in mcp_usage `rate_limited`
becomes the seed's 'blocked', `tool_name` falls back to the rpc_method (then ''), and
`input_size` / `output_size` are bytes_in / bytes_out capped at the INTEGER maximum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from pipeline.contract import ValidEvent
from sinks.aggregate_parts import usage_status
from sinks.db import Connection

INT32_MAX: Final = 2**31 - 1

USAGE_EVENT_COLUMNS: Final = (
    "time",
    "org_id",
    "project_id",
    "user_id",
    "api_key_id",
    "request_id",
    "event_type",
    "model",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cost_cents",
    "latency_ms",
    "time_to_first_token_ms",
    "mcp_server_id",
    "mcp_tool_name",
    "status",
    "error_code",
)
MCP_USAGE_COLUMNS: Final = (
    "time",
    "org_id",
    "project_id",
    "user_id",
    "server_id",
    "tool_name",
    "request_id",
    "latency_ms",
    "status",
    "input_size",
    "output_size",
)
_MCP_STATUS: Final = {"success": "success", "error": "error", "timeout": "timeout", "rate_limited": "blocked"}


def is_mcp_call(e: ValidEvent) -> bool:
    return e.event_type == "mcp_tool" or e.mcp_tool_name is not None


def usage_event_row(e: ValidEvent) -> tuple[object, ...]:
    mcp = is_mcp_call(e)
    status = usage_status(e)
    return (
        e.started_at,
        e.organization_id,
        e.project_id,
        e.user_id,
        e.api_key_id,
        e.event_id,
        e.event_type,
        e.model,
        e.input_tokens or 0,
        e.output_tokens or 0,
        e.cache_read_tokens or 0,
        e.cache_write_tokens or 0,
        e.cost_cents or 0,
        e.duration_ms,
        e.time_to_first_token_ms,
        e.server_id if mcp else None,
        e.mcp_tool_name,
        status,
        str(e.status_code) if status != "success" and e.status_code is not None else None,
    )


def mcp_usage_row(e: ValidEvent) -> tuple[object, ...]:
    return (
        e.started_at,
        e.organization_id,
        e.project_id,
        e.user_id,
        e.server_id,
        e.mcp_tool_name if e.mcp_tool_name is not None else (e.rpc_method or ""),
        e.event_id,
        e.duration_ms,
        _MCP_STATUS[usage_status(e)],
        e.bytes_in if e.bytes_in < INT32_MAX else INT32_MAX,  # not min(): a builtin call per value
        e.bytes_out if e.bytes_out < INT32_MAX else INT32_MAX,
    )


class UsageRowsWriter:
    """The batch extension writing `usage_events` and `mcp_usage` rows (binary COPY)."""

    def build(self, new_events: Sequence[ValidEvent], source_partition: int) -> BuiltUsageRows:
        """The rows, without the database (built before the transaction: sinks/index.py `prebuild`)."""
        usage: list[tuple[object, ...]] = []
        calls: list[tuple[object, ...]] = []
        for e in new_events:  # one pass for both tables
            if e.has_usage:
                usage.append(usage_event_row(e))
            if e.server_id is not None and is_mcp_call(e):
                calls.append(mcp_usage_row(e))
        return BuiltUsageRows(usage, calls)

    async def write(self, conn: Connection, new_events: Sequence[ValidEvent], source_partition: int) -> None:
        await self.build(new_events, source_partition).write(conn)


@dataclass(frozen=True, slots=True)
class BuiltUsageRows:
    """A batch's `usage_events` and `mcp_usage` rows; `write` COPYs them in the batch transaction."""

    usage: list[tuple[object, ...]]
    calls: list[tuple[object, ...]]

    async def write(self, conn: Connection) -> None:
        if self.usage:
            await conn.copy_records_to_table("usage_events", records=self.usage, columns=USAGE_EVENT_COLUMNS)
        if self.calls:
            await conn.copy_records_to_table("mcp_usage", records=self.calls, columns=MCP_USAGE_COLUMNS)
