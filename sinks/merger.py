"""The aggregates merger: folds changed parts into `log_aggregates` and the usage rollups.

One pass is one transaction under `pg_try_advisory_xact_lock` (so one merger at a time across all
workers; a busy lock means another merger is at it and the pass is skipped):

1. the keys of dirty parts (`version <> merged_version`), at most `limit` per table;
2. ALL parts of those keys (every source partition), each with the version it had when read:
   the rollup row of a key is recomputed from scratch (sums added, sketches merged), so a pass
   is idempotent and never double-counts;
3. log_aggregates, hourly: rows per (org, server, method) from the parts, then per (org, server)
   from those rows, then per org from the per-server rows; daily: every affected daily row is the
   merge of its day's hourly rows, at each of the three levels;
4. usage_hourly from usage_parts, usage_daily per user from usage_user_parts, usage_daily for all
   users (user_id NULL) as the merge of the day's usage_hourly rows; unique users exactly, as
   COUNT(DISTINCT user_id) over usage_hour_users;
5. the parts read are marked merged *at the version read*, and only if they still have it:
   `merged_version = v WHERE version = v`, skipping rows a batch has locked. A part written after
   step 2 (or being written) keeps `version <> merged_version` and is merged again next pass.

The merger takes no lock a batch transaction could be waiting for while it waits itself (its only
row locks are the marks, taken with SKIP LOCKED), so it cannot deadlock with the workers.

One key never stops the others: each table's keys are merged in a savepoint; when that fails with
an error attributable to data (a PostgreSQL data error, a corrupt sketch or sum), the key set is
bisected in further savepoints down to the failing key(s), which are recorded in
`aggregate_isolated_keys` (skipped by later passes until an operator releases them) while the
rest commit. Retriable errors fail the pass, which `MergerLoop` retries through the worker's
retry policy; any other error ends the loop (the worker stops loudly).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import asyncpg
from prometheus_client import CollectorRegistry

from pipeline.metrics import WorkerMetrics
from pipeline.processing.retry import ErrorKind, RetryPolicy, classify
from pipeline.sketch import QuantileSketch
from sinks.aggregate_parts import (
    LOG_PARTS,
    USAGE_PARTS,
    USAGE_USER_PARTS,
    Acc,
    PartKey,
    PartTable,
    exact_int,
    fold,
    key_columns,
)
from sinks.aggregate_timescale import ensure_rollup_views
from sinks.db import Connection

log = logging.getLogger("omnilog.merger")

# pg_try_advisory_xact_lock key of a merge pass ("omnimrg" in ASCII).
MERGER_LOCK_KEY: Final = 0x6F6D6E696D7267
DEFAULT_LIMIT: Final = 5000
# More isolated keys than this in one pass is not a few bad keys but something wrong with all of
# them (a bug, a broken deploy): the pass fails instead of holding the whole workload aside.
MAX_ISOLATED_PER_PASS: Final = 100
QUANTILES: Final = (0.5, 0.95, 0.99)

# (window, org, server, method); None in server/method means "all"
LogKey = tuple[Any, ...]


def _text(value: object) -> object:
    return str(value) if isinstance(value, uuid.UUID) else value


def day_of(window: datetime) -> datetime:
    """The UTC day holding `window`."""
    return window.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


# ---- rollup values (pure) --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogValues:
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
    p50, p95, p99 = (acc.sketch.quantile_rounded(q) for q in QUANTILES)
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


@dataclass(frozen=True, slots=True)
class UsageValues:
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


# ---- SQL -------------------------------------------------------------------------------------


def _unnest(types: Sequence[str], first: int = 1) -> str:
    return ", ".join(f"${first + i}::{t}[]" for i, t in enumerate(types))


def dirty_sql(table: PartTable) -> str:
    """Keys with a dirty part, except the isolated ones."""
    as_text = ", ".join(f"p.{c}::text" for c in table.key_columns)
    return (
        f"SELECT DISTINCT p.window_start, {', '.join('p.' + c for c in table.key_columns)} "
        f"FROM {table.name} p WHERE p.version <> p.merged_version AND NOT EXISTS ("
        f"SELECT 1 FROM aggregate_isolated_keys i WHERE i.parts_table = '{table.name}' "
        f"AND i.window_start = p.window_start AND i.key_values = ARRAY[{as_text}]) LIMIT $1"
    )


def _key_types(table: PartTable) -> tuple[str, ...]:
    return ("timestamptz", *table.key_types)


def _aliases(n: int) -> list[str]:
    return [f"k{i}" for i in range(n)]


def load_sql(table: PartTable) -> str:
    types = _key_types(table)
    aliases = _aliases(len(types))
    columns = ("window_start", *table.key_columns)
    on = " AND ".join(f"p.{c} = k.{a}" for c, a in zip(columns, aliases, strict=True))
    return (
        f"SELECT {', '.join('k.' + a for a in aliases)}, p.source_partition, p.version, p.sums, p.sketch "
        f"FROM unnest({_unnest(types)}) AS k({', '.join(aliases)}) JOIN {table.name} p ON {on}"
    )


def mark_sql(table: PartTable) -> str:
    types = _key_types(table)
    aliases = _aliases(len(types))
    n = len(types)
    columns = ("window_start", *table.key_columns)
    on_r = " AND ".join(f"p.{c} = r.{a}" for c, a in zip(columns, aliases, strict=True))
    on_l = " AND ".join(f"p.{c} = l.{c}" for c in (*columns, "source_partition"))
    return (
        f"WITH r AS (SELECT * FROM unnest({_unnest(types)}, ${n + 1}::int[], ${n + 2}::bigint[]) "
        f"AS r({', '.join(aliases)}, part, ver)), "
        f"l AS (SELECT {', '.join('p.' + c for c in columns)}, p.source_partition, r.ver "
        f"FROM {table.name} p JOIN r ON {on_r} AND p.source_partition = r.part AND p.version = r.ver "
        "FOR UPDATE OF p SKIP LOCKED) "
        f"UPDATE {table.name} p SET merged_version = l.ver FROM l WHERE {on_l} AND p.version = l.ver"
    )


_LOG_COLUMNS = "a.total_requests, a.error_requests, a.total_bytes_in, a.total_bytes_out, a.duration_sketch"
_SERVER_CHILDREN = f"""
SELECT k.w, k.o, k.s, {_LOG_COLUMNS}
FROM unnest($1::timestamptz[], $2::uuid[], $3::uuid[]) AS k(w, o, s)
JOIN log_aggregates a ON a.organization_id = k.o AND a.server_id = k.s AND a.rpc_method IS NOT NULL
 AND a.window_type = 'hourly' AND a.window_start = k.w
