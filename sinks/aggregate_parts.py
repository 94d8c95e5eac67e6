"""Aggregate deltas: a batch's new events grouped into per-key exact sums and a quantile sketch,
inserted as delta rows inside the batch transaction (insert-only: nothing is read or updated).

One delta row per (key, batch) and deltas table; the merger (sinks/merger.py) folds each into the
rollup rows it touches exactly once and deletes it in the same transaction. The batch extension is
given only the events its transaction indexed for the first time (sinks/index.py), so a re-sent or
replayed event never makes a delta.

Unique users stay exact and incremental: the batch inserts its (window, key, user) pairs into the
hour and day user sets with ON CONFLICT DO NOTHING RETURNING, and only the users the set did not
have yet are counted in the batch's deltas (`new_hour_users`, `new_day_users`).

Every delta carries `slot`, a fixed hash of its organization (0..SLOTS-1): a merger shard is a set
of slots, so all rollup rows of an organization are folded by one merger at a time.

Key sentinels: the rollup tables use NULL for "all", so a missing server / project is stored as
the nil UUID and a missing rpc_method / model / user_id as '' (see docs/aggregates.md).

Sums are exact at any size: numpy adds int64 only when the batch cannot reach 2^63 (int64 wraps
silently), Python integers do the rest, and the delta rows store NUMERIC[] (migration 0005/0007).
"""

from __future__ import annotations

import zlib
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final, TypeVar

import numpy as np
import numpy.typing as npt

from pipeline.contract import ValidEvent
from pipeline.sketch import DEFAULT_ALPHA, INTEGER_SAFE_ALPHA, QuantileSketch, grouped_sketches
from sinks.db import Connection

NO_SERVER: Final = "00000000-0000-0000-0000-000000000000"
NO_PROJECT: Final = NO_SERVER
NO_METHOD: Final = ""
NO_MODEL: Final = ""
NO_USER: Final = ""

HOUR_S: Final = 3600
DAY_S: Final = 86400

# The order of `sums` in each deltas table (0007_aggregate_deltas.sql).
LOG_SUMS: Final = ("total_requests", "error_requests", "total_bytes_in", "total_bytes_out")
USAGE_SUMS: Final = (
    "request_count",
    "success_count",
    "error_count",
    "total_input_tokens",
    "total_output_tokens",
    "total_cache_read_tokens",
    "total_cost_cents",
)

# usage_deltas also carry the users this batch added to the hour's and the day's user sets.
USER_COUNTS: Final = ("new_hour_users", "new_day_users")
USAGE_DELTA_SUMS: Final = (*USAGE_SUMS, *USER_COUNTS)

# Deltas are spread over this many slots by organization; a merger shard is a set of slots.
SLOTS: Final = 64

IntMatrix = npt.NDArray[np.int64]
IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

# numpy's int64 additions wrap around silently past this.
INT64_LIMIT: Final = 2**63


@dataclass(slots=True)
class Acc:
    """Exact sums plus a duration/latency sketch: the value of a delta or of a rollup row."""

    sums: list[int]
    sketch: QuantileSketch

    def merge(self, other: Acc) -> None:
        if len(other.sums) != len(self.sums):
            raise ValueError(f"cannot merge {len(other.sums)} sums into {len(self.sums)}")
        self.sums = [a + b for a, b in zip(self.sums, other.sums, strict=True)]
        self.sketch.merge(other.sketch)

    def copy(self) -> Acc:
        return Acc(list(self.sums), self.sketch.copy())

    @classmethod
    def decode(cls, sums: Sequence[int | Decimal | str], sketch: bytes) -> Acc:
        return cls([exact_int(s) for s in sums], QuantileSketch.from_bytes(sketch))


def exact_int(value: int | Decimal | str) -> int:
    """A stored sum (NUMERIC arrives as Decimal) as an int; a fraction is corrupt data, not a
    value to truncate silently."""
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return int(value)  # digits only: "2.5" or "1e3" raise ValueError
    whole = int(value)
    if whole != value:
        raise ValueError(f"a stored sum is not an integer: {value}")
    return whole


