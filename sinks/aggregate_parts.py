"""Aggregate parts: a batch's new events grouped into per-key exact sums and a quantile sketch,
merged into the part rows of the batch's source partition inside the batch transaction.

A part is keyed by (window, key, source_partition). The source partition's owner is the only
writer of its rows (the offset compare-and-set earlier in the transaction proves ownership and
row-locks the partition's offset row, which serialises every transaction writing those parts), so
a plain read, a merge in Python and one multi-row upsert are safe; the upsert still checks the
version it read and fails the batch (which is retried) rather than overwrite a concurrent write.

Key sentinels: the rollup tables use NULL for "all", so a missing server / project is stored as
the nil UUID and a missing rpc_method / model / user_id as '' (see docs/aggregates.md).

Sums are exact at any size: numpy adds int64 only when the batch cannot reach 2^63 (int64 wraps
silently), Python integers do the rest, and the part rows store NUMERIC[] (migration 0005).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final, TypeVar

import numpy as np
import numpy.typing as npt

from pipeline.contract import ValidEvent
from pipeline.sketch import DEFAULT_ALPHA, INTEGER_SAFE_ALPHA, QuantileSketch
from sinks.db import Connection

NO_SERVER: Final = "00000000-0000-0000-0000-000000000000"
NO_PROJECT: Final = NO_SERVER
NO_METHOD: Final = ""
NO_MODEL: Final = ""
NO_USER: Final = ""

HOUR_S: Final = 3600
DAY_S: Final = 86400

# The order of `sums` in each parts table (0004_aggregate_parts.sql).
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

IntMatrix = npt.NDArray[np.int64]

# numpy's int64 additions wrap around silently past this.
INT64_LIMIT: Final = 2**63


class PartConflict(Exception):
    """A part row changed between this batch's read and its write: another writer touched a row
    this partition's owner should own alone. The batch rolls back and is retried."""


@dataclass(slots=True)
class Acc:
    """Exact sums plus a duration/latency sketch: the value of a part or of a rollup row."""

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
class PartTable:
    """A parts table: window_start, key columns, source_partition, sums[], sketch, versions."""

    name: str
    key_columns: tuple[str, ...]  # after window_start
    key_types: tuple[str, ...]  # PostgreSQL array element types for unnest
    sum_names: tuple[str, ...]
    alpha: float
    sum_type: str = "numeric"  # of `sums[]`: NUMERIC since migration 0005 (exact past 2^63)

    @property
    def pk(self) -> tuple[str, ...]:
        return ("window_start", *self.key_columns, "source_partition")

    @property
    def sum_wire_type(self) -> str:
        """How sums travel between Python and PostgreSQL. NUMERIC goes as text: asyncpg's binary
        NUMERIC path (a Decimal per value, both ways) added 5-7 ms to a 5 000-event batch's part
        writes over BIGINT, text adds 2.5-3 ms (docs/aggregates.md). BIGINT (the layout before
        migration 0005, kept for the benchmark's comparison) goes binary."""
        return "text" if self.sum_type == "numeric" else self.sum_type

    def wire_sums(self, values: Iterable[int]) -> list[int] | list[str]:
        return [str(v) for v in values] if self.sum_wire_type == "text" else list(values)


LOG_PARTS: Final = PartTable(
    "log_aggregate_parts",
    ("organization_id", "server_id", "rpc_method"),
    ("uuid", "uuid", "text"),
    LOG_SUMS,
    INTEGER_SAFE_ALPHA,  # the seed's p50/p95/p99 columns are INTEGER: see docs/aggregates.md
)
USAGE_PARTS: Final = PartTable(
    "usage_parts", ("org_id", "project_id", "model"), ("uuid", "uuid", "text"), USAGE_SUMS, DEFAULT_ALPHA
)
USAGE_USER_PARTS: Final = PartTable(
    "usage_user_parts",
    ("org_id", "project_id", "model", "user_id"),
    ("uuid", "uuid", "text", "text"),
    USAGE_SUMS,
    DEFAULT_ALPHA,
)

