"""Time partitions of the big tables: create them ahead or on demand, drop them past retention.

Native PostgreSQL range partitions, one per UTC day (one per month for health_checks). With
TimescaleDB the same tables are hypertables: chunks appear by themselves, so creating is a no-op,
and dropping goes through `drop_chunks` (see sinks/timescale.py).

Why partitions are created with CREATE TABLE + ATTACH PARTITION rather than
CREATE TABLE ... PARTITION OF: ATTACH takes only a SHARE UPDATE EXCLUSIVE lock on the parent,
which does not conflict with the ingest workers' inserts or with readers, while PARTITION OF
takes ACCESS EXCLUSIVE and would stall every batch and every query behind it. Drops use
DETACH PARTITION ... CONCURRENTLY for the same reason.

Retention and the horizon (sinks/retention.py): `drop_expired` first advances the retention
horizon (committed), then drops only partitions wholly before it. `ensure_day_partitions` refuses
to create a partition for a day before the horizon (`PartitionExpired`), checked again under the
creation lock, so a dropped day is never re-created, whether or not a worker's cache remembers it.

There is deliberately no DEFAULT partition: creating a partition next to a non-empty default one
scans the default partition (under lock) to prove no row belongs to the new range, and rows that
landed there would have to be moved out by hand. A missing day is created on demand instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Literal

from sinks import timescale
from sinks.db import Connection
from sinks.retention import ADVANCE_LOCK_TIMEOUT, advance_horizon, expired_days, load_horizon

Period = Literal["day", "month"]

# Key space of the advisory locks taken here (first int of the two-int form); the second int is
# hashtext(table), so creators and droppers of one table serialise and other tables don't wait.
PARTITION_LOCK_CLASS = 0x6F6D6E70  # "omnp"


class PartitionError(Exception):
    """A partition operation was misused or the table is not set up as expected."""


class PartitionExpired(PartitionError):
    """Days before the retention horizon were asked for: their partitions are dropped (or about
    to be) and are never created again. Events of those days are dead-lettered as expired."""

    def __init__(self, table: str, days: list[date], horizon: date) -> None:
        listed = ", ".join(d.isoformat() for d in days)
        super().__init__(
            f"{table}: refusing to create partitions for {listed}, before the retention horizon "
            f"{horizon.isoformat()} (expired days are dead-lettered, never re-created)"
        )
        self.table = table
        self.days = days
        self.horizon = horizon


@dataclass(frozen=True, slots=True)
class TimePartitioned:
    """A table partitioned by time; the migrations mark where its partitioning clause goes."""

    table: str
    column: str
    period: Period
    compress_segment_by: tuple[str, ...] = ()
    # None: the caller's retention (the longest accepted event age) applies, and with it the
    # retention horizon; a fixed retention is the table's own business (no ingest batch writes it).
    fixed_retention_days: int | None = None

    @property
    def follows_horizon(self) -> bool:
        return self.fixed_retention_days is None

    def period_start(self, day: date) -> date:
        return day if self.period == "day" else day.replace(day=1)

    def period_end(self, start: date) -> date:
        if self.period == "day":
            return start + timedelta(days=1)
        return (start.replace(day=28) + timedelta(days=4)).replace(day=1)

    def partition_name(self, start: date) -> str:
        stamp = start.strftime("%Y%m%d" if self.period == "day" else "%Y%m")
        return f"{self.table}_p{stamp}"

    def name_pattern(self) -> str:
        digits = 8 if self.period == "day" else 6
        return f"^{re.escape(self.table)}_p[0-9]{{{digits}}}$"

    def start_of(self, partition_name: str) -> date:
        stamp = partition_name.rsplit("_p", 1)[1]
        fmt = "%Y%m%d" if self.period == "day" else "%Y%m"
        return datetime.strptime(stamp, fmt).replace(tzinfo=UTC).date()


TIME_PARTITIONED: dict[str, TimePartitioned] = {
    spec.table: spec
    for spec in (
        TimePartitioned("log_index", "started_at", "day", compress_segment_by=("organization_id",)),
        TimePartitioned("usage_events", "time", "day", compress_segment_by=("org_id", "project_id")),
        TimePartitioned("mcp_usage", "time", "day"),
        # The seed keeps 30 days of health checks and suggests monthly partitions.
        TimePartitioned("health_checks", "checked_at", "month", fixed_retention_days=30),
    )
}

DEFAULT_DAYS_AHEAD = 3


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _utc_midnight(day: date) -> str:
    # An explicit +00 offset: bounds must not depend on the session's TimeZone setting.
    return f"{day.isoformat()} 00:00:00+00"


def create_partition_sql(spec: TimePartitioned, start: date) -> list[str]:
    """Statements creating and attaching the partition that starts at `start`."""
    name = _quote(spec.partition_name(start))
    parent = _quote(spec.table)
    return [
        f"CREATE TABLE IF NOT EXISTS {name} "
        f"(LIKE {parent} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE)",
        f"ALTER TABLE {parent} ATTACH PARTITION {name} "
        f"FOR VALUES FROM ('{_utc_midnight(start)}') TO ('{_utc_midnight(spec.period_end(start))}')",
    ]


@dataclass(slots=True)
class PartitionCache:
    """Partitions known to exist, per table, so the ingest path asks the catalog only on a miss.

    One cache per database. It also remembers the latest retention horizon it was shown
    (`note_horizon`): the horizon never moves backwards, so a day before a remembered horizon is
    refused without any query, and entries for such days are forgotten. An entry for a day the
    cache does not yet know to be expired can be stale (maintain dropped it since): that is
    harmless, because the batch transaction re-checks the horizon under lock
    (sinks/retention.py) before writing a row.
    """

    known: dict[str, set[date]] = field(default_factory=dict)
    self_managed: set[str] = field(default_factory=set)  # hypertables: chunks appear by themselves
    horizon: date | None = None

    def covers(self, table: str, starts: Iterable[date]) -> bool:
        if table in self.self_managed:
            return True
        have = self.known.get(table)
        return have is not None and all(s in have for s in starts)

    def note_horizon(self, horizon: date | None) -> None:
        if horizon is None or (self.horizon is not None and horizon <= self.horizon):
            return
        self.horizon = horizon
        for table in self.known:
            self._forget_expired(table)

    def remember(self, table: str, starts: Iterable[date]) -> None:
        self.known.setdefault(table, set()).update(starts)
        self._forget_expired(table)

    def _forget_expired(self, table: str) -> None:
        spec = TIME_PARTITIONED.get(table)
        horizon = self.horizon
        if horizon is None or spec is None or not spec.follows_horizon:
            return
        starts = self.known.get(table, set())
        starts.difference_update({s for s in starts if spec.period_end(s) <= horizon})


@dataclass(frozen=True, slots=True)
class _TableState:
    kind: Literal["partitioned", "hypertable"]
    attached: frozenset[date]
    detached: frozenset[date]  # leftovers of an interrupted drop, or a pending concurrent detach


_INSPECT = r"""
WITH parent AS (SELECT oid, relkind, relnamespace FROM pg_class WHERE oid = to_regclass($1))
SELECT parent.relkind::text AS kind, c.relname::text AS part,
       (i.inhparent IS NOT NULL AND i.inhparent = parent.oid AND NOT i.inhdetachpending) AS attached