K = TypeVar("K", bound=Hashable)


def fold(items: Iterable[tuple[K, Acc]]) -> dict[K, Acc]:
    """Merge accumulators by key into new ones (the inputs are left unchanged)."""
    out: dict[K, Acc] = {}
    for key, acc in items:
        have = out.get(key)
        if have is None:
            out[key] = acc.copy()
        else:
            have.merge(acc)
    return out


@dataclass(frozen=True, slots=True)
class DeltaTable:
    """A deltas table: id, slot, window_start, key columns, sums[] (NUMERIC), sketch."""

    name: str
    key_columns: tuple[str, ...]  # after window_start
    key_types: tuple[str, ...]  # PostgreSQL array element types for unnest
    sum_names: tuple[str, ...]
    alpha: float
    # An SQL condition on the delta `d` that must hold for the merger to fold it now (empty: always).
    fold_when: str = ""


LOG_DELTAS: Final = DeltaTable(
    "log_aggregate_deltas",
    ("organization_id", "server_id", "rpc_method"),
    ("uuid", "uuid", "text"),
    LOG_SUMS,
    INTEGER_SAFE_ALPHA,  # the seed's p50/p95/p99 columns are INTEGER: see docs/aggregates.md
)
USAGE_DELTAS: Final = DeltaTable(
    "usage_deltas",
    ("org_id", "project_id", "model"),
    ("uuid", "uuid", "text"),
    USAGE_DELTA_SUMS,
    DEFAULT_ALPHA,
)
USAGE_USER_DELTAS: Final = DeltaTable(
    "usage_user_deltas",
    ("org_id", "project_id", "model", "user_id"),
    ("uuid", "uuid", "text", "text"),
    USAGE_SUMS,
    DEFAULT_ALPHA,
)
# server_stats (migration 0010): the users-like set here is the window's sessions.
SERVER_SUMS: Final = ("total_requests", "error_requests", "new_sessions")
SERVER_STATS_DELTAS: Final = DeltaTable(
    "server_stats_deltas",
    ("organization_id", "server_id", "window_seconds"),
    ("uuid", "uuid", "int"),
    SERVER_SUMS,
    INTEGER_SAFE_ALPHA,  # min/max/avg come from the sketch's exact fields; the bound is for later use
    # Held until the server is registered, by this organization (docs/aggregates.md §10): a row of
    # server_stats references mcp_servers, and another tenant's server must not be touched.
    fold_when=(
        "EXISTS (SELECT 1 FROM mcp_servers m "
        "WHERE m.id = d.server_id AND m.organization_id = d.organization_id)"
    ),
)
# usage_monthly (migration 0010): the seven usage sums, then users and days new to the month.
MONTH_COUNTS: Final = ("new_month_users", "new_active_days")
USAGE_MONTHLY_DELTAS: Final = DeltaTable(
    "usage_monthly_deltas",
    ("org_id", "project_id", "model"),
    ("uuid", "uuid", "text"),
    (*USAGE_SUMS, *MONTH_COUNTS),
    DEFAULT_ALPHA,
)
DELTA_TABLES: Final = (LOG_DELTAS, USAGE_DELTAS, USAGE_USER_DELTAS, SERVER_STATS_DELTAS, USAGE_MONTHLY_DELTAS)

# 60 s server windows: a load balancer and a health view want the last minute, not the last hour
# (an hour-old error burst is history), and one row per active server per minute stays small
# (1 440 rows a server-day). docs/aggregates.md §10.
DEFAULT_SERVER_WINDOW_S: Final = 60

# A key of a batch's part (one future delta row): (window start, *key column values).
# Windows are datetimes in UTC.
PartKey = tuple[object, ...]


# ---- grouping (pure) -------------------------------------------------------------------------


def window_start(epoch_s: float, width_s: int) -> int:
    """Start (epoch seconds) of the UTC window of `width_s` holding `epoch_s`."""
    return int(epoch_s // width_s) * width_s


def _as_datetime(epoch_s: int) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)


