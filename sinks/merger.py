"""The aggregates merger: folds insert-only deltas into `log_aggregates` and the usage rollups,
each delta exactly once, at a cost proportional to the deltas (docs/aggregates.md §3).

One pass is one transaction over one shard (a set of the 64 organization slots of
sinks/aggregate_parts.py):

1. `pg_try_advisory_xact_lock(SLOT_LOCK_CLASS, slot)` for each slot of the shard; slots another
   merger holds are skipped. Every rollup row of an organization is therefore written by one
   merger at a time, however many run and however they are sharded, so a plain read, a merge in
   Python and an upsert of a rollup row cannot lose an update;
2. per deltas table, the shard's deltas in id order (`LIMIT`, `FOR UPDATE SKIP LOCKED`), except
   the keys held aside in `aggregate_isolated_keys`;
3. each delta is added to every rollup row it belongs to: hourly and daily, at the three levels
   (org, server, method) of log_aggregates; usage_hourly and the all-users usage_daily row from
   usage_deltas, the per-user usage_daily rows from usage_user_deltas. Each touched rollup row is
   read once (by its unique key, so the read is an index probe whatever the history), merged
   (sums added, sketches merged, unique users added from the deltas' new-user counts) and
   upserted once;
4. the folded deltas are deleted by id in the same transaction: a pass that dies at any point
   (kill -9 of a merger) rolls back with its deltas, so each delta counts exactly once.

One key never stops the others: each table's keys are folded in a savepoint; when that fails with
an error attributable to data (a PostgreSQL data error, a corrupt sketch or sum), the key set is
bisected in further savepoints down to the failing key(s), which are recorded in
`aggregate_isolated_keys` (skipped by later passes until an operator releases them) while the
rest commit. Retriable errors fail the pass, which `MergerLoop` retries through the worker's
retry policy; any other error ends the loop (the worker or `omnilog merge` stops loudly).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, NamedTuple

import asyncpg
from prometheus_client import CollectorRegistry

from pipeline import failpoints
from pipeline.metrics import WorkerMetrics
from pipeline.processing.flush import counted_since
from pipeline.processing.retry import ErrorKind, RetryPolicy, classify
from pipeline.sketch import QuantileSketch
from sinks.aggregate_parts import (
    LOG_DELTAS,
    SERVER_STATS_DELTAS,
    SLOTS,
    USAGE_DELTAS,
    USAGE_MONTHLY_DELTAS,
    USAGE_SUMS,
    USAGE_USER_DELTAS,
    Acc,
    DeltaTable,
    PartKey,
    exact_int,
    fold,
    key_columns,
)
from sinks.aggregate_timescale import ensure_rollup_views
from sinks.db import Connection

log = logging.getLogger("omnilog.merger")

# pg_try_advisory_xact_lock(SLOT_LOCK_CLASS, slot): the two-int form, "omni" in ASCII.
SLOT_LOCK_CLASS: Final = 0x6F6D6E69
# Deltas per table and pass: a worker's batch (20 000 events) makes up to a few thousand deltas
# per table, and a round finds a few batches' worth when one worker drains fast (15 k events/s,
# 4 s apart). Each stored rollup row a pass touches is read, decoded, re-encoded and written once,
# so one pass over the round's deltas does that once per row instead of once per 5 000 deltas.
DEFAULT_LIMIT: Final = 20_000
# More isolated keys than this in one pass is not a few bad keys but something wrong with all of
# them (a bug, a broken deploy): the pass fails instead of holding the whole workload aside.
MAX_ISOLATED_PER_PASS: Final = 100
QUANTILES: Final = (0.5, 0.95, 0.99)

# (window, org, server, method); None in server/method means "all"
LogKey = tuple[Any, ...]


def day_of(window: datetime) -> datetime:
    """The UTC day holding `window`."""
    return window.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


@dataclass(frozen=True, slots=True)
class Shard:
    """Shard `index` of `count`: the organization slots `s` with `s % count == index`."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.count <= SLOTS:
            raise ValueError(f"a merger shard count must be within 1..{SLOTS}, got {self.count}")
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard index {self.index} is not within 0..{self.count - 1}")

    @property
    def slots(self) -> list[int]:
        return [s for s in range(SLOTS) if s % self.count == self.index]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


ALL_SLOTS: Final = Shard()


def shards_of(count: int, index: int | None) -> list[Shard]:
    """The shards a merger works on: its own one, or (no index) all `count` of them in turn."""
    if index is not None:
        return [Shard(index, count)]
    return [Shard(i, count) for i in range(count)]


# ---- rollup values (pure) --------------------------------------------------------------------


# Rollup values are NamedTuples: one is built per rollup row a pass writes, and a frozen
# dataclass's __init__ sets each field through object.__setattr__, several times slower.
class LogValues(NamedTuple):
    total: int
    success: int
    errors: int
    p50: int
    p95: int
    p99: int
    avg: float
    bytes_in: int
    bytes_out: int
    sketch: bytes


def log_values(acc: Acc) -> LogValues:
    """A log_aggregates row from its accumulator (sums in LOG_SUMS order, duration sketch)."""
    total, errors, bytes_in, bytes_out = acc.sums
    if acc.sketch.count != total:
        raise ValueError(f"sketch holds {acc.sketch.count} durations for {total} requests")
    # `quantile_rounded` of each q, with one cumulative sum for the three
    p50, p95, p99 = (round(x) for x in acc.sketch.quantiles(QUANTILES))
    return LogValues(
        total,
        total - errors,
        errors,
        p50,
        p95,
        p99,
        acc.sketch.sum / total,
        bytes_in,
        bytes_out,
        acc.sketch.to_bytes(),
    )


class UsageValues(NamedTuple):
    sums: tuple[int, ...]  # USAGE_SUMS order
    avg: float
    p50: float
    p95: float
    p99: float
    unique_users: int
    sketch: bytes