"""
_ORG_CHILDREN = f"""
SELECT k.w, k.o, {_LOG_COLUMNS}
FROM unnest($1::timestamptz[], $2::uuid[]) AS k(w, o)
JOIN log_aggregates a ON a.organization_id = k.o AND a.server_id IS NOT NULL AND a.rpc_method IS NULL
 AND a.window_type = 'hourly' AND a.window_start = k.w
"""
_LOG_DAY_HOURS = f"""
SELECT k.d, k.o, k.s, k.m, {_LOG_COLUMNS}
FROM unnest($1::timestamptz[], $2::uuid[], $3::uuid[], $4::text[]) AS k(d, o, s, m)
JOIN log_aggregates a ON a.organization_id = k.o
 AND a.server_id IS NOT DISTINCT FROM k.s AND a.rpc_method IS NOT DISTINCT FROM k.m
 AND a.window_type = 'hourly' AND a.window_start >= k.d AND a.window_start < k.d + interval '1 day'
"""
_UPSERT_LOG = """
INSERT INTO log_aggregates AS a (organization_id, server_id, rpc_method, window_type, window_start,
    total_requests, success_requests, error_requests, p50_duration_ms, p95_duration_ms,
    p99_duration_ms, avg_duration_ms, total_bytes_in, total_bytes_out, duration_sketch)
SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::aggregation_window_enum[], $5::timestamptz[],
    $6::bigint[], $7::bigint[], $8::bigint[], $9::int[], $10::int[], $11::int[], $12::float8[],
    $13::numeric[], $14::numeric[], $15::bytea[])
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
_USAGE_DAY_HOURS = f"""
SELECT k.d, k.o, k.p, k.m, {_USAGE_METRICS}, latency_sketch
FROM unnest($1::timestamptz[], $2::uuid[], $3::uuid[], $4::text[]) AS k(d, o, p, m)
JOIN usage_hourly h ON h.org_id = k.o AND h.project_id = k.p AND h.model = k.m
 AND h.bucket >= k.d AND h.bucket < k.d + interval '1 day'
"""
_UNIQUE_USERS = """
SELECT k.w, k.o, k.p, k.m, count(DISTINCT u.user_id) AS users
FROM unnest($1::timestamptz[], $2::uuid[], $3::uuid[], $4::text[]) AS k(w, o, p, m)
LEFT JOIN usage_hour_users u ON u.org_id = k.o AND u.project_id = k.p AND u.model = k.m
 AND u.window_start >= k.w AND u.window_start < k.w + $5::interval
GROUP BY k.w, k.o, k.p, k.m
"""


# ---- one pass --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IsolatedKey:
    parts_table: str
    key: PartKey  # (window_start, *key columns)
    error: str


@dataclass(slots=True)
class MergeStats:
    parts_read: int = 0
    parts_marked: int = 0
    log_rows: int = 0
    usage_rows: int = 0
    more: bool = False  # a table had more dirty keys than the pass's limit
    isolated: list[IsolatedKey] = field(default_factory=list)  # held aside by this pass

    def absorb(self, other: MergeStats) -> None:
        self.parts_read += other.parts_read
        self.parts_marked += other.parts_marked
        self.log_rows += other.log_rows
        self.usage_rows += other.usage_rows
        self.more = self.more or other.more
        self.isolated.extend(other.isolated)


@dataclass(frozen=True, slots=True)
class LoadedPart:
    key: PartKey
    partition: int
    version: int


async def _dirty_keys(conn: Connection, table: PartTable, limit: int, stats: MergeStats) -> list[PartKey]:
    rows = await conn.fetch(dirty_sql(table), limit)
    if len(rows) >= limit:
        stats.more = True
    return [tuple(_text(v) for v in row.values()) for row in rows]


async def _load(
    conn: Connection, table: PartTable, keys: list[PartKey]
) -> tuple[dict[PartKey, Acc], list[LoadedPart]]:
    width = len(table.key_columns) + 1
    loaded: list[LoadedPart] = []
    pairs: list[tuple[PartKey, Acc]] = []
    for row in await conn.fetch(load_sql(table), *key_columns(keys)):
        values = list(row.values())
        key = tuple(_text(v) for v in values[:width])
        loaded.append(LoadedPart(key, row["source_partition"], row["version"]))
        pairs.append((key, Acc.decode(row["sums"], row["sketch"])))
    return fold(pairs), loaded


async def _mark(conn: Connection, table: PartTable, loaded: list[LoadedPart]) -> int:
    if not loaded:
        return 0
    status = await conn.execute(
        mark_sql(table),
        *key_columns([p.key for p in loaded]),
        [p.partition for p in loaded],
        [p.version for p in loaded],
    )
    return int(status.split()[-1])


def _rows_to_accs(rows: Iterable[asyncpg.Record], width: int) -> list[tuple[Any, Acc]]:
    """(key of the first `width` columns, Acc of the 4 log sums + sketch) per row."""
    out = []
    for row in rows:
        values = list(row.values())
        key = tuple(_text(v) for v in values[:width])
        out.append(
            (
                key,
                Acc([exact_int(v) for v in values[width : width + 4]], QuantileSketch.from_bytes(values[-1])),
            )
        )
    return out


