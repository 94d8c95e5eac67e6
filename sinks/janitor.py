"""Object-storage housekeeping: orphan sweeping and retention, keeping S3 and the index in step.

Orphans: a flush that uploaded objects and then failed or was fenced leaves objects that no
committed batch points at. Every committed object has a row in `ingest_objects` (written in the
batch transaction), so an object older than a grace period with no row is an orphan.

Retention (LiteLLM #29342 is the failure to avoid): index rows go first (partitions dropped by
`sinks.partitions.drop_expired`), then the objects of those dates, then their ledger rows. A crash
in between leaves ledger rows whose objects are deleted on the next run; it never leaves an index
row pointing at a deleted object. Only dates before the retention horizon are expired
(sinks/retention.py): no batch can commit a ledger row or an index row for them any more.

Customer-owned buckets (docs/storage.md): their index and ledger rows expire like any other, but
their objects are never deleted here (the customer's lifecycle rules govern them) and they are
never swept for orphans (the sweep lists the deployment's bucket only).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from pipeline.processing.layout import object_uri, parse_object_uri
from sinks.db import Connection
from sinks.retention import RetentionError, load_horizon

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

log = logging.getLogger("omnilog.janitor")
_DELETE_CHUNK = 1000  # the most keys one DeleteObjects call takes


async def sweep_orphans(
    conn: Connection, s3: S3Client, bucket: str, grace: timedelta = timedelta(hours=6)
) -> int:
    """Delete objects under `org/` older than `grace` that no committed batch recorded; return
    how many were deleted.

    Streams: one listing page (at most 1,000 keys) at a time is checked against the ledger and
    its orphans deleted before the next page is read, so memory does not grow with the bucket.
    The grace period must exceed the longest a flush can take between upload and commit
    (retries during an outage included), or a slow flush would lose its objects.
    """
    cutoff = datetime.now(UTC) - grace
    deleted = 0
    paginator = s3.get_paginator("list_objects_v2")
    async for page in paginator.paginate(Bucket=bucket, Prefix="org/"):
        old = [o["Key"] for o in page.get("Contents", []) if o["LastModified"] < cutoff]
        if not old:
            continue
        uris = [object_uri(bucket, k) for k in old]
        known = {
            r["object_uri"]
            for r in await conn.fetch(
                "SELECT object_uri FROM ingest_objects WHERE object_uri = ANY($1::text[])", uris
            )
        }
        orphans = [k for k, u in zip(old, uris, strict=True) if u not in known]
        if orphans:
            gone, errors = await _delete_page(s3, bucket, orphans)
            deleted += len(gone)
            if errors:
                # Left in place: the next sweep finds them again.
                log.warning("orphan deletes failed", extra={"failed": len(errors), "first": errors[0]})
    log.info("orphans swept", extra={"deleted": deleted})
    return deleted


_LEDGER_PAGE = """
SELECT object_uri, byte_size FROM ingest_objects
 WHERE log_date < $1 AND object_uri > $2
 ORDER BY object_uri
 LIMIT $3