FROM parent
LEFT JOIN pg_class c ON c.relnamespace = parent.relnamespace AND c.relkind = 'r' AND c.relname ~ $2
LEFT JOIN pg_inherits i ON i.inhrelid = c.oid
"""


async def _inspect(conn: Connection, spec: TimePartitioned) -> _TableState:
    rows = await conn.fetch(_INSPECT, spec.table, spec.name_pattern())
    if not rows:
        raise PartitionError(f"table {spec.table} does not exist: run `omnilog migrate` first")
    kind = rows[0]["kind"]
    if kind == "r":
        # A plain table registered as time-partitioned is a hypertable (sinks/migrate.py makes it
        # one when TimescaleDB is present).
        return _TableState("hypertable", frozenset(), frozenset())
    if kind != "p":
        raise PartitionError(f"{spec.table} is neither partitioned nor a hypertable (relkind {kind})")
    attached = {spec.start_of(r["part"]) for r in rows if r["part"] is not None and r["attached"]}
    detached = {spec.start_of(r["part"]) for r in rows if r["part"] is not None and not r["attached"]}
    return _TableState("partitioned", frozenset(attached), frozenset(detached))


def _spec(table: str) -> TimePartitioned:
    try:
        return TIME_PARTITIONED[table]
    except KeyError:
        raise PartitionError(f"{table} is not a time-partitioned table") from None


def _utc_date(value: date) -> date:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise PartitionError(f"naive datetime {value!r}: pass UTC dates or aware datetimes")
        return value.astimezone(UTC).date()
    return value


def _require_autocommit(conn: Connection, what: str) -> None:
    # Creating a partition inside a batch transaction would hold its locks until the batch
    # commits and could deadlock two workers; dropping concurrently cannot run in a transaction.
    if conn.is_in_transaction():
        raise PartitionError(f"{what} must be called outside a transaction")


async def ensure_day_partitions(
    conn: Connection,
    table: str,
    days: Iterable[date],
    cache: PartitionCache | None = None,
) -> list[date]:
    """Make sure the partitions holding `days` (UTC dates) exist; return the starts it created.

    A datetime among `days` stands for its UTC date (partitions are UTC days, while an event's
    local date can differ).

    Safe when several workers call it at once for the same day: each creation runs in its own
    short transaction under a per-table advisory lock and re-checks the catalog after taking it.
    With a warm `cache` and known days it does no I/O; on a miss it reads the retention horizon
    and lists partitions (two queries). Must be called outside a transaction (before the batch
    transaction that inserts).

    Raises `PartitionExpired`, creating nothing for those days, when a day lies before the
    retention horizon (the one the cache remembers, then the one in the database; and once more
    under the creation lock, so a concurrent `drop_expired` cannot slip in between).
    """
    spec = _spec(table)
    utc_days = {_utc_date(d) for d in days}
    starts = {spec.period_start(d) for d in utc_days}
    if cache is not None and spec.follows_horizon:
        _refuse_expired(spec, utc_days, cache.horizon)
    if cache is not None and cache.covers(table, starts):
        return []
    _require_autocommit(conn, "ensure_day_partitions")
    if spec.follows_horizon:
        horizon = await load_horizon(conn)
        if cache is not None:
            cache.note_horizon(horizon)
        _refuse_expired(spec, utc_days, horizon)
    state = await _inspect(conn, spec)
    if state.kind == "hypertable":
        if cache is not None:
            cache.self_managed.add(table)
        return []
    created: list[date] = []
    for start in sorted(starts - state.attached):
        if await _create_one(conn, spec, start):
            created.append(start)
    if cache is not None:
        cache.remember(table, state.attached | starts)
    return created


def _refuse_expired(spec: TimePartitioned, days: Iterable[date], horizon: date | None) -> None:
    expired = expired_days(days, horizon)
    if expired:
        assert horizon is not None
        raise PartitionExpired(spec.table, expired, horizon)


_IS_ATTACHED = """
SELECT EXISTS (
    SELECT 1 FROM pg_inherits
    WHERE inhrelid = to_regclass($1) AND inhparent = to_regclass($2) AND NOT inhdetachpending
)
"""


async def _create_one(conn: Connection, spec: TimePartitioned, start: date) -> bool:
    name = spec.partition_name(start)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", PARTITION_LOCK_CLASS, spec.table)
        if spec.follows_horizon:
            # drop_expired commits the horizon before it takes this lock to drop: a creation that
            # got the lock first is dropped right after, and one that got it later sees here the
            # horizon that forbids it.
            horizon = await load_horizon(conn)
            if horizon is not None and spec.period_end(start) <= horizon:
                raise PartitionExpired(spec.table, [start], horizon)
        # Read committed: this statement sees whatever a concurrent creator committed while we
        # waited for the lock.
        if await conn.fetchval(_IS_ATTACHED, name, spec.table):
            return False
        for statement in create_partition_sql(spec, start):
            await conn.execute(statement)
    return True


def _today() -> date:
    return datetime.now(UTC).date()


async def create_ahead(
    conn: Connection,
    days_ahead: int = DEFAULT_DAYS_AHEAD,
    *,
    today: date | None = None,
    cache: PartitionCache | None = None,
) -> dict[str, list[date]]:
    """Create every time-partitioned table's partitions from today to today + `days_ahead`."""
    if days_ahead < 0:
        raise PartitionError("days_ahead must be >= 0")
    first = today or _today()
    days = [first + timedelta(days=n) for n in range(days_ahead + 1)]
    return {table: await ensure_day_partitions(conn, table, days, cache) for table in TIME_PARTITIONED}