async def _upsert_log(conn: Connection, window_type: str, rows: Mapping[Any, Acc]) -> int:
    if not rows:
        return 0
    keys = [k for k in rows if isinstance(k, tuple)]
    values = [log_values(rows[k]) for k in keys]
    await conn.execute(
        _UPSERT_LOG,
        [k[1] for k in keys],
        [k[2] for k in keys],
        [k[3] for k in keys],
        [window_type] * len(keys),
        [k[0] for k in keys],
        [v.total for v in values],
        [v.success for v in values],
        [v.errors for v in values],
        [v.p50 for v in values],
        [v.p95 for v in values],
        [v.p99 for v in values],
        [v.avg for v in values],
        [v.bytes_in for v in values],
        [v.bytes_out for v in values],
        [v.sketch for v in values],
    )
    return len(keys)


async def _merge_log_keys(conn: Connection, dirty: list[PartKey], stats: MergeStats) -> None:
    leaves, loaded = await _load(conn, LOG_PARTS, dirty)
    stats.parts_read += len(loaded)
    stats.log_rows += await _upsert_log(conn, "hourly", leaves)

    servers = sorted({(k[0], k[1], k[2]) for k in leaves}, key=str)
    children = await conn.fetch(_SERVER_CHILDREN, *key_columns(servers))
    by_server = fold(((w, o, s, None), acc) for (w, o, s), acc in _rows_to_accs(children, 3))
    stats.log_rows += await _upsert_log(conn, "hourly", by_server)

    orgs = sorted({(k[0], k[1]) for k in leaves}, key=str)
    children = await conn.fetch(_ORG_CHILDREN, *key_columns(orgs))
    by_org = fold(((w, o, None, None), acc) for (w, o), acc in _rows_to_accs(children, 2))
    stats.log_rows += await _upsert_log(conn, "hourly", by_org)

    hourly_keys = [*leaves, *by_server, *by_org]
    days = sorted({(day_of(k[0]), *k[1:]) for k in hourly_keys if isinstance(k, tuple)}, key=str)
    hours = await conn.fetch(_LOG_DAY_HOURS, *key_columns(days))
    stats.log_rows += await _upsert_log(conn, "daily", fold(_rows_to_accs(hours, 4)))
    stats.parts_marked += await _mark(conn, LOG_PARTS, loaded)


def _usage_args(keys: list[Any], values: list[UsageValues]) -> list[list[Any]]:
    columns: list[list[Any]] = key_columns(keys)
    columns += [[v.sums[j] for v in values] for j in range(7)]
    columns += [
        [v.avg for v in values],
        [v.p50 for v in values],
        [v.p95 for v in values],
        [v.p99 for v in values],
        [v.unique_users for v in values],
        [v.sketch for v in values],
    ]
    return columns


async def _unique_users(conn: Connection, keys: list[Any], span: timedelta) -> dict[Any, int]:
    rows = await conn.fetch(_UNIQUE_USERS, *key_columns(keys), span)
    return {tuple(_text(v) for v in list(r.values())[:4]): int(r["users"]) for r in rows}


