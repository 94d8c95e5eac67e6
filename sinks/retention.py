"""The retention horizon: the first UTC day whose rows are still kept, and the lock that makes
dropping a day safe against batches in flight.

One row in `retention_horizon` (migration 0006). `omnilog maintain` advances it, never backwards,
in its own committed transaction *before* it drops any partition or object older than it. Every
batch transaction reads it under a share lock, so the advance waits for the batches that checked
the old horizon to commit, and every batch after it sees the new one. Hence: once a day's
partition is dropped, no batch can commit a row for that day, and no worker re-creates it.

Contract for the ingest worker (one flush):

1. At the start of the flush, outside any transaction: ``horizon = await load_horizon(conn)``.
   Every valid event whose UTC day ``started_at`` is before it (``is_expired(day, horizon)``) is
   dead-lettered with reason ``expired`` and goes no further (no object, no partition, no row).
2. Inside the batch transaction, before the first row is written: ``locked = await
   lock_horizon(conn)``. If an event of the batch is before ``locked`` (maintain advanced the
   horizon after step 1), roll the transaction back and redo the flush from step 1, which now
   dead-letters it. The share lock lasts until the batch commits or rolls back.
3. ``lock_horizon`` may wait while ``maintain`` advances the horizon: the advance queues behind
   the batches already holding the lock and ahead of later ones, for at most its lock timeout
   (`ADVANCE_LOCK_TIMEOUT`, 5 s), then gives up and leaves everything as it was. That wait is
   expected, not an error. A NULL horizon (None) means nothing was ever dropped: every day is
   accepted.

Why `FOR SHARE` and not `FOR KEY SHARE`: an UPDATE that does not change the key takes the row lock
FOR NO KEY UPDATE, which conflicts with FOR SHARE but not with FOR KEY SHARE; a key-share lock
would not hold the advance back at all. Share locks do not conflict with each other, so batches
never wait for one another here.

Why `advance_horizon` also takes `LOCK TABLE ... IN EXCLUSIVE MODE` first: PostgreSQL lets a new
FOR SHARE row locker pass an UPDATE that is already waiting for the row, so with batches
overlapping back to back a plain UPDATE could wait indefinitely. Table locks are granted in queue
order: EXCLUSIVE conflicts with the ROW SHARE table lock that every `SELECT ... FOR SHARE` takes,
so the advance waits for the batches before it, and the batches after it wait for the advance.
Plain reads (`load_horizon`, dashboards) take ACCESS SHARE and never wait.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, timedelta

import asyncpg

from sinks.db import Connection

# How long an advance may wait for the batch transactions in flight (and make later batches wait
# behind it) before giving up; maintain then fails and the next run tries again.
ADVANCE_LOCK_TIMEOUT = timedelta(seconds=5)

_LOAD = "SELECT first_kept_day FROM retention_horizon WHERE singleton"
_LOCK = "SELECT first_kept_day FROM retention_horizon WHERE singleton FOR SHARE"
# GREATEST ignores NULL, so a first advance from "no horizon" takes the new day.
_ADVANCE = """
INSERT INTO retention_horizon AS h (singleton, first_kept_day) VALUES (TRUE, $1)
ON CONFLICT (singleton) DO UPDATE
SET first_kept_day = GREATEST(h.first_kept_day, EXCLUDED.first_kept_day), updated_at = now()
RETURNING first_kept_day
"""


class RetentionError(Exception):
    """The retention horizon was misused, or could not be advanced."""


class HorizonBusy(RetentionError):
    """The advance could not take its lock in time: a batch transaction kept it; nothing changed."""


def is_expired(day: date, horizon: date | None) -> bool:
    """True when `day` (a UTC date) lies before the horizon: its rows are no longer accepted."""
    return horizon is not None and day < horizon


def expired_days(days: Iterable[date], horizon: date | None) -> list[date]:
    return sorted({d for d in days if is_expired(d, horizon)})


async def load_horizon(conn: Connection) -> date | None:
    """The horizon in force (a plain read: it never waits and holds nothing)."""
    value: date | None = await conn.fetchval(_LOAD)
    return value


async def lock_horizon(conn: Connection) -> date | None:
    """The horizon in force, share-locked until the caller's transaction ends (the batch's).

    Refused outside a transaction: in autocommit the lock would end with the statement and
    protect nothing.
    """
    if not conn.is_in_transaction():
        raise RetentionError("lock_horizon must be called inside the batch transaction")
    value: date | None = await conn.fetchval(_LOCK)
    return value


async def advance_horizon(
    conn: Connection, first_kept_day: date, *, lock_timeout: timedelta = ADVANCE_LOCK_TIMEOUT
) -> date:
    """Move the horizon to `first_kept_day` unless it is already there or later; return the
    horizon in force. Commits before returning, so whatever the caller drops next is behind a
    horizon every later batch sees.

    Waits for the batch transactions that share-locked the horizon (at most `lock_timeout`, then
    `HorizonBusy` with nothing changed). When the horizon is already at or past `first_kept_day`
    it takes no lock and writes nothing.
    """
    if conn.is_in_transaction():
        # The new horizon must be committed before anything is dropped behind it.
        raise RetentionError("advance_horizon must be called outside a transaction")
    current = await load_horizon(conn)
    if current is not None and current >= first_kept_day:
        return current
    timeout_ms = max(1, round(lock_timeout.total_seconds() * 1000))
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('lock_timeout', $1, true)", f"{timeout_ms}ms")
            await conn.execute("LOCK TABLE retention_horizon IN EXCLUSIVE MODE")
            advanced: date = await conn.fetchval(_ADVANCE, first_kept_day)
    except asyncpg.LockNotAvailableError:
        raise HorizonBusy(
            f"could not advance the retention horizon to {first_kept_day.isoformat()} within "
            f"{lock_timeout.total_seconds():g} s: a batch transaction held it; nothing was dropped, "
            "the next run tries again"
        ) from None
    return advanced


# Per organization --------------------------------------------------------------------------------
# Each organization keeps its own number of days (organizations.log_retention_days, else its plan's
# default); `omnilog maintain` deletes its older rows and objects above the horizon, and the horizon
# itself (the partition-drop line) follows the longest retention, so no organization loses a day to
# a dropped partition before its own retention says so.

PLAN_RETENTION_DAYS: dict[str, int] = {"free": 7, "pro": 30, "enterprise": 365}
# The seed's column default and plan_type default: an organization without a plan is on "free".
_DEFAULT_PLAN = "free"


@dataclass(frozen=True, slots=True)
class OrganizationRetention:
    organization_id: str
    days: int
    explicit: bool  # organizations.log_retention_days was set; otherwise the plan's default
    plan: str | None = None

    def first_kept_day(self, today: date) -> date:
        return today - timedelta(days=self.days)


def effective_retention_days(explicit_days: int | None, plan: str | None) -> int:
    """The explicit value wins; otherwise the plan's default (an unknown or missing plan: free's)."""
    if explicit_days is not None:
        return explicit_days
    return PLAN_RETENTION_DAYS.get(plan or _DEFAULT_PLAN, PLAN_RETENTION_DAYS[_DEFAULT_PLAN])


async def load_organization_retention(conn: Connection) -> list[OrganizationRetention]:
    """Every registered organization's retention, read fresh on each run: a plan or retention
    change takes effect at the next run (a longer one never brings deleted days back)."""
    rows = await conn.fetch(
        "SELECT id::text AS id, plan_type::text AS plan, log_retention_days FROM organizations ORDER BY id"
    )
    return [
        OrganizationRetention(
            r["id"],
            effective_retention_days(r["log_retention_days"], r["plan"]),
            r["log_retention_days"] is not None,
            r["plan"],
        )
        for r in rows
    ]