def group(
    keys: Sequence[tuple[object, ...]], values: npt.ArrayLike, sums: IntMatrix, alpha: float
) -> dict[PartKey, Acc]:
    """One accumulator per distinct key: sums added per column, one sketch of `values` per key.

    `keys[i][0]` is the window start in epoch seconds (turned into a UTC datetime in the result).
    Keys come out in order of first appearance.
    """
    index: dict[tuple[object, ...], int] = {}
    gid = np.fromiter((index.setdefault(k, len(index)) for k in keys), dtype=np.int64, count=len(keys))
    return _grouped(gid, [_dated(k) for k in index], values, sums, alpha)


def _dated(key: tuple[object, ...]) -> PartKey:
    window = key[0]
    assert isinstance(window, int)
    return (_as_datetime(window), *key[1:])


def _grouped(
    gid: IntArray, part_keys: Sequence[PartKey], values: npt.ArrayLike, sums: IntMatrix, alpha: float
) -> dict[PartKey, Acc]:
    """Accumulators of the groups `gid` (0..len(part_keys)-1, every id used): one stable sort of
    the ids, `np.add.reduceat` for the sums and one vectorised pass for all sketches."""
    if not part_keys:
        return {}
    order = np.argsort(gid, kind="stable")
    sizes = np.bincount(gid, minlength=len(part_keys))
    starts = np.zeros(len(part_keys), dtype=np.int64)
    np.cumsum(sizes[:-1], out=starts[1:])
    sketches = grouped_sketches(np.asarray(values, dtype=np.float64)[order], starts, alpha)
    group_sums = _sums_per_group(sums[order], starts).tolist()  # Python ints either way
    return {key: Acc(s, sk) for key, s, sk in zip(part_keys, group_sums, sketches, strict=True)}


def _sums_per_group(ordered: IntMatrix, starts: npt.NDArray[np.int64]) -> npt.NDArray[Any]:
    """Column sums of each group of consecutive rows, exact: int64 when no sum of `len(ordered)`
    values of this magnitude can reach 2^63, else Python integers (an object array: slower, and
    only taken by a batch of millions of events at the largest accepted values)."""
    peak = max(abs(int(ordered.max(initial=0))), abs(int(ordered.min(initial=0))))
    if peak * len(ordered) < INT64_LIMIT:
        return np.add.reduceat(ordered, starts, axis=0)
    return np.add.reduceat(ordered.astype(object), starts, axis=0)


def usage_status(event: ValidEvent) -> str:
    """The usage status of an event: its `status`, else derived from its error flag."""
    if event.status is not None:
        return event.status
    return "error" if event.error else "success"


# ---- one batch as columns ----------------------------------------------------------------------


def _codes(column: Sequence[Hashable]) -> IntArray:
    """Dense integer codes of a column's values, in order of first appearance."""
    index: dict[Hashable, int] = {}
    return np.fromiter((index.setdefault(v, len(index)) for v in column), dtype=np.int64, count=len(column))


def _combined(*codes: IntArray) -> tuple[IntArray, IntArray]:
    """Group ids of the distinct tuples of several code columns, numbered in order of first
    appearance, and the row where each group first appears. Columns are folded in pairwise and
    renumbered each time, so the combined code never exceeds rows**2 (no int64 overflow)."""
    combined = codes[0]
    for column in codes[1:]:
        combined = combined * (int(column.max(initial=0)) + 1) + column
        combined = np.unique(combined, return_inverse=True)[1].astype(np.int64).ravel()
    _, first, inverse = np.unique(combined, return_index=True, return_inverse=True)
    by_appearance = np.argsort(first, kind="stable")
    renumber = np.empty_like(by_appearance)
    renumber[by_appearance] = np.arange(by_appearance.size)
    return renumber[inverse.ravel()].astype(np.int64), first[by_appearance]


def _windows(epochs: FloatArray, width_s: int) -> IntArray:
    """`window_start` of every epoch: float floor division, as Python's `//` on the same floats."""
    return (np.floor_divide(epochs, width_s) * width_s).astype(np.int64)


