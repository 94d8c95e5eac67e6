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
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from functools import lru_cache
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

# The finest key of each deltas family, windows in epoch seconds: every coarser key of the family
# (day, month, without the user or the session) is derived from the few distinct finest keys, not
# from the events again.
LogKey = tuple[int, str, str, str]  # (hour, organization, server or NO_SERVER, method or NO_METHOD)
UsageKey = tuple[int, str, str, str, str]  # (hour, organization, project, model, user or NO_USER)
ServerKey = tuple[int, str, str, str]  # (window, organization, server, session or "")


@dataclass(frozen=True, slots=True)
class _Groups:
    """Rows grouped by key: each row's group id (numbered in order of first appearance) and each
    group's key."""

    gid: IntArray
    keys: list[tuple[Any, ...]]

    def coarser(self, key_of: Callable[[tuple[Any, ...]], PartKey]) -> tuple[IntArray, list[PartKey]]:
        """The same rows grouped by the coarser `key_of(key)`, also in order of first appearance
        (the first finest key of a coarser group is the one its first row has)."""
        index: dict[PartKey, int] = {}
        ids = [index.setdefault(key_of(k), len(index)) for k in self.keys]
        return np.array(ids, dtype=np.int64)[self.gid], list(index)


@dataclass(frozen=True, slots=True)
class BatchColumns:
    """What the deltas read from a batch, gathered in one pass over the events: per deltas family
    the group id of each of its rows and the distinct keys, plus the values and sums per row."""

    server_window_s: int
    durations: FloatArray  # every event's duration_ms
    log: _Groups  # every event
    log_sums: IntMatrix  # LOG_SUMS of every event
    usage_rows: IntArray  # the events with usage fields (`has_usage`)
    usage: _Groups  # of usage_rows
    usage_sums: IntMatrix  # USAGE_SUMS of usage_rows
    server_rows: IntArray  # the events naming a server (not the nil UUID)
    server: _Groups  # of server_rows, windows of server_window_s
    errors: IntArray  # every event's error flag, 0 or 1

    @classmethod
    def of(cls, events: Sequence[ValidEvent], server_window_s: int = DEFAULT_SERVER_WINDOW_S) -> BatchColumns:
        width = valid_server_window(server_window_s)
        durations: list[int] = []
        log_sums: list[int] = []  # row after row, reshaped below
        log_index: dict[LogKey, int] = {}
        log_gid: list[int] = []
        usage_rows: list[int] = []
        usage_sums: list[int] = []
        usage_index: dict[UsageKey, int] = {}
        usage_gid: list[int] = []
        server_rows: list[int] = []
        server_index: dict[ServerKey, int] = {}
        server_gid: list[int] = []
        # One loop, locals only: this is the per-event cost of every deltas table.
        for row, e in enumerate(events):
            epoch = e.started_at.timestamp()
            hour = int(epoch // HOUR_S) * HOUR_S  # as `window_start`
            org = e.organization_id
            server = e.server_id
            error = e.error
            durations.append(e.duration_ms)
            log_sums += (1, error, e.bytes_in, e.bytes_out)
            log_key = (hour, org, server or NO_SERVER, e.rpc_method or NO_METHOD)
            log_gid.append(log_index.setdefault(log_key, len(log_index)))
            if server and server != NO_SERVER:
                server_rows.append(row)
                server_key = (int(epoch // width) * width, org, server, e.session_id or "")
                server_gid.append(server_index.setdefault(server_key, len(server_index)))
            if e.has_usage:
                status = e.status
                if status is None:
                    status = "error" if error else "success"
                usage_rows.append(row)
                usage_sums += (
                    1,
                    status == "success",
                    status == "error",
                    e.input_tokens or 0,
                    e.output_tokens or 0,
                    e.cache_read_tokens or 0,
                    e.cost_cents or 0,
                )
                usage_key = (hour, org, e.project_id or NO_PROJECT, e.model or NO_MODEL, e.user_id or NO_USER)
                usage_gid.append(usage_index.setdefault(usage_key, len(usage_index)))
        log_matrix = _matrix(log_sums, len(LOG_SUMS))
        return cls(
            server_window_s=width,
            durations=np.array(durations, dtype=np.float64),
            log=_Groups(_ids(log_gid), list(log_index)),
            log_sums=log_matrix,
            usage_rows=_ids(usage_rows),
            usage=_Groups(_ids(usage_gid), list(usage_index)),
            usage_sums=_matrix(usage_sums, len(USAGE_SUMS)),
            server_rows=_ids(server_rows),
            server=_Groups(_ids(server_gid), list(server_index)),
            errors=log_matrix[:, 1],
        )


def _ids(values: list[int]) -> IntArray:
    return np.array(values, dtype=np.int64)


def _matrix(flat: list[int], width: int) -> IntMatrix:
    return np.array(flat, dtype=np.int64).reshape(len(flat) // width, width)


class _Dates:
    """Windows (epoch seconds) as UTC datetimes, and their days and months, each computed once per
    distinct window: a batch has thousands of keys over a handful of windows."""

    __slots__ = ("_dates", "_months")

    def __init__(self) -> None:
        self._dates: dict[int, datetime] = {}
        self._months: dict[int, int] = {}

    def at(self, epoch_s: int) -> datetime:
        found = self._dates.get(epoch_s)
        if found is None:
            found = self._dates[epoch_s] = _as_datetime(epoch_s)
        return found

    def month(self, epoch_s: int) -> int:
        """`month_start` of the window starting at `epoch_s`."""
        found = self._months.get(epoch_s)
        if found is None:
            found = self._months[epoch_s] = month_start(self.at(epoch_s))
        return found

    def dated(self, keys: Sequence[tuple[Any, ...]]) -> list[PartKey]:
        """Keys with their window (first) as a datetime."""
        for window in {k[0] for k in keys}:  # the few windows first: then a plain lookup per key
            self.at(window)
        dates = self._dates
        return [(dates[k[0]], *k[1:]) for k in keys]


def _day(epoch_s: int) -> int:
    """`window_start(epoch_s, DAY_S)` of whole seconds."""
    return epoch_s - epoch_s % DAY_S


def log_parts(events: Sequence[ValidEvent]) -> dict[PartKey, Acc]:
    """Parts of `log_aggregates`: (hour, organization, server or NO_SERVER, method or NO_METHOD)."""
    return log_parts_of(BatchColumns.of(events))


def log_parts_of(batch: BatchColumns) -> dict[PartKey, Acc]:
    keys = _Dates().dated(batch.log.keys)
    return _grouped(batch.log.gid, keys, batch.durations, batch.log_sums, LOG_DELTAS.alpha)


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


def usage_parts_of(batch: BatchColumns) -> UsageParts:
    fine = batch.usage
    if not fine.keys:
        return UsageParts({}, {}, [], {})
    dates = _Dates()
    latency = batch.durations[batch.usage_rows]
    hour_gid, hour_keys = fine.coarser(lambda k: k[:4])
    user_gid, user_keys = fine.coarser(lambda k: (_day(k[0]), *k[1:]))
    hour_users = sorted(k for k in fine.keys if k[4])  # windows are ints here: same order as datetimes
    first_hour: dict[tuple[Any, ...], int] = {}
    for hour, *rest in hour_users:  # sorted by hour first: setdefault keeps the earliest
        first_hour.setdefault((_day(hour), *rest), hour)
    return UsageParts(
        hourly=_grouped(hour_gid, dates.dated(hour_keys), latency, batch.usage_sums, USAGE_DELTAS.alpha),
        daily_users=_grouped(
            user_gid, dates.dated(user_keys), latency, batch.usage_sums, USAGE_USER_DELTAS.alpha
        ),
        hour_users=dates.dated(hour_users),
        day_users={(dates.at(d), *rest): dates.at(h) for (d, *rest), h in sorted(first_hour.items())},
    )


@lru_cache(maxsize=65536)  # organizations seen by a worker; a hit saves the encode and CRC
def slot_of(organization_id: str) -> int:
    """The delta slot of an organization: a fixed hash, the same in every process and release
    (CRC-32 of the canonical UUID text), so every delta of an organization lands in one slot."""
    return zlib.crc32(organization_id.encode()) % SLOTS


# ---- writing (inside the batch transaction) --------------------------------------------------


@lru_cache(maxsize=2 * len(DELTA_TABLES))
def insert_sql(table: DeltaTable, sum_type: str = "text") -> str:
    """One multi-row INSERT of deltas from unnest arrays: slot, window, keys, sums, sketch. Sums
    travel as `int8` when they all fit (binary, no text to build) and as `text` otherwise; either
    way PostgreSQL casts them to the same NUMERIC values."""
    types = ("int", "timestamptz", *table.key_types, *([sum_type] * len(table.sum_names)), "bytea")
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
    sums = [list(column) for column in zip(*(a.sums for a in accs), strict=True)]
    as_int8 = all(min(column) >= -INT64_LIMIT and max(column) < INT64_LIMIT for column in sums)
    await conn.execute(
        insert_sql(table, "int8" if as_int8 else "text"),
        [slot_of(str(k[1])) for k in keys],
        *key_columns(keys),
        *(sums if as_int8 else ([str(v) for v in column] for column in sums)),
        [a.sketch.to_bytes() for a in accs],
    )


_USER_COLUMNS: Final = "window_start, org_id, project_id, model, user_id"
_USERS_FROM: Final = "unnest($1::timestamptz[], $2::uuid[], $3::uuid[], $4::text[], $5::text[])"


def _insert_users_sql(table: str) -> str:
    # Sorted input and one insert order for every batch (hour set, then day set): batches that
    # wait on each other's new users cannot deadlock. RETURNING gives only the rows inserted.
    return (
        f"INSERT INTO {table} ({_USER_COLUMNS}) SELECT * FROM {_USERS_FROM} ON CONFLICT DO NOTHING "
        "RETURNING window_start, org_id::text AS org_id, project_id::text AS project_id, model, user_id"
    )


def _count_new_users_sql(table: str) -> str:
    """The same insert, answering with the number of new users per (window, org, project, model):
    the only thing the hour and month deltas need (a few rows instead of one per new user)."""
    return (
        f"WITH new AS (INSERT INTO {table} ({_USER_COLUMNS}) SELECT * FROM {_USERS_FROM} "
        "ON CONFLICT DO NOTHING RETURNING window_start, org_id, project_id, model) "
        "SELECT window_start, org_id::text AS org_id, project_id::text AS project_id, model, count(*) AS n "
        "FROM new GROUP BY window_start, org_id, project_id, model"
    )


_INSERT_HOUR_USERS: Final = _count_new_users_sql("usage_hour_users")
_INSERT_DAY_USERS: Final = _insert_users_sql("usage_day_users")


async def count_new_users(conn: Connection, usage: UsageParts) -> dict[PartKey, Acc]:
    """The hourly usage deltas with their last two sums: users new to the hour's and to the day's
    set. The user sets' unique index makes a concurrent batch with the same new user wait for
    this one, then find it there: each user is new in exactly one committed batch."""
    hourly = {k: Acc([*a.sums, 0, 0], a.sketch) for k, a in usage.hourly.items()}
    if usage.hour_users:
        for row in await conn.fetch(_INSERT_HOUR_USERS, *key_columns(usage.hour_users)):
            hourly[(row["window_start"], row["org_id"], row["project_id"], row["model"])].sums[-2] += row["n"]
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
    return server_parts_of(BatchColumns.of(events, width_s), width_s)


def server_parts_of(batch: BatchColumns, width_s: int) -> ServerParts:
    if width_s != batch.server_window_s:
        raise ValueError(f"the batch's server windows are {batch.server_window_s} s, not {width_s} s")
    fine = batch.server
    if not fine.keys:
        return ServerParts({}, [])
    dates = _Dates()
    gid, keys = fine.coarser(lambda k: (*k[:3], width_s))
    rows = batch.server_rows
    sums = np.column_stack(
        (np.ones(rows.size, dtype=np.int64), batch.errors[rows], np.zeros(rows.size, dtype=np.int64))
    )
    return ServerParts(
        _grouped(gid, dates.dated(keys), batch.durations[rows], sums, SERVER_STATS_DELTAS.alpha),
        dates.dated(sorted(k for k in fine.keys if k[3])),
    )


_INSERT_SESSIONS: Final = (
    "WITH new AS (INSERT INTO server_window_sessions (window_start, organization_id, server_id, session_id) "
    "SELECT * FROM unnest($1::timestamptz[], $2::uuid[], $3::uuid[], $4::uuid[]) ON CONFLICT DO NOTHING "
    "RETURNING window_start, organization_id, server_id) "
    # The number of new sessions per window: a row per server window, not per new session.
    "SELECT window_start, organization_id::text AS org, server_id::text AS server, count(*) AS n "
    "FROM new GROUP BY window_start, organization_id, server_id"
)


async def count_new_sessions(conn: Connection, parts: ServerParts, width_s: int) -> dict[PartKey, Acc]:
    """The server deltas with their last sum: sessions new to the window's set (exact, as users)."""
    # New sums, the parts' sketches shared (nothing mutates them): a copy each costs numpy calls.
    windows = {k: Acc(list(a.sums), a.sketch) for k, a in parts.windows.items()}
    if parts.sessions:
        for row in await conn.fetch(_INSERT_SESSIONS, *key_columns(parts.sessions)):
            windows[(row["window_start"], row["org"], row["server"], width_s)].sums[-1] += row["n"]
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


def month_parts_of(batch: BatchColumns) -> MonthParts:
    fine = batch.usage
    if not fine.keys:
        return MonthParts({}, [], [])
    dates = _Dates()
    month = dates.month
    gid, keys = fine.coarser(lambda k: (month(k[0]), *k[1:4]))
    rows = batch.usage_rows
    sums = np.hstack([batch.usage_sums, np.zeros((rows.size, len(MONTH_COUNTS)), dtype=np.int64)])
    return MonthParts(
        _grouped(gid, dates.dated(keys), batch.durations[rows], sums, USAGE_MONTHLY_DELTAS.alpha),
        dates.dated(sorted({(month(k[0]), *k[1:]) for k in fine.keys if k[4]})),
        dates.dated(sorted({(_day(k[0]), *k[1:4]) for k in fine.keys})),
    )


_INSERT_MONTH_USERS: Final = _count_new_users_sql("usage_month_users")
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
    # New sums, the parts' sketches shared (nothing mutates them), as count_new_sessions.
    months = {k: Acc(list(a.sums), a.sketch) for k, a in parts.months.items()}
    if parts.users:
        for row in await conn.fetch(_INSERT_MONTH_USERS, *key_columns(parts.users)):
            months[(row["window_start"], row["org_id"], row["project_id"], row["model"])].sums[-2] += row["n"]
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

    def build(self, new_events: Sequence[ValidEvent], source_partition: int) -> BuiltDeltas:
        """The batch's deltas grouped, without the database: the flush builds them before the
        transaction, while the batch before commits (sinks/index.py `prebuild`)."""
        # The events are read once; every deltas table groups from what that pass gathered.
        batch = BatchColumns.of(new_events, self.server_window_s)
        return BuiltDeltas(
            log=log_parts_of(batch),
            usage=usage_parts_of(batch),
            months=month_parts_of(batch),
            servers=server_parts_of(batch, self.server_window_s),
            server_window_s=self.server_window_s,
        )

    async def write(self, conn: Connection, new_events: Sequence[ValidEvent], source_partition: int) -> None:
        await self.build(new_events, source_partition).write(conn)


@dataclass(frozen=True, slots=True)
class BuiltDeltas:
    """A batch's grouped deltas. `write` counts the users, days and sessions new to their sets and
    inserts the deltas, in the batch transaction. It reads the parts and never changes them, so a
    transaction retried after a failure writes the same deltas again."""

    log: dict[PartKey, Acc]
    usage: UsageParts
    months: MonthParts
    servers: ServerParts
    server_window_s: int

    async def write(self, conn: Connection) -> None:
        await insert_deltas(conn, LOG_DELTAS, self.log)
        await insert_deltas(conn, USAGE_DELTAS, await count_new_users(conn, self.usage))
        await insert_deltas(conn, USAGE_USER_DELTAS, self.usage.daily_users)
        await insert_deltas(conn, USAGE_MONTHLY_DELTAS, await count_month_news(conn, self.months))
        await insert_deltas(
            conn, SERVER_STATS_DELTAS, await count_new_sessions(conn, self.servers, self.server_window_s)
        )
