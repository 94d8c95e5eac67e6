"""One flush: a batch of consumed messages becomes objects in S3 and rows in Postgres.

Stages: decode/validate -> dead letters -> encode -> upload -> Postgres transaction.
Each stage that talks to a dependency is retried with jittered backoff until it succeeds or the
flush is cancelled (revoke, shutdown): a flush never skips a message. Uploaded objects are kept
across retries of the Postgres stage so a database outage does not multiply orphans.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from typing import Any, TypeVar

import asyncpg
from tenacity import AsyncRetrying, retry_if_not_exception_type, wait_random_exponential

from consumers.ingest.batch import Batch
from consumers.ingest.dlq import DeadLetter, DeadLetterLimit, send_dead_letters
from pipeline import failpoints
from pipeline.event import InvalidEvent, ValidationPolicy, ValidEvent, validate_event
from pipeline.metrics import WorkerMetrics
from sinks.db import Connection
from sinks.index import (
    BatchExtension,
    BatchOutcome,
    Fenced,
    IndexedEvent,
    ObjectRecord,
    commit_batch,
)
from sinks.objects import ObjectWriter, encode_lines, object_key, object_uri

log = logging.getLogger("omnilog.flush")
T = TypeVar("T")

GroupKey = tuple[str, date, str | None]


# An upload held longer than this while Postgres retries is re-uploaded under a new key before
# the commit: the janitor's orphan grace (6 h by default) can then never delete an object that a
# slow commit is about to point at.
REUPLOAD_AFTER_S = 3600.0


@dataclass(slots=True)
class PendingObject:
    group: GroupKey
    key: str
    uri: str
    body: bytes
    record: ObjectRecord
    indexed: list[IndexedEvent]
    uploaded_at: float | None = None

    @property
    def uploaded(self) -> bool:
        return self.uploaded_at is not None

    def rekey(self, bucket: str, topic: str) -> None:
        """Point this object (and its events' pointers) at a fresh key, not yet uploaded."""
        org, day, server = self.group
        self.key = object_key(org, day, server, topic)
        self.uri = object_uri(bucket, self.key)
        self.indexed = [IndexedEvent(i.event, self.uri, i.byte_offset, i.byte_length) for i in self.indexed]
        self.record = replace(self.record, object_uri=self.uri)
        self.uploaded_at = None


@dataclass(slots=True)
class FlushReport:
    messages: int
    invalid: int
    in_batch_duplicates: int
    outcome: BatchOutcome
    objects: int
    object_bytes: int
    stage_seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class FlushContext:
    """Everything a flush touches; built once per worker."""

    topic: str
    dlq_topic: str
    consumer_group: str
    pool: asyncpg.Pool
    objects: ObjectWriter
    producer: Any
    metrics: WorkerMetrics
    policy: ValidationPolicy
    member_bytes: int
    gzip_level: int
    retry_max_s: float
    dlq_limit: DeadLetterLimit
    extensions: Sequence[BatchExtension] = ()
    ensure_partitions: Callable[[Connection, set[date]], Awaitable[None]] | None = None
    on_dependency: Callable[[str, bool], None] = lambda name, ok: None


async def _retrying(ctx: FlushContext, stage: str, dependency: str, call: Callable[[], Awaitable[T]]) -> T:
    """Run `call` until it succeeds; Fenced and cancellation pass straight through."""
    attempt = 0
    async for attempt_ctx in AsyncRetrying(
        wait=wait_random_exponential(multiplier=0.2, max=ctx.retry_max_s),
        retry=retry_if_not_exception_type((Fenced, asyncio.CancelledError)),
        reraise=True,
    ):
        with attempt_ctx:
            attempt += 1
            try:
                result = await call()
            except Fenced:
                raise
            except Exception as exc:
                ctx.metrics.flush_failures.labels(stage).inc()
                ctx.on_dependency(dependency, False)
                log.warning(
                    "flush stage failed, retrying",
                    extra={"stage": stage, "attempt": attempt, "error": f"{type(exc).__name__}: {exc}"},
                )
                raise
            ctx.on_dependency(dependency, True)
            return result
    raise AssertionError("unreachable: AsyncRetrying retries forever")


def _decode(ctx: FlushContext, batch: Batch) -> tuple[list[ValidEvent], list[DeadLetter], int]:
    now = datetime.now(UTC)
    valid: list[ValidEvent] = []
    letters: list[DeadLetter] = []
    seen: set[str] = set()
    in_batch_duplicates = 0
    for message in batch.messages:
        result = validate_event(message.value, now, ctx.policy)
        if isinstance(result, InvalidEvent):
            letters.append(DeadLetter(message, result.reason, result.detail))
        elif result.event_id in seen:
            in_batch_duplicates += 1
        else:
            seen.add(result.event_id)
            valid.append(result)
    return valid, letters, in_batch_duplicates


def _encode(ctx: FlushContext, bucket: str, events: list[ValidEvent]) -> list[PendingObject]:
    groups: dict[GroupKey, list[ValidEvent]] = defaultdict(list)
    for event in events:
        groups[(event.organization_id, event.started_at.date(), event.server_id)].append(event)
    pending = []
    for (org, day, server), members in groups.items():
        encoded = encode_lines([e.line for e in members], ctx.member_bytes, ctx.gzip_level)
        key = object_key(org, day, server, ctx.topic)
        uri = object_uri(bucket, key)
        indexed = [
            IndexedEvent(event, uri, offset, length)
            for event, (offset, length) in zip(members, encoded.pointers, strict=True)
        ]
        record = ObjectRecord(uri, org, day, len(members), len(encoded.body))
        pending.append(PendingObject((org, day, server), key, uri, encoded.body, record, indexed))
    return pending


async def flush(ctx: FlushContext, batch: Batch) -> FlushReport:
    """Make `batch` durable. Raises Fenced (nothing written) or DeadLetterLimitExceeded."""
    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    valid, letters, in_batch_duplicates = _decode(ctx, batch)
    stages["decode"] = time.perf_counter() - t0

    # Before anything is written: a bad deploy must stop here, not be drained.
    ctx.dlq_limit.check(len(batch.messages), len(letters))

    if letters:
        t0 = time.perf_counter()
        await _retrying(
            ctx, "dlq", "kafka", lambda: send_dead_letters(ctx.producer, ctx.dlq_topic, ctx.topic, letters)
        )
        stages["dlq"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    pending = _encode(ctx, ctx.objects.bucket, valid)
    stages["encode"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    try:
        await _retrying(ctx, "upload", "s3", lambda: _upload_all(ctx, pending))
        stages["upload"] = time.perf_counter() - t0
        failpoints.hit("after_upload")

        t0 = time.perf_counter()
        days = {e.started_at.date() for e in valid}

        async def commit() -> BatchOutcome:
            stale = [
                p
                for p in pending
                if p.uploaded_at is not None and time.monotonic() - p.uploaded_at > REUPLOAD_AFTER_S
            ]
            if stale:
                ctx.metrics.orphaned_uploads.inc(len(stale))
                for p in stale:
                    p.rekey(ctx.objects.bucket, ctx.topic)
                await _upload_all(ctx, pending)
            indexed = [i for p in pending for i in p.indexed]
            records = [p.record for p in pending]
            async with ctx.pool.acquire() as conn:
                if ctx.ensure_partitions is not None and days:
                    await ctx.ensure_partitions(conn, days)
                return await commit_batch(
                    conn,
                    consumer_group=ctx.consumer_group,
                    topic=ctx.topic,
                    ranges=batch.ranges,
                    indexed=indexed,
                    objects=records,
                    extensions=ctx.extensions,
                )

        outcome = await _retrying(ctx, "postgres", "postgres", commit)
        failpoints.hit("after_postgres_commit")
        stages["postgres"] = time.perf_counter() - t0
    except BaseException:
        orphans = sum(1 for p in pending if p.uploaded)
        if orphans:
            ctx.metrics.orphaned_uploads.inc(orphans)
        raise

    for letter in letters:
        ctx.metrics.events_dead_lettered.labels(letter.reason).inc()
    return FlushReport(
        messages=len(batch.messages),
        invalid=len(letters),
        in_batch_duplicates=in_batch_duplicates,
        outcome=outcome,
        objects=len(pending),
        object_bytes=sum(len(p.body) for p in pending),
        stage_seconds=stages,
    )


async def _upload_all(ctx: FlushContext, pending: list[PendingObject]) -> None:
    async def one(p: PendingObject) -> None:
        await ctx.objects.put(p.key, p.body)
        p.uploaded_at = time.monotonic()
        failpoints.hit("during_upload")

    # A TaskGroup cancels the sibling uploads when one fails, so a retry never races a stale upload.
    async with asyncio.TaskGroup() as group:
        for p in pending:
            if not p.uploaded:
                group.create_task(one(p))