def _months(epochs: FloatArray) -> IntArray:
    """`month_start` of every epoch (calendar months, UTC)."""
    seconds = np.floor(epochs).astype(np.int64).astype("datetime64[s]")
    return seconds.astype("datetime64[M]").astype("datetime64[s]").astype(np.int64)


@dataclass(frozen=True, slots=True)
class _UsageColumns:
    """The columns and codes of the rows with usage fields, shared by the usage and monthly parts."""

    orgs: list[str]
    projects: list[str]  # NO_PROJECT when missing
    models: list[str]  # NO_MODEL when missing
    users: list[str]  # NO_USER when missing
    epochs: FloatArray
    latency: FloatArray
    key_codes: tuple[IntArray, IntArray, IntArray]  # org, project, model
    user_codes: IntArray
    with_user: IntArray  # rows (of these rows) with a real user
    sums: IntMatrix  # USAGE_SUMS


@dataclass(frozen=True, slots=True)
class BatchColumns:
    """The fields the deltas read, one array or list per field, read from the events once."""

    epochs: FloatArray  # started_at, epoch seconds
    durations: FloatArray
    errors: IntArray  # 0 or 1
    bytes_in: IntArray
    bytes_out: IntArray
    orgs: list[str]
    servers: list[str | None]  # as given (None when missing)
    methods: list[str]  # NO_METHOD when missing
    sessions: list[str | None]
    org_codes: IntArray
    usage: _UsageColumns  # the rows with usage fields only

    @classmethod
    def of(cls, events: Sequence[ValidEvent]) -> BatchColumns:
        n = len(events)
        rows = [
            (
                e.started_at.timestamp(),
                e.duration_ms,
                e.error,
                e.bytes_in,
                e.bytes_out,
                e.organization_id,
                e.server_id,
                e.rpc_method or NO_METHOD,
                e.session_id,
            )
            for e in events
        ]
        epochs, durations, errors, bytes_in, bytes_out, orgs, servers, methods, sessions = (
            [list(c) for c in zip(*rows, strict=True)] if rows else [[] for _ in range(9)]
        )
        epoch_array = np.array(epochs, dtype=np.float64)
        duration_array = np.array(durations, dtype=np.float64)
        org_codes = _codes(orgs)
        return cls(
            epochs=epoch_array,
            durations=duration_array,
            errors=np.array(errors, dtype=np.int64).reshape(n),
            bytes_in=np.array(bytes_in, dtype=np.int64).reshape(n),
            bytes_out=np.array(bytes_out, dtype=np.int64).reshape(n),
            orgs=orgs,
            servers=servers,
            methods=methods,
            sessions=sessions,
            org_codes=org_codes,
            usage=_usage_columns(events, orgs, org_codes, epoch_array, duration_array),
        )


def _usage_columns(
    events: Sequence[ValidEvent],
    orgs: list[str],
    org_codes: IntArray,
    epochs: FloatArray,
    durations: FloatArray,
) -> _UsageColumns:
    rows = [i for i, e in enumerate(events) if e.has_usage]
    used = [events[i] for i in rows]
    projects = [e.project_id or NO_PROJECT for e in used]
    models = [e.model or NO_MODEL for e in used]
    users = [e.user_id or NO_USER for e in used]
    picked = np.array(rows, dtype=np.int64)
    return _UsageColumns(
        orgs=[orgs[i] for i in rows],
        projects=projects,
        models=models,
        users=users,
        epochs=epochs[picked],
        latency=durations[picked],
        key_codes=(org_codes[picked], _codes(projects), _codes(models)),
        user_codes=_codes(users),
        with_user=np.array([i for i, user in enumerate(users) if user], dtype=np.int64),
        sums=np.array([_usage_row(e) for e in used], dtype=np.int64).reshape(len(used), len(USAGE_SUMS)),
    )


