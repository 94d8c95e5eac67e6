"""Object-storage housekeeping: orphan sweeping and retention, keeping S3 and the index in step.

Orphans: a flush that uploaded objects and then failed or was fenced leaves objects that no
committed batch points at. Every committed object has a row in `ingest_objects` (written in the
batch transaction), so an object older than a grace period with no row is an orphan.

Retention (LiteLLM #29342 is the failure to avoid): index rows go first (partitions dropped by
`sinks.partitions.drop_expired`), then the objects of those dates, then their ledger rows. A crash
in between leaves ledger rows whose objects are deleted on the next run; it never leaves an index
row pointing at a deleted object. Only dates before the retention horizon are expired
(sinks/retention.py): no batch can commit a ledger row or an index row for them any more.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING

from pipeline.processing.layout import object_uri, parse_object_uri
from sinks.db import Connection
from sinks.retention import RetentionError, load_horizon

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

log = logging.getLogger("omnilog.janitor")
_DELETE_CHUNK = 1000  # the most keys one DeleteObjects call takes


async def _delete_keys(s3: S3Client, bucket: str, keys: Sequence[str]) -> None:
    for start in range(0, len(keys), _DELETE_CHUNK):
        chunk = keys[start : start + _DELETE_CHUNK]
        await s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True})


async def sweep_orphans(
    conn: Connection, s3: S3Client, bucket: str, grace: timedelta = timedelta(hours=6)
) -> list[str]:
    """Delete objects under `org/` older than `grace` that no committed batch recorded.

    The grace period must exceed the longest a flush can take between upload and commit
    (retries during an outage included), or a slow flush would lose its objects.
    """
    cutoff = datetime.now(UTC) - grace
    orphans: list[str] = []
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
        orphans.extend(k for k, u in zip(old, uris, strict=True) if u not in known)
    await _delete_keys(s3, bucket, orphans)
    log.info("orphans swept", extra={"deleted": len(orphans)})
    return orphans


async def expire_objects(conn: Connection, s3: S3Client, before: date) -> int:
    """Delete the objects (and ledger rows) of every date before `before`.

    Call after the index partitions of those dates are dropped. Refused (nothing deleted) when
    `before` is past the retention horizon: those dates are still accepted, and a batch could be
    committing a ledger row for an object deleted here.
    """
    horizon = await load_horizon(conn)
    if horizon is None or before > horizon:
        raise RetentionError(
            f"refusing to expire objects before {before.isoformat()}: the retention horizon is "
            f"{horizon.isoformat() if horizon else 'not set'} (drop_expired advances it first)"
        )
    rows = await conn.fetch("SELECT object_uri FROM ingest_objects WHERE log_date < $1", before)
    by_bucket: dict[str, list[str]] = {}
    for row in rows:
        bucket, key = parse_object_uri(row["object_uri"])
        by_bucket.setdefault(bucket, []).append(key)
    for bucket, keys in by_bucket.items():
        await _delete_keys(s3, bucket, keys)
    await conn.execute("DELETE FROM ingest_objects WHERE log_date < $1", before)
    log.info("expired objects deleted", extra={"before": before.isoformat(), "objects": len(rows)})
    return len(rows)