async def _merge_usage_hourly_keys(conn: Connection, dirty: list[PartKey], stats: MergeStats) -> None:
    hourly, loaded = await _load(conn, USAGE_PARTS, dirty)
    stats.parts_read += len(loaded)
    keys = sorted(hourly, key=str)
    users = await _unique_users(conn, keys, timedelta(hours=1))
    values = [usage_values(hourly[k], users.get(k, 0)) for k in keys]
    await conn.execute(_UPSERT_USAGE_HOURLY, *_usage_args(keys, values))
    stats.usage_rows += len(keys)

    days = sorted({(day_of(_window(k)), *k[1:]) for k in keys}, key=str)
    rows = await conn.fetch(_USAGE_DAY_HOURS, *key_columns(days))
    daily = fold(
        (
            tuple(_text(v) for v in list(r.values())[:4]),
            Acc(
                [exact_int(v) for v in list(r.values())[4:11]],
                QuantileSketch.from_bytes(r["latency_sketch"]),
            ),
        )
        for r in rows
    )
    day_keys = sorted(daily, key=str)
    day_users = await _unique_users(conn, day_keys, timedelta(days=1))
    day_values = [usage_values(daily[k], day_users.get(k, 0)) for k in day_keys]
    all_users = [(*k, None) for k in day_keys if isinstance(k, tuple)]
    await conn.execute(_UPSERT_USAGE_DAILY, *_usage_args(all_users, day_values))
    stats.usage_rows += len(day_keys)
    stats.parts_marked += await _mark(conn, USAGE_PARTS, loaded)


async def _merge_usage_user_keys(conn: Connection, dirty: list[PartKey], stats: MergeStats) -> None:
    per_user, loaded = await _load(conn, USAGE_USER_PARTS, dirty)
    stats.parts_read += len(loaded)
    keys = sorted(per_user, key=str)
    values = [usage_values(per_user[k], 1 if k[4] else 0) for k in keys]
    await conn.execute(_UPSERT_USAGE_DAILY, *_usage_args(keys, values))
    stats.usage_rows += len(keys)
    stats.parts_marked += await _mark(conn, USAGE_USER_PARTS, loaded)


def _window(key: PartKey) -> datetime:
    window = key[0]
    assert isinstance(window, datetime)
    return window


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
    conn: Connection, table: PartTable, keys: list[PartKey], merge: KeyMerge, stats: MergeStats
) -> None:
    """Merge `keys`; on an attributable failure bisect them until each failing key is alone, and
    isolate it. One bad key among n costs about 2·log2(n) extra savepoints, the good keys merged
    in halves along the way (a rollup row is recomputed from scratch, so the order is free)."""
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
    conn: Connection, table: PartTable, limit: int, stats: MergeStats, merge: KeyMerge
) -> None:
    dirty = await _dirty_keys(conn, table, limit, stats)
    if dirty:
        await _merge_isolating(conn, table, dirty, merge, stats)


# ---- passes ----------------------------------------------------------------------------------


async def merge_pass(conn: Connection, limit: int = DEFAULT_LIMIT) -> MergeStats | None:
    """One pass (one transaction); None when another merger holds the lock. Keys isolated by the
    pass are in `stats.isolated` and logged at ERROR once it committed."""
    async with conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", MERGER_LOCK_KEY):
            return None
        stats = MergeStats()
        await _merge_table(conn, LOG_PARTS, limit, stats, _merge_log_keys)
        await _merge_table(conn, USAGE_PARTS, limit, stats, _merge_usage_hourly_keys)
        await _merge_table(conn, USAGE_USER_PARTS, limit, stats, _merge_usage_user_keys)
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
    conn: Connection, limit: int = DEFAULT_LIMIT, max_passes: int = 20
) -> MergeStats | None:
    """Passes until no table had more dirty keys than `limit` (or `max_passes`); summed stats."""
    total: MergeStats | None = None
    for _ in range(max_passes):
        stats = await merge_pass(conn, limit)
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
    """Release isolated keys (all, or of one parts table and/or organization): their parts are
    still dirty, so the next pass merges them again (and isolates them again if they still fail).
    Returns how many were released."""
    status = await conn.execute(
        "DELETE FROM aggregate_isolated_keys WHERE ($1::text IS NULL OR parts_table = $1) "
        "AND ($2::text IS NULL OR key_values[1] = $2)",
        parts_table,
        organization_id,
    )
    return int(status.split()[-1])