def _usage_row(e: ValidEvent) -> tuple[int, ...]:
    status = usage_status(e)
    return (
        1,
        int(status == "success"),
        int(status == "error"),
        e.input_tokens or 0,
        e.output_tokens or 0,
        e.cache_read_tokens or 0,
        e.cost_cents or 0,
    )


def _keys_at(rows: Sequence[int], windows: IntArray, *columns: Sequence[object]) -> list[PartKey]:
    """(window as datetime, *column values) of each row; datetimes cached per window."""
    cache: dict[int, datetime] = {}
    window_list = windows.tolist()
    out: list[PartKey] = []
    for row in rows:
        w = window_list[row]
        when = cache.get(w)
        if when is None:
            when = cache[w] = _as_datetime(w)
        out.append((when, *(c[row] for c in columns)))
    return out


def _distinct_sorted(rows: IntArray, windows: IntArray, *columns: Sequence[str]) -> list[PartKey]:
    """The distinct (window, *columns) of `rows`, sorted by window then columns (the lock order of
    the set inserts), windows as datetimes."""
    if rows.size == 0:
        return []
    picked = [[c[i] for i in rows.tolist()] for c in columns]
    _, first = _combined(windows[rows], *(_codes(c) for c in picked))
    window_list = windows[rows].tolist()
    distinct = sorted((window_list[i], *(c[i] for c in picked)) for i in first.tolist())
    return [_dated(k) for k in distinct]


def log_parts(events: Sequence[ValidEvent]) -> dict[PartKey, Acc]:
    """Parts of `log_aggregates`: (hour, organization, server or NO_SERVER, method or NO_METHOD)."""
    return log_parts_of(BatchColumns.of(events))


def log_parts_of(batch: BatchColumns) -> dict[PartKey, Acc]:
    n = len(batch.orgs)
    if n == 0:
        return {}
    hours = _windows(batch.epochs, HOUR_S)
    servers = [s or NO_SERVER for s in batch.servers]
    gid, first = _combined(hours, batch.org_codes, _codes(servers), _codes(batch.methods))
    keys = _keys_at(first.tolist(), hours, batch.orgs, servers, batch.methods)
    sums = np.column_stack((np.ones(n, dtype=np.int64), batch.errors, batch.bytes_in, batch.bytes_out))
    return _grouped(gid, keys, batch.durations, sums, LOG_DELTAS.alpha)


def usage_key(e: ValidEvent) -> tuple[str, str, str]:
    return (e.organization_id, e.project_id or NO_PROJECT, e.model or NO_MODEL)


@dataclass(frozen=True, slots=True)
class UsageParts:
    hourly: dict[PartKey, Acc]  # (hour, org, project, model): the 7 USAGE_SUMS
    daily_users: dict[PartKey, Acc]  # (day, org, project, model, user or NO_USER)
    hour_users: list[PartKey]  # (hour, org, project, model, user): real users only, sorted
    # (day, org, project, model, user) -> the first hour of that day this batch saw the user in:
    # a user new to the day is counted in that hour's delta (any hour of the day would do).
    day_users: dict[PartKey, datetime]


def usage_parts(events: Sequence[ValidEvent]) -> UsageParts:
    """Parts of the usage rollups, over the events that carry usage fields (`has_usage`)."""
    return usage_parts_of(BatchColumns.of(events))


def usage_parts_of(batch: BatchColumns, days: IntArray | None = None) -> UsageParts:
    u = batch.usage
    if not u.orgs:
        return UsageParts({}, {}, [], {})
    names = (u.orgs, u.projects, u.models)
    hours = _windows(u.epochs, HOUR_S)
    days = _windows(u.epochs, DAY_S) if days is None else days
    hour_gid, hour_first = _combined(hours, *u.key_codes)
    user_gid, user_first = _combined(days, *u.key_codes, u.user_codes)
    hour_users = _distinct_sorted(u.with_user, hours, *names, u.users)
    first_hour: dict[PartKey, datetime] = {}
    for hour, *rest in hour_users:  # sorted by hour first: setdefault keeps the earliest
        assert isinstance(hour, datetime)
        first_hour.setdefault((_day_of(hour), *rest), hour)
    hour_keys = _keys_at(hour_first.tolist(), hours, *names)
    user_keys = _keys_at(user_first.tolist(), days, *names, u.users)
    return UsageParts(
        hourly=_grouped(hour_gid, hour_keys, u.latency, u.sums, USAGE_DELTAS.alpha),
        daily_users=_grouped(user_gid, user_keys, u.latency, u.sums, USAGE_USER_DELTAS.alpha),
        hour_users=hour_users,
        day_users=dict(sorted(first_hour.items())),
    )