# A part key: (window start, *key column values). Windows are datetimes in UTC.
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
    Vectorised: one stable argsort of the group ids, `np.add.reduceat` for the sums, and one
    batch `add_many` per group.
    """
    n = len(keys)
    if n == 0:
        return {}
    index: dict[tuple[object, ...], int] = {}
    gid = np.fromiter((index.setdefault(k, len(index)) for k in keys), dtype=np.int64, count=n)
    order = np.argsort(gid, kind="stable")
    counts = np.bincount(gid, minlength=len(index))
    starts = np.zeros(len(index), dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    ordered_values = np.asarray(values, dtype=np.float64)[order]
    group_sums = _sums_per_group(sums[order], starts)
    out: dict[PartKey, Acc] = {}
    for key, g in index.items():
        lo = int(starts[g])
        sketch = QuantileSketch(alpha)
        sketch.add_many(ordered_values[lo : lo + int(counts[g])])
        window = key[0]
        assert isinstance(window, int)
        out[(_as_datetime(window), *key[1:])] = Acc([int(s) for s in group_sums[g]], sketch)
    return out


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


def log_parts(events: Sequence[ValidEvent]) -> dict[PartKey, Acc]:
    """Parts of `log_aggregates`: (hour, organization, server or NO_SERVER, method or NO_METHOD)."""
    keys = [
        (
            window_start(e.started_at.timestamp(), HOUR_S),
            e.organization_id,
            e.server_id or NO_SERVER,
            e.rpc_method or NO_METHOD,
        )
        for e in events
    ]
    sums = np.array([(1, int(e.error), e.bytes_in, e.bytes_out) for e in events], dtype=np.int64).reshape(
        len(events), len(LOG_SUMS)
    )
    durations = np.fromiter((e.duration_ms for e in events), dtype=np.float64, count=len(events))
    return group(keys, durations, sums, LOG_PARTS.alpha)


def _usage_sums(events: Sequence[ValidEvent]) -> IntMatrix:
    rows = []
    for e in events:
        status = usage_status(e)
        rows.append(
            (
                1,
                int(status == "success"),
                int(status == "error"),
                e.input_tokens or 0,
                e.output_tokens or 0,
                e.cache_read_tokens or 0,
                e.cost_cents or 0,
            )
        )
    return np.array(rows, dtype=np.int64).reshape(len(events), len(USAGE_SUMS))


def usage_key(e: ValidEvent) -> tuple[str, str, str]:
    return (e.organization_id, e.project_id or NO_PROJECT, e.model or NO_MODEL)


@dataclass(frozen=True, slots=True)
class UsageParts:
    hourly: dict[PartKey, Acc]  # (hour, org, project, model)
    daily_users: dict[PartKey, Acc]  # (day, org, project, model, user or NO_USER)
    hour_users: list[PartKey]  # (hour, org, project, model, user): real users only, sorted


def usage_parts(events: Sequence[ValidEvent]) -> UsageParts:
    """Parts of the usage rollups, over the events that carry usage fields (`has_usage`)."""
    used = [e for e in events if e.has_usage]
    if not used:
        return UsageParts({}, {}, [])
    sums = _usage_sums(used)
    latency = np.fromiter((e.duration_ms for e in used), dtype=np.float64, count=len(used))
    epochs = [e.started_at.timestamp() for e in used]
    hour_keys = [(window_start(t, HOUR_S), *usage_key(e)) for t, e in zip(epochs, used, strict=True)]
    user_keys = [
        (window_start(t, DAY_S), *usage_key(e), e.user_id or NO_USER)
        for t, e in zip(epochs, used, strict=True)
    ]
    users = sorted(
        {
            (window_start(t, HOUR_S), *usage_key(e), e.user_id)
            for t, e in zip(epochs, used, strict=True)
            if e.user_id
        }
    )
    return UsageParts(
        hourly=group(hour_keys, latency, sums, USAGE_PARTS.alpha),
        daily_users=group(user_keys, latency, sums, USAGE_USER_PARTS.alpha),
        hour_users=[(_as_datetime(hour), *rest) for hour, *rest in users],
    )


# ---- writing (inside the batch transaction) --------------------------------------------------


def _unnest_args(table: PartTable, first: int) -> tuple[str, str]:
    """`unnest($first::timestamptz[], $..::<type>[], ...)` and its column alias list."""
    types = ("timestamptz", *table.key_types)
    params = ", ".join(f"${first + i}::{t}[]" for i, t in enumerate(types))
    aliases = ", ".join(f"k{i}" for i in range(len(types)))
    return params, aliases


def _join_on(table: PartTable, alias: str = "p") -> str:
    columns = ("window_start", *table.key_columns)
    return " AND ".join(f"{alias}.{c} = k.k{i}" for i, c in enumerate(columns))


def read_sql(table: PartTable) -> str:
    params, aliases = _unnest_args(table, 1)
    n = len(table.key_columns) + 1
    return (
        f"SELECT k.ord, p.sums::{table.sum_wire_type}[] AS sums, p.sketch, p.version "
        f"FROM unnest({params}) WITH ORDINALITY AS k({aliases}, ord) "
        f"JOIN {table.name} p ON {_join_on(table)} AND p.source_partition = ${n + 1}"
    )


def upsert_sql(table: PartTable) -> str:
    n_keys = len(table.key_columns) + 1
    n_sums = len(table.sum_names)
    params, _ = _unnest_args(table, 1)
    sum_params = ", ".join(f"${n_keys + 1 + i}::{table.sum_wire_type}[]" for i in range(n_sums))
    sketch_p, version_p, partition_p = n_keys + n_sums + 1, n_keys + n_sums + 2, n_keys + n_sums + 3
    aliases = [f"k{i}" for i in range(n_keys)]
    sum_aliases = [f"s{i}" for i in range(n_sums)]
    columns = ", ".join(("window_start", *table.key_columns, "source_partition", "sums", "sketch", "version"))
    return (
        f"INSERT INTO {table.name} AS p ({columns}) "
        f"SELECT {', '.join(aliases)}, ${partition_p}::int, "
        f"ARRAY[{', '.join(sum_aliases)}]::{table.sum_type}[], sk, ver "
        f"FROM unnest({params}, {sum_params}, ${sketch_p}::bytea[], ${version_p}::bigint[]) "
        f"AS k({', '.join(aliases + sum_aliases)}, sk, ver) "
        f"ON CONFLICT ({', '.join(table.pk)}) DO UPDATE "
        "SET sums = EXCLUDED.sums, sketch = EXCLUDED.sketch, version = EXCLUDED.version, updated_at = now() "
        "WHERE p.version = EXCLUDED.version - 1 "
        "RETURNING 1"
    )


_SQL_CACHE: dict[tuple[str, str], str] = {}


def _sql(kind: str, table: PartTable) -> str:
    found = _SQL_CACHE.get((kind, table.name))
    if found is None:
        found = read_sql(table) if kind == "read" else upsert_sql(table)
        _SQL_CACHE[(kind, table.name)] = found
    return found


def key_columns(keys: Sequence[PartKey]) -> list[list[object]]:
    """Column-wise lists of the keys (window first), as unnest parameters."""
    if not keys:
        return []
    return [list(column) for column in zip(*keys, strict=True)]


async def merge_into_parts(
    conn: Connection, table: PartTable, partition: int, parts: dict[PartKey, Acc]
) -> None:
    """Add `parts` into this partition's part rows: read, merge in Python, one upsert."""
    if not parts:
        return
    # Sorted keys: a stable row order for the upsert's locks (no deadlock with the merger's marks).
    keys = sorted(parts, key=lambda k: tuple(str(v) for v in k))
    columns = key_columns(keys)
    versions = [1] * len(keys)
    for row in await conn.fetch(_sql("read", table), *columns, partition):
        i = row["ord"] - 1
        parts[keys[i]].merge(Acc.decode(row["sums"], row["sketch"]))
        versions[i] = row["version"] + 1
    accs = [parts[k] for k in keys]
    sums = [table.wire_sums(a.sums[j] for a in accs) for j in range(len(table.sum_names))]
    written = await conn.fetch(
        _sql("upsert", table),
        *columns,
        *sums,
        [a.sketch.to_bytes() for a in accs],
        versions,
        partition,
    )
    if len(written) != len(keys):
        raise PartConflict(
            f"{table.name}: {len(keys) - len(written)} part rows of partition {partition} changed "
            "under this batch; retrying"
        )


_INSERT_HOUR_USERS = """
INSERT INTO usage_hour_users (window_start, org_id, project_id, model, user_id, source_partition)
SELECT w, o, p, m, u, $6::int FROM unnest($1::timestamptz[], $2::uuid[], $3::uuid[], $4::text[], $5::text[])
    AS k(w, o, p, m, u)
ON CONFLICT DO NOTHING
"""


async def insert_hour_users(conn: Connection, partition: int, users: Sequence[PartKey]) -> None:
    if users:
        await conn.execute(_INSERT_HOUR_USERS, *key_columns(users), partition)


class AggregatePartsWriter:
    """The batch extension writing log and usage aggregate parts (see module docstring)."""

    async def write(self, conn: Connection, new_events: Sequence[ValidEvent], source_partition: int) -> None:
        await merge_into_parts(conn, LOG_PARTS, source_partition, log_parts(new_events))
        usage = usage_parts(new_events)
        await merge_into_parts(conn, USAGE_PARTS, source_partition, usage.hourly)
        await merge_into_parts(conn, USAGE_USER_PARTS, source_partition, usage.daily_users)
        await insert_hour_users(conn, source_partition, usage.hour_users)