_PRUNE = (
    "DELETE FROM log_aggregate_parts WHERE window_start < $1 AND version = merged_version",
    "DELETE FROM usage_parts WHERE window_start < $1 AND version = merged_version",
    "DELETE FROM usage_user_parts WHERE window_start < $1 AND version = merged_version",
    "DELETE FROM usage_hour_users WHERE window_start < $1",
)


async def prune_parts(conn: Connection, max_event_age_days: int, now: datetime | None = None) -> None:
    """Drop merged parts of windows no accepted event can reach any more (older than the
    longest accepted lateness, plus a day of margin): their rollup rows are final."""
    cutoff = day_of(now or datetime.now(UTC)) - timedelta(days=max_event_age_days + 1)
    async with conn.transaction():
        for statement in _PRUNE:
            await conn.execute(statement, cutoff)


# ---- the background task of a worker ---------------------------------------------------------

PRUNE_EVERY_S: Final = 3600.0


class MergerLoop:
    """Runs `merge_until_clean` every `interval_s` on a pool (a worker's background job).

    Retriable errors (connection lost, serialization failures, ...) are retried through the
    worker's retry policy (operation "merge": attempts in `omnilog_retry_attempts_total`, each
    failure also in `omnilog_aggregate_merge_failures_total{kind="retriable"}`); keys that fail on
    their own are isolated by the pass (`kind="key"`, gauge `omnilog_aggregate_keys_isolated`);
    any other error ends the loop with a `PermanentError`, which stops the worker loudly rather
    than let it ingest on with rollups that silently stopped."""

    def __init__(
        self,
        interval_s: float,
        max_event_age_days: int,
        limit: int = DEFAULT_LIMIT,
        retry_max_s: float = 30.0,
    ) -> None:
        self.interval_s = interval_s
        self.max_event_age_days = max_event_age_days
        self.limit = limit
        self.retry_max_s = retry_max_s
        self._last_prune = 0.0
        self._views_ready = False

    async def __call__(self, pool: asyncpg.Pool, metrics: WorkerMetrics | None = None) -> None:
        metrics = metrics if metrics is not None else WorkerMetrics(CollectorRegistry())
        policy = RetryPolicy(metrics, self.retry_max_s)

        # A coroutine function, not a lambda returning a coroutine: tenacity awaits only the former.
        async def attempt() -> MergeStats | None:
            return await self.run_once(pool, metrics)

        while True:
            started = time.perf_counter()
            stats = await policy.call("merge", "postgres", attempt)
            elapsed = time.perf_counter() - started
            if stats is not None:
                metrics.aggregate_merge_duration.observe(elapsed)
                metrics.aggregate_parts_merged.inc(stats.parts_marked)
                metrics.aggregate_merge_failures.labels("key").inc(len(stats.isolated))
                if stats.parts_read:
                    log.debug(
                        "merge pass",
                        extra={
                            "parts": stats.parts_read,
                            "log_rows": stats.log_rows,
                            "seconds": round(elapsed, 3),
                        },
                    )
            await asyncio.sleep(max(0.0, self.interval_s - elapsed))

    async def run_once(self, pool: asyncpg.Pool, metrics: WorkerMetrics) -> MergeStats | None:
        """Passes until clean (None: another merger holds the lock), the hourly prune, and the
        isolated-keys gauge (read by every worker, whoever merged)."""
        try:
            async with pool.acquire() as conn:
                if not self._views_ready:
                    await ensure_rollup_views(conn, self.max_event_age_days)
                    self._views_ready = True
                stats = await merge_until_clean(conn, self.limit)
                if time.monotonic() - self._last_prune > PRUNE_EVERY_S:
                    await prune_parts(conn, self.max_event_age_days)
                    self._last_prune = time.monotonic()
                metrics.aggregate_keys_isolated.set(await count_isolated(conn))
                return stats
        except Exception as exc:
            if classify(exc) is ErrorKind.RETRIABLE:
                metrics.aggregate_merge_failures.labels("retriable").inc()
            raise