def _day_of(hour: datetime) -> datetime:
    return _as_datetime(window_start(hour.timestamp(), DAY_S))


def slot_of(organization_id: str) -> int:
    """The delta slot of an organization: a fixed hash, the same in every process and release
    (CRC-32 of the canonical UUID text), so every delta of an organization lands in one slot."""
    return zlib.crc32(organization_id.encode()) % SLOTS


# ---- writing (inside the batch transaction) --------------------------------------------------


def insert_sql(table: DeltaTable) -> str:
    """One multi-row INSERT of deltas from unnest arrays: slot, window, keys, sums as text, sketch."""
    types = ("int", "timestamptz", *table.key_types, *(["text"] * len(table.sum_names)), "bytea")
    params = ", ".join(f"${i + 1}::{t}[]" for i, t in enumerate(types))
    keys = [f"k{i}" for i in range(len(table.key_columns) + 1)]
    sums = [f"s{i}" for i in range(len(table.sum_names))]
    columns = ", ".join(("slot", "window_start", *table.key_columns, "sums", "sketch"))
    return (
        f"INSERT INTO {table.name} ({columns}) "
        f"SELECT sl, {', '.join(keys)}, ARRAY[{', '.join(sums)}]::numeric[], sk "
        f"FROM unnest({params}) AS d(sl, {', '.join(keys + sums)}, sk)"
    )


def key_columns(keys: Sequence[PartKey]) -> list[list[object]]:
    """Column-wise lists of the keys (window first), as unnest parameters."""
    if not keys:
        return []
    return [list(column) for column in zip(*keys, strict=True)]


async def insert_deltas(conn: Connection, table: DeltaTable, deltas: dict[PartKey, Acc]) -> None:
    """Insert one delta row per key of `deltas` (key = (window, *key columns); the org is key[1])."""
    if not deltas:
        return
    keys = list(deltas)
    accs = list(deltas.values())
    sums = [[str(a.sums[j]) for a in accs] for j in range(len(table.sum_names))]
    await conn.execute(
        insert_sql(table),
        [slot_of(str(k[1])) for k in keys],
        *key_columns(keys),
        *sums,
        [a.sketch.to_bytes() for a in accs],
    )


def _insert_users_sql(table: str) -> str:
    # Sorted input and one insert order for every batch (hour set, then day set): batches that
    # wait on each other's new users cannot deadlock. RETURNING gives only the rows inserted.
    return (
        f"INSERT INTO {table} (window_start, org_id, project_id, model, user_id) "
        "SELECT * FROM unnest($1::timestamptz[], $2::uuid[], $3::uuid[], $4::text[], $5::text[]) "
        "ON CONFLICT DO NOTHING "
        "RETURNING window_start, org_id::text AS org_id, project_id::text AS project_id, model, user_id"
    )


_INSERT_HOUR_USERS: Final = _insert_users_sql("usage_hour_users")
_INSERT_DAY_USERS: Final = _insert_users_sql("usage_day_users")