def usage_values(acc: Acc, unique_users: int) -> UsageValues:
    if acc.sketch.count != acc.sums[0]:
        raise ValueError(f"sketch holds {acc.sketch.count} latencies for {acc.sums[0]} requests")
    p50, p95, p99 = acc.sketch.quantiles(QUANTILES)
    return UsageValues(tuple(acc.sums), acc.sketch.mean, p50, p95, p99, unique_users, acc.sketch.to_bytes())


def server_level(leaves: Iterable[tuple[LogKey, Acc]]) -> dict[LogKey, Acc]:
    """Per (hour, org, server) rows (method NULL) from per-method rows."""
    return fold(((w, o, s, None), acc) for (w, o, s, _m), acc in leaves)


def org_level(servers: Iterable[tuple[LogKey, Acc]]) -> dict[LogKey, Acc]:
    """Per (hour, org) rows (server and method NULL) from per-server rows."""
    return fold(((w, o, None, None), acc) for (w, o, _s, _m), acc in servers)


def daily_from_hourly(hourly: Iterable[tuple[LogKey, Acc]]) -> dict[LogKey, Acc]:
    """Daily rows as the merge of their day's hourly rows, at the level of each row."""
    return fold(((day_of(w), o, s, m), acc) for (w, o, s, m), acc in hourly)


def log_targets(leaves: Mapping[LogKey, Acc]) -> dict[tuple[str, LogKey], Acc]:
    """Every log_aggregates row that leaves (hour, org, server, method) add to, with what they
    add: hourly and daily, per method, per server (method None) and per org (both None). Daily
    rows come straight from the leaves, never from the day's stored hourly rows. The leaves are
    taken over: they are the hourly per-method accumulators returned (the others are new)."""
    servers = server_level(leaves.items())
    # The server, org and daily rows are folded into copies before the caller changes any row.
    hourly = {**leaves, **servers, **org_level(servers.items())}
    daily = daily_from_hourly(hourly.items())
    return {("hourly", k): a for k, a in hourly.items()} | {("daily", k): a for k, a in daily.items()}


# ---- SQL -------------------------------------------------------------------------------------


def _unnest(types: Sequence[str], first: int = 1) -> str:
    return ", ".join(f"${first + i}::{_ARRAY.get(t, f'{t}[]')}" for i, t in enumerate(types))


# NUMERIC sums are sent as text (str of the int) and cast by PostgreSQL: asyncpg encodes a Python
# int as NUMERIC through a Decimal, several times the cost of a str, for the same stored value.
_ARRAY: Final = {"numeric": "text[]::numeric[]"}


_LOCK_SLOTS: Final = (
    "SELECT coalesce(array_agg(s ORDER BY s), '{}') FROM unnest($2::int[]) AS s "
    "WHERE pg_try_advisory_xact_lock($1, s)"
)


def select_sql(table: DeltaTable) -> str:
    """The deltas of the locked slots, oldest first, except those of isolated keys."""
    # UUID keys as text: the merger keys rows by them as strings, and a text column arrives as a
    # str without a uuid.UUID built and converted per row.
    keys = ", ".join(
        f"d.{c}::text AS {c}" if t == "uuid" else f"d.{c}"
        for c, t in zip(table.key_columns, table.key_types, strict=True)
    )
    as_text = ", ".join(f"d.{c}::text" for c in table.key_columns)
    when = f"({table.fold_when}) AND " if table.fold_when else ""
    return (
        f"SELECT d.id, d.window_start, {keys}, d.sums::text[] AS sums, d.sketch FROM {table.name} d "
        f"WHERE d.slot = ANY($1::int[]) AND {when}NOT EXISTS ("
        f"SELECT 1 FROM aggregate_isolated_keys i WHERE i.parts_table = '{table.name}' "
        f"AND i.window_start = d.window_start AND i.key_values = ARRAY[{as_text}]) "
        "ORDER BY d.id LIMIT $2 FOR UPDATE OF d SKIP LOCKED"
    )


def delete_sql(table: DeltaTable) -> str:
    return f"DELETE FROM {table.name} WHERE id = ANY($1::bigint[])"


# The stored rollup rows a fold adds to, one statement per level so that every condition is an
# equality or IS NULL on the unique key's columns: an index probe per key, whatever the history.
_LOG_VALUES = (
    "a.total_requests, a.error_requests, a.total_bytes_in::text AS bytes_in, "
    "a.total_bytes_out::text AS bytes_out, a.duration_sketch AS sketch"
)
_LOG_LEVEL_MATCH: Final = {
    "method": "a.server_id = k.s AND a.rpc_method = k.m",
    "server": "a.server_id = k.s AND a.rpc_method IS NULL",
    "org": "a.server_id IS NULL AND a.rpc_method IS NULL",
}


def read_log_sql(level: str) -> str:
    return (
        f"SELECT k.ord, {_LOG_VALUES} FROM unnest($1::aggregation_window_enum[], $2::timestamptz[], "
        "$3::uuid[], $4::uuid[], $5::text[]) WITH ORDINALITY AS k(t, w, o, s, m, ord) "
        "JOIN log_aggregates a ON a.organization_id = k.o AND a.window_type = k.t AND a.window_start = k.w "
        f"AND {_LOG_LEVEL_MATCH[level]}"
    )