"""


async def expire_before_horizon(
    conn: Connection, s3: S3Client, before: date, *, page: int = _DELETE_CHUNK
) -> Expiry:
    """Delete the objects (and ledger rows) of every date before `before`, in pages.

    Call after the index partitions of those dates are dropped. Refused (nothing deleted) when
    `before` is past the retention horizon: those dates are still accepted, and a batch could be
    committing a ledger row for an object deleted here. Streams the ledger a page at a time
    (keyset on object_uri, index-only on the primary key); an object whose delete failed keeps
    its ledger row, is counted in `failed_objects` and is retried by the next run.
    """
    horizon = await load_horizon(conn)
    if horizon is None or before > horizon:
        raise RetentionError(
            f"refusing to expire objects before {before.isoformat()}: the retention horizon is "
            f"{horizon.isoformat() if horizon else 'not set'} (drop_expired advances it first)"
        )
    result = Expiry()
    after = ""
    while True:
        rows = await conn.fetch(_LEDGER_PAGE, before, after, page)
        if not rows:
            break
        after = rows[-1]["object_uri"]
        await _delete_recorded_objects(conn, s3, rows, result)
    log.info("expired objects deleted", extra={"before": before.isoformat(), "objects": result.objects})
    return result


async def expire_objects(conn: Connection, s3: S3Client, before: date) -> int:
    """`expire_before_horizon`, raising when some objects could not be deleted; returns how many
    were."""
    result = await expire_before_horizon(conn, s3, before)
    if result.failed_objects:
        raise RetentionError(
            f"{result.failed_objects} expired object(s) could not be deleted (their ledger rows stay "
            f"for the next run): {'; '.join(result.errors[:3])}"
        )
    return result.objects


# Per-organization expiry --------------------------------------------------------------------------
# Above the retention horizon, workers still accept an organization's old days, so its rows are
# deleted rather than dropped with a partition. The order within a page is what keeps S3 and the
# index in step while a worker ingests the same organization and day:
#   1. read one page of the organization's ledger rows (`ingest_objects`) before the cutoff;
#   2. delete the index rows that point at exactly those objects (committed);
#   3. delete the objects; 4. delete the ledger rows of the objects whose delete succeeded.
# A batch committing meanwhile writes its own ledger row and index rows for a new, unique key
# (pipeline/processing/layout.py): they are not in the page, so they are left for the next run,
# and no index row ever points at a deleted object. An object whose delete failed keeps its ledger
# row (its index rows are already gone) and is retried on the next run.

# Measured with bench/retention_cost.py (docs/operations.md "Retention"): back to back, pages of
# 500 objects cut a concurrent writer's rate by 26-63 % on a shared 2-core machine. Smaller pages
# and an idle time after each page (a multiple of the page's own time) bound that share.
DEFAULT_EXPIRY_PAGE = 100  # objects per page: bounds each transaction's deleted rows and lock time
DEFAULT_IDLE_RATIO = 4.0  # sleep 4x a page's duration after it: the expiry is busy 1/5 of the time
_USAGE_BATCH_ROWS = 5000

_PAGE = """
SELECT object_uri, log_date, byte_size FROM ingest_objects
 WHERE organization_id = $1::uuid AND log_date < $2
   AND (log_date, object_uri) > ($3::date, $4::text)
 ORDER BY log_date, object_uri
 LIMIT $5
"""
# The started_at bounds let PostgreSQL prune to the page's day partitions; an object holds the
# events of one UTC day (its log_date), so they cover all its rows.
_DELETE_INDEX_ROWS = """
DELETE FROM log_index
 WHERE organization_id = $1::uuid AND started_at >= $2 AND started_at < $3 AND object_uri = ANY($4::text[])
"""
_COUNT_INDEX_ROWS = """
SELECT count(*) FROM log_index
 WHERE organization_id = $1::uuid AND started_at >= $2 AND started_at < $3 AND object_uri = ANY($4::text[])