async def drop_expired(
    conn: Connection,
    retention_days: int,
    *,
    today: date | None = None,
    lock_timeout: timedelta = ADVANCE_LOCK_TIMEOUT,
) -> list[date]:
    """Advance the retention horizon to today − retention, then drop the partitions that lie
    entirely before the horizon in force; return the dropped days.

    The horizon is committed first (`sinks.retention.advance_horizon`, which waits up to
    `lock_timeout` for batch transactions in flight, else raises `HorizonBusy` having dropped
    nothing), so no batch can commit a row for a day dropped here and no worker re-creates it.
    It never moves backwards: after a run with a shorter retention, a longer one drops from the
    later horizon still in force.

    The returned days (of the day-partitioned tables: the index and usage rows) are the dates whose
    objects the S3 janitor may delete. health_checks keeps its own 30-day retention, outside the
    horizon, and its months are not reported. With TimescaleDB the chunks are dropped with
    drop_chunks, up to the same horizon.
    """
    if retention_days < 1:
        raise PartitionError("retention_days must be >= 1")
    _require_autocommit(conn, "drop_expired")
    now_day = today or _today()
    horizon = await advance_horizon(conn, now_day - timedelta(days=retention_days), lock_timeout=lock_timeout)
    dropped_days: set[date] = set()
    for spec in TIME_PARTITIONED.values():
        if spec.fixed_retention_days is not None:
            cutoff = now_day - timedelta(days=spec.fixed_retention_days)
        else:
            cutoff = horizon
        state = await _inspect(conn, spec)
        if state.kind == "hypertable":
            # The background policy stays a day behind what this routine drops (see
            # sinks/timescale.py): a safety net if maintenance stops, never ahead of the horizon.
            for statement in timescale.retention_policy_statements(spec, retention_days):
                await conn.execute(statement)
            days = await timescale.drop_chunks_before(conn, spec.table, cutoff)
        else:
            days = await _drop_partitions(conn, spec, cutoff)
        if spec.period == "day":
            dropped_days.update(days)
    return sorted(dropped_days)