_USAGE_VALUES = (
    "r.request_count, r.success_count, r.error_count, r.total_input_tokens::text, "
    "r.total_output_tokens::text, r.total_cache_read_tokens::text, r.total_cost_cents::text, "
    "r.unique_users, r.latency_sketch AS sketch"
)
READ_USAGE_HOURLY: Final = (
    f"SELECT k.ord, {_USAGE_VALUES} FROM unnest($1::timestamptz[], $2::uuid[], $3::uuid[], $4::text[]) "
    "WITH ORDINALITY AS k(w, o, p, m, ord) JOIN usage_hourly r "
    "ON r.bucket = k.w AND r.org_id = k.o AND r.project_id = k.p AND r.model = k.m"
)
READ_USAGE_DAILY_ALL: Final = (
    f"SELECT k.ord, {_USAGE_VALUES} FROM unnest($1::timestamptz[], $2::uuid[], $3::uuid[], $4::text[]) "
    "WITH ORDINALITY AS k(w, o, p, m, ord) JOIN usage_daily r "
    "ON r.bucket = k.w AND r.org_id = k.o AND r.project_id = k.p AND r.model = k.m AND r.user_id IS NULL"
)
READ_USAGE_DAILY_USER: Final = (
    f"SELECT k.ord, {_USAGE_VALUES} FROM unnest($1::timestamptz[], $2::uuid[], $3::uuid[], $4::text[], "
    "$5::text[]) WITH ORDINALITY AS k(w, o, p, m, u, ord) JOIN usage_daily r "
    "ON r.bucket = k.w AND r.org_id = k.o AND r.project_id = k.p AND r.model = k.m AND r.user_id = k.u"
)

_UPSERT_LOG = """
INSERT INTO log_aggregates AS a (organization_id, server_id, rpc_method, window_type, window_start,
    total_requests, success_requests, error_requests, p50_duration_ms, p95_duration_ms,
    p99_duration_ms, avg_duration_ms, total_bytes_in, total_bytes_out, duration_sketch)
SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::aggregation_window_enum[], $5::timestamptz[],
    $6::bigint[], $7::bigint[], $8::bigint[], $9::int[], $10::int[], $11::int[], $12::float8[],
    $13::text[]::numeric[], $14::text[]::numeric[], $15::bytea[])
ON CONFLICT ON CONSTRAINT log_aggregates_key DO UPDATE SET
    total_requests = EXCLUDED.total_requests, success_requests = EXCLUDED.success_requests,
    error_requests = EXCLUDED.error_requests, p50_duration_ms = EXCLUDED.p50_duration_ms,
    p95_duration_ms = EXCLUDED.p95_duration_ms, p99_duration_ms = EXCLUDED.p99_duration_ms,
    avg_duration_ms = EXCLUDED.avg_duration_ms, total_bytes_in = EXCLUDED.total_bytes_in,
    total_bytes_out = EXCLUDED.total_bytes_out, duration_sketch = EXCLUDED.duration_sketch
"""

_USAGE_METRICS = (
    "request_count, success_count, error_count, total_input_tokens, total_output_tokens, "
    "total_cache_read_tokens, total_cost_cents"
)
_USAGE_SET = ", ".join(
    f"{c} = EXCLUDED.{c}"
    for c in (
        *_USAGE_METRICS.split(", "),
        "avg_latency_ms",
        "p50_latency_ms",
        "p95_latency_ms",
        "p99_latency_ms",
        "unique_users",
        "latency_sketch",
    )
)
# counts are BIGINT, token and cost sums NUMERIC (USAGE_SUMS order; migration 0005)
_USAGE_VALUE_TYPES = ("bigint",) * 3 + ("numeric",) * 4 + ("float8",) * 4 + ("bigint", "bytea")
_UPSERT_USAGE_HOURLY = f"""
INSERT INTO usage_hourly (bucket, org_id, project_id, model, {_USAGE_METRICS}, avg_latency_ms,
    p50_latency_ms, p95_latency_ms, p99_latency_ms, unique_users, latency_sketch)
SELECT * FROM unnest({_unnest(("timestamptz", "uuid", "uuid", "text", *_USAGE_VALUE_TYPES))})
ON CONFLICT ON CONSTRAINT usage_hourly_key DO UPDATE SET {_USAGE_SET}
"""
_UPSERT_USAGE_DAILY = f"""
INSERT INTO usage_daily (bucket, org_id, project_id, model, user_id, {_USAGE_METRICS}, avg_latency_ms,
    p50_latency_ms, p95_latency_ms, p99_latency_ms, unique_users, latency_sketch)
SELECT * FROM unnest({_unnest(("timestamptz", "uuid", "uuid", "text", "text", *_USAGE_VALUE_TYPES))})
ON CONFLICT ON CONSTRAINT usage_daily_key DO UPDATE SET {_USAGE_SET}
"""

# ---- one fold --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IsolatedKey:
    parts_table: str  # the deltas table (the column keeps its name from migration 0005)
    key: PartKey  # (window_start, *key columns)
    error: str


@dataclass(slots=True)
class MergeStats:
    deltas_read: int = 0
    deltas_folded: int = 0
    log_rows: int = 0
    usage_rows: int = 0
    server_rows: int = 0
    more: bool = False  # a table had more deltas than the pass's limit
    isolated: list[IsolatedKey] = field(default_factory=list)  # held aside by this pass

    def absorb(self, other: MergeStats) -> None:
        self.deltas_read += other.deltas_read
        self.deltas_folded += other.deltas_folded
        self.log_rows += other.log_rows
        self.usage_rows += other.usage_rows
        self.server_rows += other.server_rows
        self.more = self.more or other.more
        self.isolated.extend(other.isolated)


def _sketch(blob: bytes | None, what: str) -> QuantileSketch:
    if blob is None:
        raise ValueError(f"{what} has no sketch")
    return QuantileSketch.from_bytes(blob)


# The deltas of a fold grouped by their key (window, *key columns), oldest first within a key.
Deltas = Mapping[PartKey, Sequence[asyncpg.Record]]


def _delta(row: asyncpg.Record) -> Acc:
    """A delta row's value. Its sums are selected as text[], so each is a str of digits: `int`
    reads it exactly and raises ValueError on anything else, as `exact_int` would."""
    return Acc([int(v) for v in row["sums"]], QuantileSketch.from_bytes(row["sketch"]))


def _decode_deltas(deltas: Deltas) -> dict[PartKey, Acc]:
    """One accumulator per key: its deltas decoded and added up. Each accumulator is built from
    freshly decoded deltas, so it is merged into in place rather than copied (`fold` copies)."""
    out: dict[PartKey, Acc] = {}
    for key, rows in deltas.items():
        first, *rest = rows
        acc = _delta(first)
        for row in rest:
            acc.merge(_delta(row))
        out[key] = acc
    return out


