"""The load generator's oracle: what a correct pipeline must end up with for a generated stream.

`SummaryBuilder.add(message)` for every message produced, then `build()` gives a JSON-ready dict:

- `messages`: total, valid (unique event ids), duplicate (byte-identical re-sends), invalid (by the
  reason the validator gives, which is also the dead-letter header);
- `log_aggregates`: one row per docs/contract.md §5 key — for `hourly` and `daily` windows, per
  (organization, server, rpc_method), per (organization, server) with `rpc_method` null, and per
  organization with both null — with exact counts, byte sums, the duration sum and the exact
  p50/p95/p99 of `duration_ms` (numpy `method="lower"`, the rank DDSketch answers);
- `usage`: per (organization, project, model) and hour / day, counts by status and token and cost
  sums, over the events that carry usage fields (`model` is null for tool calls).

Only valid first occurrences count: duplicates and invalid messages are in `messages` only.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import orjson

from pipeline.devtools.loadgen.generator import EventFacts, GeneratedMessage, LoadConfig

FORMAT: Final = "omnilog-loadgen-summary/1"
QUANTILES: Final = (0.5, 0.95, 0.99)
_HOUR_MS: Final = 3_600_000
_DAY_MS: Final = 86_400_000
_WINDOWS: Final = (("hourly", _HOUR_MS), ("daily", _DAY_MS))
_STATUSES: Final = ("success", "error", "timeout", "rate_limited")


class _Interner:
    def __init__(self) -> None:
        self.index: dict[str | None, int] = {}
        self.values: list[str | None] = []

    def __call__(self, value: str | None) -> int:
        found = self.index.get(value)
        if found is None:
            found = self.index[value] = len(self.values)
            self.values.append(value)
        return found


@dataclass
class SummaryBuilder:
    config: LoadConfig | None = None
    total: int = 0
    duplicate: int = 0
    invalid_by_kind: dict[str, int] = field(default_factory=dict)
    value_bytes: int = 0
    _names: _Interner = field(default_factory=_Interner)
    # Columns of the valid events (interned ids for strings; compact and fast to group).
    _org: list[int] = field(default_factory=list)
    _server: list[int] = field(default_factory=list)
    _method: list[int] = field(default_factory=list)
    _started: list[int] = field(default_factory=list)
    _duration: list[int] = field(default_factory=list)
    _error: list[bool] = field(default_factory=list)
    _bytes_in: list[int] = field(default_factory=list)
    _bytes_out: list[int] = field(default_factory=list)
    _late: int = 0
    _usage: list[EventFacts] = field(default_factory=list)

    def add(self, message: GeneratedMessage) -> None:
        self.total += 1
        self.value_bytes += len(message.value)
        if message.kind == "duplicate":
            self.duplicate += 1
            return
        if message.kind == "invalid":
            kind = message.invalid_kind or "unknown"
            self.invalid_by_kind[kind] = self.invalid_by_kind.get(kind, 0) + 1
            return
        facts = message.facts
        if facts is None:
            raise ValueError("a valid message must carry its facts")
        names = self._names
        self._org.append(names(facts.organization_id))
        self._server.append(names(facts.server_id))
        self._method.append(names(facts.rpc_method))
        self._started.append(facts.started_ms)
        self._duration.append(facts.duration_ms)
        self._error.append(facts.error)
        self._bytes_in.append(facts.bytes_in)
        self._bytes_out.append(facts.bytes_out)
        self._late += facts.late
        if facts.project_id is not None:
            self._usage.append(facts)

    def build(self) -> dict[str, Any]:
        valid = len(self._started)
        started = np.asarray(self._started, dtype=np.int64)
        summary: dict[str, Any] = {
            "format": FORMAT,
            "config": self.config.to_json() if self.config is not None else None,
            "messages": {
                "total": self.total,
                "valid": valid,
                "duplicate": self.duplicate,
                "invalid": sum(self.invalid_by_kind.values()),
                "invalid_by_kind": dict(sorted(self.invalid_by_kind.items())),
                "value_bytes": self.value_bytes,
            },
            "valid": {
                "late": self._late,
                "started_at_min": _iso(int(started.min())) if valid else None,
                "started_at_max": _iso(int(started.max())) if valid else None,
            },
            "log_aggregates": self._log_aggregates(started),
            "usage": self._usage_rows(),
        }
        return summary

    def _log_aggregates(self, started: np.ndarray[Any, np.dtype[np.int64]]) -> list[dict[str, Any]]:
        if started.size == 0:
            return []
        names = self._names.values
        null = self._names(None)
        org = np.asarray(self._org, dtype=np.int64)
        server = np.asarray(self._server, dtype=np.int64)
        method = np.asarray(self._method, dtype=np.int64)
        duration = np.asarray(self._duration, dtype=np.int64)
        error = np.asarray(self._error, dtype=np.int64)
        bytes_in = np.asarray(self._bytes_in, dtype=np.int64)
        bytes_out = np.asarray(self._bytes_out, dtype=np.int64)
        nulls = np.full_like(org, null)
        rows: list[dict[str, Any]] = []
        for window_type, width in _WINDOWS:
            window = started // width
            for srv, mth in ((server, method), (server, nulls), (nulls, nulls)):
                keys = np.stack([window, org, srv, mth], axis=1)
                groups, inverse = np.unique(keys, axis=0, return_inverse=True)
                inverse = inverse.reshape(-1)
                order = np.lexsort((duration, inverse))
                sorted_duration = duration[order]
                counts = np.bincount(inverse, minlength=len(groups))
                ends = np.cumsum(counts)
                sums = {
                    "errors": np.bincount(inverse, weights=error, minlength=len(groups)),
                    "bytes_in": np.bincount(inverse, weights=bytes_in, minlength=len(groups)),
                    "bytes_out": np.bincount(inverse, weights=bytes_out, minlength=len(groups)),
                    "duration": np.bincount(inverse, weights=duration, minlength=len(groups)),
                }
                for g, (w, o, s, m) in enumerate(groups.tolist()):
                    chunk = sorted_duration[ends[g] - counts[g] : ends[g]]
                    p50, p95, p99 = np.quantile(chunk, QUANTILES, method="lower").tolist()
                    count = int(counts[g])
                    errors = round(float(sums["errors"][g]))
                    rows.append(
                        {
                            "window_type": window_type,
                            "window_start": _iso(w * width),
                            "organization_id": names[o],
                            "server_id": names[s],
                            "rpc_method": names[m],
                            "total_requests": count,
                            "success_requests": count - errors,
                            "error_requests": errors,
                            "total_bytes_in": round(float(sums["bytes_in"][g])),
                            "total_bytes_out": round(float(sums["bytes_out"][g])),
                            "sum_duration_ms": round(float(sums["duration"][g])),
                            "p50_duration_ms": int(p50),
                            "p95_duration_ms": int(p95),
                            "p99_duration_ms": int(p99),
                        }
                    )
        rows.sort(key=_row_order)
        return rows

    def _usage_rows(self) -> list[dict[str, Any]]:
        rows: dict[tuple[str, int, str, str, str | None], dict[str, Any]] = {}
        for facts in self._usage:
            for window_type, width in _WINDOWS:
                window = facts.started_ms // width * width
                key = (window_type, window, facts.organization_id, facts.project_id or "", facts.model)
                row = rows.get(key)
                if row is None:
                    row = rows[key] = {
                        "window_type": window_type,
                        "window_start": _iso(window),
                        "organization_id": facts.organization_id,
                        "project_id": facts.project_id,
                        "model": facts.model,
                        "request_count": 0,
                        **{f"{status}_count": 0 for status in _STATUSES},
                        "total_input_tokens": 0,
                        "total_output_tokens": 0,
                        "total_cache_read_tokens": 0,
                        "total_cache_write_tokens": 0,
                        "total_cost_cents": 0,
                    }
                row["request_count"] += 1
                row[f"{facts.status}_count"] += 1
                row["total_input_tokens"] += facts.input_tokens
                row["total_output_tokens"] += facts.output_tokens
                row["total_cache_read_tokens"] += facts.cache_read_tokens
                row["total_cache_write_tokens"] += facts.cache_write_tokens
                row["total_cost_cents"] += facts.cost_cents
        return [rows[key] for key in sorted(rows, key=lambda k: (k[0], k[1], k[2], k[3], k[4] or ""))]


def _row_order(row: dict[str, Any]) -> tuple[str, str, str, str, str]:
    return (
        row["window_type"],
        row["window_start"],
        row["organization_id"],
        row["server_id"] or "",
        row["rpc_method"] or "",
    )


def _iso(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def summarize(messages: Iterable[GeneratedMessage], config: LoadConfig | None = None) -> dict[str, Any]:
    builder = SummaryBuilder(config)
    for message in messages:
        builder.add(message)
    return builder.build()


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    """Write atomically (a reader never sees half a file)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    partial.replace(path)