"""
# (table, organization column, time column): raw usage rows, derived from the same events.
USAGE_TABLES: tuple[tuple[str, str, str], ...] = (
    ("usage_events", "org_id", "time"),
    ("mcp_usage", "org_id", "time"),
)


@dataclass(slots=True)
class Expiry:
    """What one expiry removed (or, dry run, would remove)."""

    index_rows: int = 0
    usage_rows: int = 0
    objects: int = 0
    bytes: int = 0
    failed_objects: int = 0
    # Objects in customer-owned buckets whose index and ledger rows expired: left to the
    # customer's lifecycle rules, not deleted (docs/storage.md).
    released_objects: int = 0
    errors: list[str] = field(default_factory=list)


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


async def _delete_page(s3: S3Client, bucket: str, keys: Sequence[str]) -> tuple[set[str], list[str]]:
    """Delete up to 1000 keys; return the keys deleted and the error messages of the others."""
    try:
        answer = await s3.delete_objects(
            Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True}
        )
    except (BotoCoreError, ClientError) as exc:
        return set(), [f"{bucket}: {type(exc).__name__}: {exc}"]
    failed = {e.get("Key", "") for e in answer.get("Errors", [])}
    errors = [
        f"{bucket}/{e.get('Key')}: {e.get('Code')} {e.get('Message')}" for e in answer.get("Errors", [])
    ]
    return {k for k in keys if k not in failed}, errors


async def _delete_recorded_objects(
    conn: Connection, s3: S3Client, rows: Sequence[Any], result: Expiry
) -> None:
    """Delete the objects of these ledger rows, then the ledger rows of those actually deleted: a
    failed delete keeps its row, so the next run tries again and no orphan goes unrecorded."""
    size = {r["object_uri"]: r["byte_size"] for r in rows}
    by_bucket: dict[str, list[str]] = {}
    for uri in size:
        bucket, key = parse_object_uri(uri)
        by_bucket.setdefault(bucket, []).append(key)
    customers = await _customer_buckets(conn, by_bucket)
    gone: list[str] = []
    released: list[str] = []
    for bucket, keys in by_bucket.items():
        if bucket in customers:
            released.extend(object_uri(bucket, k) for k in keys)
            continue
        deleted, errors = await _delete_page(s3, bucket, keys)
        gone.extend(object_uri(bucket, k) for k in keys if k in deleted)
        result.errors.extend(errors)
    await conn.execute("DELETE FROM ingest_objects WHERE object_uri = ANY($1::text[])", gone + released)
    result.objects += len(gone)
    result.bytes += sum(size[u] for u in gone)
    result.released_objects += len(released)
    result.failed_objects += len(size) - len(gone) - len(released)


async def _customer_buckets(conn: Connection, buckets: Iterable[str]) -> set[str]:
    """Which of these buckets belong to an organization (migration 0011, docs/storage.md): their
    objects are the customer's, deleted by the customer's own lifecycle rules, never by us. Any
    row counts, retired ones too (old pointers still name those buckets)."""
    rows = await conn.fetch(
        "SELECT DISTINCT bucket FROM organization_buckets WHERE bucket = ANY($1::text[])", list(buckets)
    )
    return {r["bucket"] for r in rows}


async def expire_organization(
    conn: Connection,
    s3: S3Client,
    organization_id: str,
    first_kept_day: date,
    *,
    usage_first_kept_day: date | None = None,
    since: date = date.min,
    page: int = DEFAULT_EXPIRY_PAGE,
    idle_ratio: float = DEFAULT_IDLE_RATIO,
    dry_run: bool = False,
) -> Expiry:
    """Delete one organization's index rows, objects, ledger rows and raw usage rows of the days
    before `first_kept_day` (usage: before the later of it and `usage_first_kept_day`).

    Pages of `page` objects, each in its own short transaction, so a worker's batch never waits
    long behind it, and idles `idle_ratio` times a page's duration after it. With `dry_run`,
    counts what would go and deletes nothing. Objects of days before `since` are left alone (a
    dry run passes the horizon, whose days go with partitions).
    """
    if not 1 <= page <= _DELETE_CHUNK:
        raise ValueError(f"page must be within 1..{_DELETE_CHUNK}")
    result = Expiry()
    after: tuple[date, str] = (since, "")  # "" sorts before every URI: the page starts at `since`
    while True:
        rows = await conn.fetch(_PAGE, organization_id, first_kept_day, after[0], after[1], page)
        if not rows:
            break
        after = (rows[-1]["log_date"], rows[-1]["object_uri"])
        uris = [r["object_uri"] for r in rows]
        low = _midnight(min(r["log_date"] for r in rows))
        high = _midnight(max(r["log_date"] for r in rows) + timedelta(days=1))
        if dry_run:
            result.index_rows += await conn.fetchval(_COUNT_INDEX_ROWS, organization_id, low, high, uris)
            customers = await _customer_buckets(conn, {parse_object_uri(u)[0] for u in uris})
            ours = [r for r in rows if parse_object_uri(r["object_uri"])[0] not in customers]
            result.objects += len(ours)
            result.bytes += sum(r["byte_size"] for r in ours)
            result.released_objects += len(rows) - len(ours)
            continue
        page_began = time.monotonic()
        status = await conn.execute(_DELETE_INDEX_ROWS, organization_id, low, high, uris)
        result.index_rows += int(status.rsplit(" ", 1)[1])
        await _delete_recorded_objects(conn, s3, rows, result)
        if idle_ratio > 0:
            # Leave the database to the workers most of the time: the cost to ingest is bounded
            # by the busy share, whatever the number of rows to expire.
            await asyncio.sleep((time.monotonic() - page_began) * idle_ratio)
    usage_cutoff = max(first_kept_day, usage_first_kept_day or first_kept_day)
    for table, org_column, time_column in USAGE_TABLES:
        result.usage_rows += await _delete_usage(
            conn, table, org_column, time_column, organization_id, usage_cutoff, dry_run, idle_ratio
        )
    if result.errors:
        log.warning(
            "object deletes failed",
            extra={"organization_id": organization_id, "failed": result.failed_objects},
        )
    return result


# Dead letters' whole values ------------------------------------------------------------------------
# An oversized dead letter's value is stored under OMNILOG_DLQ_OBJECT_PREFIX (sinks/dead_letters.py),
# outside `org/`: no ledger row records it and no index row points at it, so neither the
# per-organization expiry nor the orphan sweep reaches it. The dead-letter record on the topic names
# it; once older than the dead-letter retention it is deleted by its listing's LastModified (a
# retried flush rewrites the same key, which only makes it younger).


def dead_letter_prefix_is_safe(prefix: str) -> bool:
    """A prefix whose listing can only hold dead letters: not empty and apart from `org/` (an empty
    or overlapping one would expire the events' objects behind their index rows)."""
    return bool(prefix) and not prefix.startswith("org/") and not "org/".startswith(prefix)


async def expire_dead_letter_values(
    s3: S3Client,
    bucket: str,
    prefix: str,
    older_than: datetime,
    *,
    page: int = DEFAULT_EXPIRY_PAGE,
    idle_ratio: float = DEFAULT_IDLE_RATIO,
    dry_run: bool = False,
) -> Expiry:
    """Delete the objects under `prefix` last written before `older_than`, a listing page of `page`
    keys at a time, idling `idle_ratio` times a page's delete after it (the per-organization
    expiry's pacing). A failed delete is counted in `failed_objects`, left in place and found
    again by the next run. With `dry_run`, counts what would go and deletes nothing."""
    if not dead_letter_prefix_is_safe(prefix):
        raise ValueError(f"refusing to expire dead letters under {prefix!r}: it is empty or overlaps org/")
    if not 1 <= page <= _DELETE_CHUNK:
        raise ValueError(f"page must be within 1..{_DELETE_CHUNK}")
    result = Expiry()
    paginator = s3.get_paginator("list_objects_v2")
    pages = paginator.paginate(Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page})
    async for listing in pages:
        size = {o["Key"]: o["Size"] for o in listing.get("Contents", []) if o["LastModified"] < older_than}
        if not size:
            continue
        if dry_run:
            result.objects += len(size)
            result.bytes += sum(size.values())
            continue
        began = time.monotonic()
        deleted, errors = await _delete_page(s3, bucket, list(size))
        result.objects += len(deleted)
        result.bytes += sum(size[k] for k in deleted)
        result.failed_objects += len(size) - len(deleted)
        result.errors.extend(errors)
        if idle_ratio > 0:
            await asyncio.sleep((time.monotonic() - began) * idle_ratio)
    log.info(
        "expired dead-letter values deleted",
        extra={"before": older_than.isoformat(), "objects": result.objects, "failed": result.failed_objects},
    )
    return result


async def _delete_usage(
    conn: Connection,
    table: str,
    org_column: str,
    time_column: str,
    organization_id: str,
    first_kept_day: date,
    dry_run: bool,
    idle_ratio: float,
) -> int:
    where = f"{org_column} = $1::uuid AND {time_column} < $2"
    if dry_run:
        count: int = await conn.fetchval(
            f"SELECT count(*) FROM {table} WHERE {where}", organization_id, _midnight(first_kept_day)
        )
        return count
    total = 0
    # Batches by physical row (tableoid + ctid: unique across partitions), so one statement never
    # holds many row locks or writes a large burst of WAL.
    statement = (
        f"DELETE FROM {table} WHERE (tableoid, ctid) IN "
        f"(SELECT tableoid, ctid FROM {table} WHERE {where} LIMIT {_USAGE_BATCH_ROWS})"
    )
    while True:
        began = time.monotonic()
        status = await conn.execute(statement, organization_id, _midnight(first_kept_day))
        deleted = int(status.rsplit(" ", 1)[1])
        total += deleted
        if deleted < _USAGE_BATCH_ROWS:
            return total
        await asyncio.sleep((time.monotonic() - began) * idle_ratio)  # the same duty cycle as pages