async def _delete(conn: Connection, table: DeltaTable, deltas: Deltas) -> int:
    status = await conn.execute(delete_sql(table), [row["id"] for rows in deltas.values() for row in rows])
    return int(status.split()[-1])


async def _stored_log_rows(conn: Connection, keys: list[tuple[str, LogKey]]) -> dict[tuple[str, LogKey], Acc]:
    """The stored log_aggregates rows of `keys` (window type, (window, org, server, method))."""
    stored: dict[tuple[str, LogKey], Acc] = {}
    for level in _LOG_LEVEL_MATCH:
        wanted = [k for k in keys if _log_level(k[1]) == level]
        if not wanted:
            continue
        rows = await conn.fetch(
            read_log_sql(level),
            [t for t, _ in wanted],
            [k[0] for _, k in wanted],
            [k[1] for _, k in wanted],
            [k[2] for _, k in wanted],
            [k[3] for _, k in wanted],
        )
        for row in rows:
            sums = [row["total_requests"], row["error_requests"], row["bytes_in"], row["bytes_out"]]
            stored[wanted[row["ord"] - 1]] = Acc(
                [exact_int(v) for v in sums], _sketch(row["sketch"], "a log_aggregates row")
            )
    return stored


def _log_level(key: LogKey) -> str:
    return "org" if key[2] is None else "server" if key[3] is None else "method"


async def _fold_log(conn: Connection, rows: Deltas, stats: MergeStats) -> None:
    targets = log_targets(_decode_deltas(rows))
    for key, acc in (await _stored_log_rows(conn, list(targets))).items():
        targets[key].merge(acc)
    keys = sorted(targets, key=str)
    values = [log_values(targets[k]) for k in keys]
    await conn.execute(
        _UPSERT_LOG,
        [k[1][1] for k in keys],
        [k[1][2] for k in keys],
        [k[1][3] for k in keys],
        [k[0] for k in keys],
        [k[1][0] for k in keys],
        [v.total for v in values],
        [v.success for v in values],
        [v.errors for v in values],
        [v.p50 for v in values],
        [v.p95 for v in values],
        [v.p99 for v in values],
        [v.avg for v in values],
        [str(v.bytes_in) for v in values],
        [str(v.bytes_out) for v in values],
        [v.sketch for v in values],
    )
    stats.log_rows += len(keys)
    stats.deltas_folded += await _delete(conn, LOG_DELTAS, rows)


def _usage_sum_columns(values: list[UsageValues]) -> list[list[Any]]:
    """The USAGE_SUMS columns of `values`, the NUMERIC ones as text (see `_ARRAY`)."""
    return [
        [str(v.sums[j]) for v in values]
        if _USAGE_VALUE_TYPES[j] == "numeric"
        else [v.sums[j] for v in values]
        for j in range(len(USAGE_SUMS))
    ]


def _usage_args(keys: list[Any], values: list[UsageValues]) -> list[list[Any]]:
    columns: list[list[Any]] = key_columns(keys)
    columns += _usage_sum_columns(values)
    columns += [
        [v.avg for v in values],
        [v.p50 for v in values],
        [v.p95 for v in values],
        [v.p99 for v in values],
        [v.unique_users for v in values],
        [v.sketch for v in values],
    ]
    return columns


async def _stored_usage_rows(
    conn: Connection, sql: str, keys: list[PartKey], users_at: int | None, width: int
) -> dict[PartKey, Acc]:
    """Stored usage rows of `keys` as accumulators of `width` sums: the 7 USAGE_SUMS, then (for
    hourly and all-users rows) zeros with the stored unique users at `users_at`, so that adding a
    delta's new-user counts (usage_deltas' last two sums) gives the new unique users."""
    stored: dict[PartKey, Acc] = {}
    if not keys:
        return stored
    for row in await conn.fetch(sql, *key_columns(keys)):
        values = list(row.values())
        sums = [exact_int(v) for v in values[1:8]] + [0] * (width - len(USAGE_SUMS))
        if users_at is not None:
            sums[users_at] = int(row["unique_users"])
        stored[keys[row["ord"] - 1]] = Acc(sums, _sketch(row["sketch"], "a usage rollup row"))
    return stored


def _usage_value_rows(
    targets: Mapping[PartKey, Acc], users: Callable[[PartKey, Acc], int]
) -> tuple[list[PartKey], list[UsageValues]]:
    keys = sorted(targets, key=str)
    values = [
        usage_values(Acc(targets[k].sums[: len(USAGE_SUMS)], targets[k].sketch), users(k, targets[k]))
        for k in keys
    ]
    return keys, values


async def _fold_usage(conn: Connection, rows: Deltas, stats: MergeStats) -> None:
    """usage_deltas into usage_hourly and the all-users usage_daily rows. Their last two sums are
    the users new to the hour's and to the day's user set: added to the stored unique users."""
    width = len(USAGE_DELTAS.sum_names)
    hourly = _decode_deltas(rows)
    daily = fold(((day_of(_window(k)), *k[1:]), acc) for k, acc in hourly.items())
    hour_at, day_at = width - 2, width - 1
    for key, acc in (await _stored_usage_rows(conn, READ_USAGE_HOURLY, list(hourly), hour_at, width)).items():
        hourly[key].merge(acc)
    for key, acc in (
        await _stored_usage_rows(conn, READ_USAGE_DAILY_ALL, list(daily), day_at, width)
    ).items():
        daily[key].merge(acc)
    keys, values = _usage_value_rows(hourly, lambda _k, acc: acc.sums[hour_at])
    await conn.execute(_UPSERT_USAGE_HOURLY, *_usage_args(keys, values))
    day_keys, day_values = _usage_value_rows(daily, lambda _k, acc: acc.sums[day_at])
    await conn.execute(_UPSERT_USAGE_DAILY, *_usage_args([(*k, None) for k in day_keys], day_values))
    stats.usage_rows += len(keys) + len(day_keys)
    stats.deltas_folded += await _delete(conn, USAGE_DELTAS, rows)