async def count_new_users(conn: Connection, usage: UsageParts) -> dict[PartKey, Acc]:
    """The hourly usage deltas with their last two sums: users new to the hour's and to the day's
    set. The user sets' unique index makes a concurrent batch with the same new user wait for
    this one, then find it there: each user is new in exactly one committed batch."""
    hourly = {k: Acc([*a.sums, 0, 0], a.sketch) for k, a in usage.hourly.items()}
    if usage.hour_users:
        for row in await conn.fetch(_INSERT_HOUR_USERS, *key_columns(usage.hour_users)):
            hourly[(row["window_start"], row["org_id"], row["project_id"], row["model"])].sums[-2] += 1
    if usage.day_users:
        day_keys = list(usage.day_users)
        for row in await conn.fetch(_INSERT_DAY_USERS, *key_columns(day_keys)):
            key = (row["window_start"], row["org_id"], row["project_id"], row["model"], row["user_id"])
            hour = usage.day_users[key]
            hourly[(hour, row["org_id"], row["project_id"], row["model"])].sums[-1] += 1
    return hourly


# ---- server_stats ------------------------------------------------------------------------------


def valid_server_window(width_s: int) -> int:
    """A server window width: whole seconds dividing a day, so windows never straddle days."""
    if not 1 <= width_s <= DAY_S or DAY_S % width_s:
        raise ValueError(f"a server_stats window must divide a day (86400 s), got {width_s}")
    return width_s


@dataclass(frozen=True, slots=True)
class ServerParts:
    windows: dict[PartKey, Acc]  # (window, org, server, width): total, errors, 0 (new sessions)
    sessions: list[PartKey]  # (window, org, server, session): sorted


def server_parts(events: Sequence[ValidEvent], width_s: int) -> ServerParts:
    """Parts of server_stats: events that name a server (not the nil UUID), per window."""
    return server_parts_of(BatchColumns.of(events), width_s)


def server_parts_of(batch: BatchColumns, width_s: int) -> ServerParts:
    named = np.array([i for i, s in enumerate(batch.servers) if s and s != NO_SERVER], dtype=np.int64)
    if named.size == 0:
        return ServerParts({}, [])
    rows = named.tolist()
    orgs = [batch.orgs[i] for i in rows]
    servers = [str(batch.servers[i]) for i in rows]
    sessions = [batch.sessions[i] or "" for i in rows]
    windows = _windows(batch.epochs[named], width_s)
    gid, first = _combined(windows, batch.org_codes[named], _codes(servers))
    widths = [width_s] * len(rows)
    keys = _keys_at(first.tolist(), windows, orgs, servers, widths)
    sums = np.column_stack(
        (np.ones(len(rows), dtype=np.int64), batch.errors[named], np.zeros(len(rows), dtype=np.int64))
    )
    with_session = np.array([i for i, s in enumerate(sessions) if s], dtype=np.int64)
    return ServerParts(
        _grouped(gid, keys, batch.durations[named], sums, SERVER_STATS_DELTAS.alpha),
        _distinct_sorted(with_session, windows, orgs, servers, sessions),
    )


_INSERT_SESSIONS: Final = (
    "INSERT INTO server_window_sessions (window_start, organization_id, server_id, session_id) "
    "SELECT * FROM unnest($1::timestamptz[], $2::uuid[], $3::uuid[], $4::uuid[]) ON CONFLICT DO NOTHING "
    "RETURNING window_start, organization_id::text AS org, server_id::text AS server"
)


async def count_new_sessions(conn: Connection, parts: ServerParts, width_s: int) -> dict[PartKey, Acc]:
    """The server deltas with their last sum: sessions new to the window's set (exact, as users)."""
    windows = {k: a.copy() for k, a in parts.windows.items()}
    if parts.sessions:
        for row in await conn.fetch(_INSERT_SESSIONS, *key_columns(parts.sessions)):
            windows[(row["window_start"], row["org"], row["server"], width_s)].sums[-1] += 1
    return windows


# ---- usage_monthly -----------------------------------------------------------------------------


def month_start(t: datetime) -> int:
    """Epoch seconds of the first instant of the UTC month holding `t`."""
    t = t.astimezone(UTC)
    return int(datetime(t.year, t.month, 1, tzinfo=UTC).timestamp())


