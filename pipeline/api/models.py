"""Response bodies of the API (their JSON Schemas are the OpenAPI document's components)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

Level = Literal["trace", "debug", "info", "warn", "error", "fatal"]


class LogRow(BaseModel):
    """One indexed request. The stored event itself is at /v1/events/{id}."""

    id: str
    server_id: str | None
    session_id: str | None
    rpc_method: str | None
    level: Level
    started_at: datetime
    duration_ms: int | None
    status_code: int | None
    error_flag: bool | None
    user_id: str | None
    remote_ip: str | None


class LogsPage(BaseModel):
    items: list[LogRow]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class AggregateRow(BaseModel):
    """A log_aggregates row; server_id / rpc_method null mean "all" at the coarser levels."""

    window_start: datetime
    server_id: str | None
    rpc_method: str | None
    total_requests: int | None
    success_requests: int | None
    error_requests: int | None
    p50_duration_ms: int | None
    p95_duration_ms: int | None
    p99_duration_ms: int | None
    avg_duration_ms: float | None
    total_bytes_in: int | None
    total_bytes_out: int | None
    updated_at: datetime | None


class AggregatesPage(BaseModel):
    items: list[AggregateRow]


class UsageRow(BaseModel):
    """A usage rollup row (daily: the all-users row of its project and model)."""

    bucket: datetime
    project_id: str | None
    model: str | None
    request_count: int
    success_count: int
    error_count: int
    total_input_tokens: int
    total_output_tokens: int
    total_cache_read_tokens: int
    total_cost_cents: int
    avg_latency_ms: float | None
    p50_latency_ms: float | None
    p95_latency_ms: float | None
    p99_latency_ms: float | None
    unique_users: int


class UsagePage(BaseModel):
    items: list[UsageRow]