async def _fold_usage_users(conn: Connection, rows: Deltas, stats: MergeStats) -> None:
    """usage_user_deltas into the per-user usage_daily rows (unique users: 1, or 0 for no user)."""
    per_user = _decode_deltas(rows)
    stored = await _stored_usage_rows(conn, READ_USAGE_DAILY_USER, list(per_user), None, len(USAGE_SUMS))
    for key, acc in stored.items():
        per_user[key].merge(acc)
    keys, values = _usage_value_rows(per_user, lambda k, _acc: 1 if k[4] else 0)
    await conn.execute(_UPSERT_USAGE_DAILY, *_usage_args(keys, values))
    stats.usage_rows += len(keys)
    stats.deltas_folded += await _delete(conn, USAGE_USER_DELTAS, rows)


# ---- server_stats and usage_monthly (migration 0010) ------------------------------------------

READ_SERVER_STATS: Final = (
    "SELECT k.ord, s.total_requests, s.error_requests, s.active_sessions, "
    "extract(epoch FROM s.window_end - s.window_start)::int AS width, s.duration_sketch AS sketch "
    "FROM unnest($1::uuid[], $2::timestamptz[]) WITH ORDINALITY AS k(s, w, ord) "
    "JOIN server_stats s ON s.server_id = k.s AND s.window_start = k.w"
)
_UPSERT_SERVER_STATS: Final = """
INSERT INTO server_stats (server_id, window_start, window_end, total_requests, success_requests,
    error_requests, active_sessions, avg_response_time_ms, min_response_time_ms, max_response_time_ms,
    duration_sketch)
SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[], $4::bigint[], $5::bigint[],
    $6::bigint[], $7::int[], $8::float8[], $9::int[], $10::int[], $11::bytea[])
ON CONFLICT (server_id, window_start) DO UPDATE SET
    total_requests = EXCLUDED.total_requests, success_requests = EXCLUDED.success_requests,
    error_requests = EXCLUDED.error_requests, active_sessions = EXCLUDED.active_sessions,
    avg_response_time_ms = EXCLUDED.avg_response_time_ms,
    min_response_time_ms = EXCLUDED.min_response_time_ms,
    max_response_time_ms = EXCLUDED.max_response_time_ms, duration_sketch = EXCLUDED.duration_sketch
"""


async def _fold_server_stats(conn: Connection, rows: Deltas, stats: MergeStats) -> None:
    """server_stats_deltas (only those of registered servers are selected) into server_stats rows
    keyed (server, window_start). A stored row of another width, or without a sketch (written by
    something else), cannot be added to: a ValueError, so the key is isolated, never mixed."""
    deltas = _decode_deltas(rows)
    targets: dict[tuple[str, datetime, int], Acc] = fold(
        ((str(k[2]), _window(k), _width(k)), acc) for k, acc in deltas.items()
    )
    keys = sorted(targets, key=str)
    stored = await conn.fetch(READ_SERVER_STATS, [k[0] for k in keys], [k[1] for k in keys])
    for row in stored:
        key = keys[row["ord"] - 1]
        if row["width"] != key[2]:
            raise ValueError(f"server_stats window {key[1]} is {row['width']} s wide, the delta's {key[2]} s")
        sums = [row["total_requests"], row["error_requests"], row["active_sessions"]]
        targets[key].merge(Acc([exact_int(v) for v in sums], _sketch(row["sketch"], "a server_stats row")))
    values = [targets[k] for k in keys]
    for acc in values:
        if acc.sketch.count != acc.sums[0]:
            raise ValueError(f"sketch holds {acc.sketch.count} durations for {acc.sums[0]} requests")
    await conn.execute(
        _UPSERT_SERVER_STATS,
        [k[0] for k in keys],
        [k[1] for k in keys],
        [k[1] + timedelta(seconds=k[2]) for k in keys],
        [a.sums[0] for a in values],
        [a.sums[0] - a.sums[1] for a in values],
        [a.sums[1] for a in values],
        [a.sums[2] for a in values],
        [a.sketch.mean for a in values],
        [round(a.sketch.min) for a in values],
        [round(a.sketch.max) for a in values],
        [a.sketch.to_bytes() for a in values],
    )
    stats.server_rows += len(keys)
    stats.deltas_folded += await _delete(conn, SERVER_STATS_DELTAS, rows)


READ_USAGE_MONTHLY: Final = (
    "SELECT k.ord, r.request_count, r.success_count, r.error_count, r.total_input_tokens::text, "
    "r.total_output_tokens::text, r.total_cache_read_tokens::text, r.total_cost_cents::text, "
    "r.unique_users, r.active_days, r.latency_sketch AS sketch "
    "FROM unnest($1::timestamptz[], $2::uuid[], $3::uuid[], $4::text[]) "
    "WITH ORDINALITY AS k(w, o, p, m, ord) "
    "JOIN usage_monthly r ON r.month = k.w AND r.org_id = k.o AND r.project_id = k.p AND r.model = k.m"
)
_MONTHLY_EXTRA = (
    "unique_users",
    "active_days",
    "avg_latency_ms",
    "p50_latency_ms",
    "p95_latency_ms",
    "p99_latency_ms",
    "latency_sketch",
)
_MONTHLY_TYPES = (
    *("timestamptz", "uuid", "uuid", "text"),
    *_USAGE_VALUE_TYPES[:7],
    *("bigint", "int", "float8", "float8", "float8", "float8", "bytea"),
)
_MONTHLY_SET = ", ".join(f"{c} = EXCLUDED.{c}" for c in (*_USAGE_METRICS.split(", "), *_MONTHLY_EXTRA))
_UPSERT_USAGE_MONTHLY = f"""
INSERT INTO usage_monthly (month, org_id, project_id, model, {_USAGE_METRICS}, {", ".join(_MONTHLY_EXTRA)})
SELECT * FROM unnest({_unnest(_MONTHLY_TYPES)})
ON CONFLICT ON CONSTRAINT usage_monthly_key DO UPDATE SET {_MONTHLY_SET}, updated_at = now()
"""