async def _drop_partitions(conn: Connection, spec: TimePartitioned, cutoff: date) -> list[date]:
    parent = _quote(spec.table)
    dropped: list[date] = []
    # A session lock (DETACH ... CONCURRENTLY cannot run inside a transaction block); it conflicts
    # with the transaction-level lock of ensure_day_partitions for the same table. The catalog is
    # read under it, so a partition created just before is seen and dropped too.
    await conn.execute("SELECT pg_advisory_lock($1, hashtext($2))", PARTITION_LOCK_CLASS, spec.table)
    try:
        state = await _inspect(conn, spec)
        for start in sorted(s for s in state.attached if spec.period_end(s) <= cutoff):
            name = _quote(spec.partition_name(start))
            await conn.execute(f"ALTER TABLE {parent} DETACH PARTITION {name} CONCURRENTLY")
            await conn.execute(f"DROP TABLE IF EXISTS {name}")
            dropped.append(start)
        for start in sorted(s for s in state.detached if spec.period_end(s) <= cutoff):
            name = spec.partition_name(start)
            if await conn.fetchval(
                "SELECT inhdetachpending FROM pg_inherits WHERE inhrelid = to_regclass($1)", name
            ):
                # An earlier concurrent detach was interrupted: finish it before dropping.
                await conn.execute(f"ALTER TABLE {parent} DETACH PARTITION {_quote(name)} FINALIZE")
            await conn.execute(f"DROP TABLE IF EXISTS {_quote(name)}")
            dropped.append(start)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1, hashtext($2))", PARTITION_LOCK_CLASS, spec.table)
    days: list[date] = []
    for start in sorted(dropped):
        day = start
        while day < spec.period_end(start):
            days.append(day)
            day += timedelta(days=1)
    return days