@dataclass(frozen=True, slots=True)
class MonthParts:
    months: dict[PartKey, Acc]  # (month, org, project, model): 7 usage sums, 0, 0
    users: list[PartKey]  # (month, org, project, model, user): real users only, sorted
    days: list[PartKey]  # (day, org, project, model): sorted


def month_parts(events: Sequence[ValidEvent]) -> MonthParts:
    """Parts of usage_monthly, over the events that carry usage fields (as usage_daily)."""
    return month_parts_of(BatchColumns.of(events))


def month_parts_of(batch: BatchColumns, days: IntArray | None = None) -> MonthParts:
    u = batch.usage
    if not u.orgs:
        return MonthParts({}, [], [])
    names = (u.orgs, u.projects, u.models)
    months = _months(u.epochs)
    days = _windows(u.epochs, DAY_S) if days is None else days
    gid, first = _combined(months, *u.key_codes)
    sums = np.hstack([u.sums, np.zeros((len(u.orgs), len(MONTH_COUNTS)), dtype=np.int64)])
    return MonthParts(
        _grouped(gid, _keys_at(first.tolist(), months, *names), u.latency, sums, USAGE_MONTHLY_DELTAS.alpha),
        _distinct_sorted(u.with_user, months, *names, u.users),
        _distinct_sorted(np.arange(len(u.orgs), dtype=np.int64), days, *names),
    )


_INSERT_MONTH_USERS: Final = _insert_users_sql("usage_month_users")
_INSERT_ACTIVE_DAYS: Final = (
    "INSERT INTO usage_active_days (window_start, org_id, project_id, model) "
    "SELECT * FROM unnest($1::timestamptz[], $2::uuid[], $3::uuid[], $4::text[]) ON CONFLICT DO NOTHING "
    "RETURNING window_start, org_id::text AS org_id, project_id::text AS project_id, model"
)


def _month_of(day: datetime) -> datetime:
    return _as_datetime(month_start(day))


async def count_month_news(conn: Connection, parts: MonthParts) -> dict[PartKey, Acc]:
    """The monthly deltas with their last two sums: users new to the month's set, days new to the
    active-days set (each new in exactly one committed batch, as the hour and day user sets)."""
    months = {k: a.copy() for k, a in parts.months.items()}
    if parts.users:
        for row in await conn.fetch(_INSERT_MONTH_USERS, *key_columns(parts.users)):
            months[(row["window_start"], row["org_id"], row["project_id"], row["model"])].sums[-2] += 1
    if parts.days:
        for row in await conn.fetch(_INSERT_ACTIVE_DAYS, *key_columns(parts.days)):
            key = (_month_of(row["window_start"]), row["org_id"], row["project_id"], row["model"])
            months[key].sums[-1] += 1
    return months


class AggregateDeltasWriter:
    """The batch extension inserting log, usage, server_stats and usage_monthly deltas (see
    module docstring). Insert order of the sets is fixed (hour, day, month users, active days,
    sessions), each sorted: batches that wait on each other's new entries cannot deadlock."""

    def __init__(self, server_window_s: int = DEFAULT_SERVER_WINDOW_S) -> None:
        self.server_window_s = valid_server_window(server_window_s)

    async def write(self, conn: Connection, new_events: Sequence[ValidEvent], source_partition: int) -> None:
        # The events are read into columns once; every deltas table groups from those arrays.
        batch = BatchColumns.of(new_events)
        await insert_deltas(conn, LOG_DELTAS, log_parts_of(batch))
        days = _windows(batch.usage.epochs, DAY_S)  # the usage rows' days, shared by both
        usage = usage_parts_of(batch, days)
        await insert_deltas(conn, USAGE_DELTAS, await count_new_users(conn, usage))
        await insert_deltas(conn, USAGE_USER_DELTAS, usage.daily_users)
        await insert_deltas(
            conn, USAGE_MONTHLY_DELTAS, await count_month_news(conn, month_parts_of(batch, days))
        )
        servers = server_parts_of(batch, self.server_window_s)
        await insert_deltas(
            conn, SERVER_STATS_DELTAS, await count_new_sessions(conn, servers, self.server_window_s)
        )