async def _fold_usage_monthly(conn: Connection, rows: Deltas, stats: MergeStats) -> None:
    """usage_monthly_deltas into usage_monthly: sums added; the users and days new to the month
    (the deltas' last two sums) added to unique_users and active_days."""
    months = _decode_deltas(rows)
    keys = sorted(months, key=str)
    for row in await conn.fetch(READ_USAGE_MONTHLY, *key_columns(keys)):
        values = list(row.values())
        sums = [exact_int(v) for v in values[1:8]] + [int(row["unique_users"]), int(row["active_days"])]
        months[keys[row["ord"] - 1]].merge(Acc(sums, _sketch(row["sketch"], "a usage_monthly row")))
    accs = [months[k] for k in keys]
    shown = [usage_values(Acc(a.sums[: len(USAGE_SUMS)], a.sketch), a.sums[-2]) for a in accs]
    await conn.execute(
        _UPSERT_USAGE_MONTHLY,
        *key_columns(keys),
        *_usage_sum_columns(shown),
        [a.sums[-2] for a in accs],
        [a.sums[-1] for a in accs],
        [v.avg for v in shown],
        [v.p50 for v in shown],
        [v.p95 for v in shown],
        [v.p99 for v in shown],
        [v.sketch for v in shown],
    )
    stats.usage_rows += len(keys)
    stats.deltas_folded += await _delete(conn, USAGE_MONTHLY_DELTAS, rows)


def _width(key: PartKey) -> int:
    width = key[3]
    assert isinstance(width, int)
    return width


def _window(key: PartKey) -> datetime:
    window = key[0]
    assert isinstance(window, datetime)
    return window


Fold = Callable[[Connection, Deltas, MergeStats], Awaitable[None]]
FOLDS: Final[tuple[tuple[DeltaTable, Fold], ...]] = (
    (LOG_DELTAS, _fold_log),
    (USAGE_DELTAS, _fold_usage),
    (USAGE_USER_DELTAS, _fold_usage_users),
    (USAGE_MONTHLY_DELTAS, _fold_usage_monthly),
    (SERVER_STATS_DELTAS, _fold_server_stats),
)
FOLDED_TABLES: Final = tuple(table for table, _ in FOLDS)

# ---- key isolation ---------------------------------------------------------------------------

KeyMerge = Callable[[Connection, list[PartKey], MergeStats], Awaitable[None]]

_ISOLATE = """
INSERT INTO aggregate_isolated_keys (parts_table, window_start, key_values, error)
VALUES ($1, $2, $3::text[], $4)
ON CONFLICT (parts_table, window_start, key_values) DO UPDATE SET error = EXCLUDED.error, isolated_at = now()
"""
_ERROR_TEXT_MAX: Final = 2000


class TooManyIsolatedKeys(RuntimeError):
    """More keys failed in one pass than a few bad keys explain (see MAX_ISOLATED_PER_PASS)."""


def attributable_to_keys(exc: BaseException) -> bool:
    """Whether a failure of a key set can come from the data of some of its keys: a PostgreSQL
    data error (classified DATA by the worker's one classifier) or a ValueError raised while
    decoding or checking stored parts and rollup rows (a corrupt sketch, a sum that is not an
    integer, a sketch whose count disagrees with its row)."""
    return isinstance(exc, ValueError) or classify(exc) is ErrorKind.DATA


def _storable(text: str) -> str:
    """`text` as PostgreSQL TEXT accepts it: an error message may quote hostile bytes (NUL, lone
    surrogates), and failing to record the isolation would fail the whole pass."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


async def _try_keys(
    conn: Connection, keys: list[PartKey], merge: KeyMerge, stats: MergeStats
) -> Exception | None:
    """Merge `keys` in a savepoint: None when done (their stats added), else the failure (rolled back)."""
    attempt = MergeStats()
    try:
        async with conn.transaction():
            await merge(conn, keys, attempt)
    except Exception as exc:
        if not attributable_to_keys(exc):
            raise
        return exc
    stats.absorb(attempt)
    return None


async def _merge_isolating(
    conn: Connection, table: DeltaTable, keys: list[PartKey], merge: KeyMerge, stats: MergeStats
) -> None:
    """Merge `keys`; on an attributable failure bisect them until each failing key is alone, and
    isolate it. One bad key among n costs about 2·log2(n) extra savepoints, the good keys merged
    in halves along the way (folding is addition, so the order is free)."""
    failure = await _try_keys(conn, keys, merge, stats)
    if failure is None:
        return
    if len(keys) > 1:
        half = len(keys) // 2
        await _merge_isolating(conn, table, keys[:half], merge, stats)
        await _merge_isolating(conn, table, keys[half:], merge, stats)
        return
    if len(stats.isolated) >= MAX_ISOLATED_PER_PASS:
        raise TooManyIsolatedKeys(
            f"more than {MAX_ISOLATED_PER_PASS} aggregate keys failed to merge in one pass; "
            f"the last: {table.name} {keys[0]}"
        ) from failure
    key = keys[0]
    error = _storable(f"{type(failure).__name__}: {failure}")[:_ERROR_TEXT_MAX]
    await conn.execute(_ISOLATE, table.name, key[0], [str(v) for v in key[1:]], error)
    stats.isolated.append(IsolatedKey(table.name, key, error))


async def _merge_table(
    conn: Connection, table: DeltaTable, fold_rows: Fold, slots: list[int], limit: int, stats: MergeStats
) -> None:
    rows = await conn.fetch(select_sql(table), slots, limit)
    stats.deltas_read += len(rows)
    if len(rows) >= limit:
        stats.more = True
    if not rows:
        return
    end = len(table.key_columns) + 2  # id, then the key: window_start and the key columns
    by_key: dict[PartKey, list[asyncpg.Record]] = {}
    for row in rows:
        key = tuple(row)[1:end]
        same = by_key.get(key)
        if same is None:
            by_key[key] = [row]
        else:
            same.append(row)

    async def merge(c: Connection, keys: list[PartKey], attempt: MergeStats) -> None:
        await fold_rows(c, {key: by_key[key] for key in keys}, attempt)

    await _merge_isolating(conn, table, list(by_key), merge, stats)


# ---- passes ----------------------------------------------------------------------------------


async def merge_pass(
    conn: Connection, limit: int = DEFAULT_LIMIT, shard: Shard = ALL_SLOTS
) -> MergeStats | None:
    """One pass over `shard` (one transaction); None when other mergers hold all its slots. Keys
    isolated by the pass are in `stats.isolated` and logged at ERROR once it committed."""
    async with conn.transaction():
        slots = list(await conn.fetchval(_LOCK_SLOTS, SLOT_LOCK_CLASS, shard.slots))
        if not slots:
            return None
        stats = MergeStats()
        for table, fold_rows in FOLDS:
            await _merge_table(conn, table, fold_rows, slots, limit, stats)
        if stats.deltas_folded:
            failpoints.hit("merge_before_commit")  # crash tests: every write done, nothing committed
    for isolated in stats.isolated:
        log.error(
            "aggregate key isolated: its merge failed, the other keys go on; "
            "release it with `omnilog aggregates release` once fixed",
            extra={
                "parts_table": isolated.parts_table,
                "key": [str(v) for v in isolated.key],
                "error": isolated.error,
            },
        )
    return stats


async def merge_until_clean(
    conn: Connection, limit: int = DEFAULT_LIMIT, max_passes: int = 20, shard: Shard = ALL_SLOTS
) -> MergeStats | None:
    """Passes until no table had more deltas than `limit` (or `max_passes`); summed stats."""
    total: MergeStats | None = None
    for _ in range(max_passes):
        stats = await merge_pass(conn, limit, shard)
        if stats is None:
            return total
        if total is None:
            total = MergeStats()
        more = stats.more
        stats.more = False
        total.absorb(stats)
        if not more:
            break
    return total


async def pending_deltas(conn: Connection) -> int:
    """Deltas a merger will fold (isolated ones included); server_stats deltas held for a server
    not registered yet are counted by `held_server_deltas` instead: they wait for an operator."""
    counts = " + ".join(
        f"(SELECT count(*) FROM {t.name} d{f' WHERE {t.fold_when}' if t.fold_when else ''})"
        for t in FOLDED_TABLES
    )
    return int(await conn.fetchval(f"SELECT {counts}"))


async def held_server_deltas(conn: Connection, organization_id: str | None = None) -> int:
    """server_stats deltas held because their server is not (yet) registered to their organization
    (of every organization, or of one)."""
    return int(
        await conn.fetchval(
            f"SELECT count(*) FROM server_stats_deltas d WHERE NOT ({SERVER_STATS_DELTAS.fold_when}) "
            "AND ($1::uuid IS NULL OR d.organization_id = $1::uuid)",
            organization_id,
        )
    )


async def count_isolated(conn: Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM aggregate_isolated_keys"))


async def list_isolated(conn: Connection) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT parts_table, window_start, key_values, error, isolated_at FROM aggregate_isolated_keys "
        "ORDER BY isolated_at, parts_table, window_start"
    )
    return [dict(row) for row in rows]


async def release_isolated(
    conn: Connection, parts_table: str | None = None, organization_id: str | None = None
) -> int:
    """Release isolated keys (all, or of one deltas table and/or organization): their deltas are
    still there, so the next pass folds them (and isolates them again if they still fail).
    Returns how many were released."""
    status = await conn.execute(
        "DELETE FROM aggregate_isolated_keys WHERE ($1::text IS NULL OR parts_table = $1) "
        "AND ($2::text IS NULL OR key_values[1] = $2)",
        parts_table,
        organization_id,
    )
    return int(status.split()[-1])


_PRUNE = (
    "DELETE FROM usage_hour_users WHERE window_start < $1",
    "DELETE FROM usage_day_users WHERE window_start < $1",
    "DELETE FROM usage_active_days WHERE window_start < $1",
    "DELETE FROM server_window_sessions WHERE window_start < $1",
    # a month is final once it ended before the cutoff's month began
    "DELETE FROM usage_month_users WHERE window_start < date_trunc('month', $1::timestamptz, 'UTC')",
)


async def prune_user_sets(conn: Connection, max_event_age_days: int, now: datetime | None = None) -> None:
    """Drop the user sets of windows no accepted event can reach any more: older than the oldest
    `started_at` a flush accepts (pipeline/processing/flush.py `counted_since`, which bounds a
    lagging worker too), plus a day for a batch decoded before this prune and committed after it.
    Their unique-user counts are final."""
    cutoff = counted_since(now or datetime.now(UTC), timedelta(days=max_event_age_days)) - timedelta(days=1)
    async with conn.transaction():
        for statement in _PRUNE:
            await conn.execute(statement, cutoff)


# ---- the merger loop ---------------------------------------------------------------------------

PRUNE_EVERY_S: Final = 3600.0


class MergerLoop:
    """Runs `merge_until_clean` over its shards every `interval_s` on a pool: the loop of
    `omnilog merge`, and of a worker's in-process merger (on its own thread, `MergerThread`).

    Without a fixed shard index the loop visits every shard, starting at a different one each
    round, so several replicas spread over the shards by taking whichever slot locks are free.
    Retriable errors (connection lost, serialization failures, ...) are retried through the
    worker's retry policy (operation "merge": attempts in `omnilog_retry_attempts_total`, each
    failure also in `omnilog_aggregate_merge_failures_total{kind="retriable"}`); keys that fail on
    their own are isolated by the pass (`kind="key"`, gauge `omnilog_aggregate_keys_isolated`);
    any other error ends the loop with a `PermanentError`, which stops the process loudly rather
    than let it run on with rollups that silently stopped."""

    def __init__(
        self,
        interval_s: float,
        max_event_age_days: int,
        limit: int = DEFAULT_LIMIT,
        retry_max_s: float = 30.0,
        shards: Sequence[Shard] = (ALL_SLOTS,),
    ) -> None:
        self.interval_s = interval_s
        self.max_event_age_days = max_event_age_days
        self.limit = limit
        self.retry_max_s = retry_max_s
        self.shards = list(shards)
        self.rounds = 0  # completed rounds
        self.last_progress = time.monotonic()  # after each shard's passes: liveness of `omnilog merge`
        self._next_shard = random.randrange(len(self.shards))
        self._last_prune = 0.0
        self._views_ready = False
        self._stop: asyncio.Event | None = None

    async def __call__(
        self, pool: asyncpg.Pool, metrics: WorkerMetrics | None = None, stop: asyncio.Event | None = None
    ) -> None:
        """Rounds until cancelled, or until `stop` is set (the round in progress finishes)."""
        metrics = metrics if metrics is not None else WorkerMetrics(CollectorRegistry())
        stop = stop if stop is not None else asyncio.Event()
        self._stop = stop
        policy = RetryPolicy(metrics, self.retry_max_s)

        # A coroutine function, not a lambda returning a coroutine: tenacity awaits only the former.
        async def attempt() -> MergeStats | None:
            return await self.run_once(pool, metrics)

        while not stop.is_set():
            started = time.perf_counter()
            stats = await policy.call("merge", "postgres", attempt)
            elapsed = time.perf_counter() - started
            self.rounds += 1
            self.last_progress = time.monotonic()
            if stats is not None:
                metrics.aggregate_merge_duration.observe(elapsed)
                metrics.aggregate_parts_merged.inc(stats.deltas_folded)
                metrics.aggregate_merge_failures.labels("key").inc(len(stats.isolated))
                if stats.deltas_read:
                    log.debug(
                        "merge round",
                        extra={
                            "deltas": stats.deltas_folded,
                            "log_rows": stats.log_rows,
                            "seconds": round(elapsed, 3),
                        },
                    )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, self.interval_s - elapsed))

    def _rotation(self) -> list[Shard]:
        start = self._next_shard
        self._next_shard = (start + 1) % len(self.shards)
        return self.shards[start:] + self.shards[:start]

    async def run_once(self, pool: asyncpg.Pool, metrics: WorkerMetrics) -> MergeStats | None:
        """One round: passes until clean over each shard (None: other mergers held every slot),
        the hourly prune, and the isolated-keys gauge (read by every merger, whoever merged)."""
        try:
            async with pool.acquire() as conn:
                if not self._views_ready:
                    await ensure_rollup_views(conn, self.max_event_age_days)
                    self._views_ready = True
                total: MergeStats | None = None
                for shard in self._rotation():
                    if self._stop is not None and self._stop.is_set():
                        break  # stopping: the shards not visited wait for the next merger
                    stats = await merge_until_clean(conn, self.limit, shard=shard)
                    self.last_progress = time.monotonic()
                    if stats is not None:
                        total = total if total is not None else MergeStats()
                        total.absorb(stats)
                if time.monotonic() - self._last_prune > PRUNE_EVERY_S:
                    await prune_user_sets(conn, self.max_event_age_days)
                    self._last_prune = time.monotonic()
                metrics.aggregate_keys_isolated.set(await count_isolated(conn))
                return total
        except Exception as exc:
            if classify(exc) is ErrorKind.RETRIABLE:
                metrics.aggregate_merge_failures.labels("retriable").inc()
            raise


class MergerThread:
    """A worker's background job running a `MergerLoop` on a thread of its own, with its own
    event loop and pool (asyncpg pools belong to one loop), so a merge pass never delays the
    ingest loop's polls and flushes. The job ends when the loop ends: cancelled with the worker
    (the thread is told to stop and joined; a pass in progress rolls back), or with the loop's
    PermanentError, which the worker turns into its own fatal stop."""

    JOIN_TIMEOUT_S: Final = 15.0

    def __init__(self, merger: MergerLoop, database_url: str) -> None:
        self.merger = merger
        self._database_url = database_url

    async def __call__(self, _pool: asyncpg.Pool, metrics: WorkerMetrics) -> None:
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[None] = loop.create_future()
        stopping = threading.Event()

        def report(exc: BaseException | None) -> None:
            if ended.done():
                return
            if exc is None:
                ended.set_result(None)
            else:
                ended.set_exception(exc)

        def run() -> None:
            try:
                asyncio.run(self._run(metrics, stopping))
            except BaseException as exc:  # noqa: BLE001 - handed to the worker's loop, which decides
                loop.call_soon_threadsafe(report, exc)
            else:
                loop.call_soon_threadsafe(report, None)

        thread = threading.Thread(target=run, name="omnilog-merger", daemon=True)
        thread.start()
        try:
            await asyncio.shield(ended)
        finally:
            stopping.set()
            await asyncio.to_thread(thread.join, self.JOIN_TIMEOUT_S)

    async def _run(self, metrics: WorkerMetrics, stopping: threading.Event) -> None:
        # min_size 0: no connection at start, so PostgreSQL being down is the retry policy's
        # business (a retriable error of a round), not a failure to start the thread.
        pool = await asyncpg.create_pool(self._database_url, min_size=0, max_size=1)
        assert pool is not None
        try:
            task = asyncio.create_task(self.merger(pool, metrics))
            while not task.done() and not stopping.is_set():
                await asyncio.wait({task}, timeout=0.1)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                if not stopping.is_set():
                    raise
        finally:
            await pool.close()
