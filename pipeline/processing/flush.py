"""One flush: a batch of consumed messages becomes objects in S3 and rows in Postgres.

Two halves, each a chain of small functions below with typed results:
  prepare(ctx, batch) -> Prepared:
    horizon -> decode (Decoded) -> dead letters -> encode (PendingObject; the raw values let go,
    the gzip bodies hold them from then on) -> upload
  commit(ctx, prepared) -> FlushReport:
    transaction (BatchOutcome) -> Kafka commit
`flush` runs both for one batch. The worker pipelines them (pipeline/processing/flush_pipeline.py):
batch N+1 is prepared while batch N commits, and N+1 commits only after N has.
Why this order makes every offset land in exactly one place: pipeline/processing/offsets.py.
Storage is reached only through the interfaces of pipeline/processing/store.py.

Failure handling, decided by the worker's one retry policy (pipeline/processing/retry.py):
- a dependency that is unavailable is retried, with backoff, for as long as it lasts: a flush never
  skips a message. Uploaded objects are kept across retries of the transaction, so a database
  outage does not multiply orphans; an upload held too long is renewed before the commit;
- except an organization's own bucket that the object store gives up on (BucketUnavailable, after
  its bound): that organization's events of the batch are dead-lettered (`storage_unavailable`)
  and the rest is committed, so one tenant's bucket never holds everyone's partitions;
- decoding never raises: every message is a valid event or a dead letter;
- a data error in the transaction is traced to the message(s) causing it (bisection in rolled-back
  transactions); those are dead-lettered (`rejected_by_database`) and the rest is committed. If no
  single message explains it, the error is permanent and the worker stops (PermanentError);
- events whose day the retention horizon has passed are dead-lettered (`expired`), before the
  transaction or, if `maintain` moved the horizon meanwhile, when the transaction finds out.
Offsets: every message of the batch ends in exactly one place (an index row, a counted duplicate or a
dead letter) before the transaction advances the stored offsets; dead letters are produced first, so
a crash can only repeat them (at-least-once), never lose them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Final

from pipeline import failpoints
from pipeline.contract import InvalidEvent, ValidationPolicy, ValidEvent, validate_event
from pipeline.metrics import WorkerMetrics
from pipeline.processing.batch import Batch, Message
from pipeline.processing.dead_letters import DeadLetter, DeadLetterLimit
from pipeline.processing.isolate import find_culprits
from pipeline.processing.layout import encode_lines, object_key, object_uri, parse_object_uri
from pipeline.processing.offsets import Fenced, HorizonMoved
from pipeline.processing.retry import ErrorKind, PermanentError, RetryPolicy, classify
from pipeline.processing.store import (
    BatchOutcome,
    BucketUnavailable,
    DeadLetterSink,
    IndexedEvent,
    IndexStore,
    ObjectRecord,
    ObjectStore,
)

log = logging.getLogger("omnilog.flush")

GroupKey = tuple[str, date, str | None]


# An upload held longer than this while Postgres retries is re-uploaded under a new key before
# the commit: the janitor's orphan grace (6 h by default) can then never delete an object that a
# slow commit is about to point at.
REUPLOAD_AFTER_S: Final = 3600.0


@dataclass
class FlushContext:
    """Everything a flush touches; built once per worker."""

    topic: str
    index: IndexStore
    objects: ObjectStore
    dead_letters: DeadLetterSink
    metrics: WorkerMetrics
    policy: ValidationPolicy
    member_bytes: int
    gzip_level: int
    retry: RetryPolicy
    dlq_limit: DeadLetterLimit
    # The last step: commit the batch's offsets to Kafka (advisory, for lag tools; never raises).
    commit_kafka: Callable[[Batch], Awaitable[None]] | None = None
    last_horizon: date | None = None  # the retention horizon as last read
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)  # the validation reference
    monotonic: Callable[[], float] = time.monotonic  # how long uploads have been held


@dataclass(slots=True)
class PendingObject:
    group: GroupKey
    key: str
    uri: str
    body: bytes
    record: ObjectRecord
    indexed: list[IndexedEvent]
    line_ids: list[str]  # the event id of each line of `body`, in order (pointers may be removed)
    uploaded_at: float | None = None

    @property
    def uploaded(self) -> bool:
        return self.uploaded_at is not None

    def stale(self, now: float) -> bool:
        return self.uploaded_at is not None and now - self.uploaded_at > REUPLOAD_AFTER_S

    @property
    def bucket(self) -> str:
        return parse_object_uri(self.uri)[0]

    def stored_lines(self) -> dict[str, bytes]:
        """Each event's line as stored in `body` (a whole gzip stream: its members concatenated)."""
        lines = gzip.decompress(self.body).split(b"\n")[:-1]  # every line ends with a newline
        return dict(zip(self.line_ids, lines, strict=True))

    def rekey(self, topic: str) -> None:
        """Point this object (and its events' pointers) at a fresh key in the same bucket, not yet
        uploaded."""
        org, day, server = self.group
        self.key = object_key(org, day, server, topic)
        self.uri = object_uri(self.bucket, self.key)
        self.indexed = [IndexedEvent(i.event, self.uri, i.byte_offset, i.byte_length) for i in self.indexed]
        self.record = replace(self.record, object_uri=self.uri)
        self.uploaded_at = None


@dataclass(slots=True)
class Decoded:
    valid: list[ValidEvent]
    letters: list[DeadLetter]
    in_batch_duplicates: int
    # event_id -> the message it came from (for a later dead letter). Once encoded, a message whose
    # value is its event's stored line holds None instead: `_sources` reads it back from the object.
    source: dict[str, Message]


@dataclass(slots=True)
class FlushReport:
    messages: int
    letters: list[DeadLetter]
    in_batch_duplicates: int
    outcome: BatchOutcome
    objects: list[int]  # compressed size of each object written
    sources: dict[str, Message]  # event_id -> its message (partition, offset, timestamp)
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def invalid(self) -> int:
        return len(self.letters)


@dataclass(slots=True)
class Prepared:
    """A batch ready for its transaction: dead letters produced, objects uploaded. Nothing of it is
    durable in PostgreSQL yet: `commit` makes it so, `discard` gives it up."""

    batch: Batch
    decoded: Decoded
    pending: list[PendingObject]
    stages: dict[str, float]  # seconds per stage so far; commit adds its own
    # The transaction's rows, built by the store ahead (IndexStore.prebuild); it ignores them for
    # a changed batch (rekeyed, expired or refused events).
    prebuilt: object = None


class _UploadsStale(Exception):
    """Objects held too long to commit safely: renew them, then try the transaction again."""


@contextlib.contextmanager
def _timed(stages: dict[str, float], stage: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        stages[stage] = stages.get(stage, 0.0) + time.perf_counter() - t0


async def flush(ctx: FlushContext, batch: Batch) -> FlushReport:
    """Make `batch` durable: `prepare` it, then `commit` it. The worker runs the two halves
    separately (pipeline/processing/flush_pipeline.py); this is the one-batch-at-a-time form."""
    return await commit(ctx, await prepare(ctx, batch))


async def prepare(ctx: FlushContext, batch: Batch) -> Prepared:
    """Everything before the transaction: horizon -> decode -> dead letters -> encode -> upload.

    Nothing the stored offsets depend on is written here (dead letters may repeat, uploads are
    unreferenced until the transaction points at them), so this may run while the batch before
    commits. Raises DeadLetterLimitExceeded or PermanentError (the worker must stop); whatever
    ends it early, its uploads are counted as orphans."""
    stages: dict[str, float] = {}
    horizon = await _load_horizon(ctx)
    with _timed(stages, "decode"):
        decoded = decode(batch.messages, ctx.policy, ctx.clock(), horizon)

    # Before anything is written: a bad deploy must stop here, not be drained.
    ctx.dlq_limit.check(len(batch.messages), len(decoded.letters))

    with _timed(stages, "dlq"):
        await _send_dead_letters(ctx, decoded.letters)
    with _timed(stages, "encode"):
        pending = _encode(ctx, decoded.valid)
        _release_values(decoded)
    try:
        with _timed(stages, "upload"):
            set_aside = await _upload_or_set_aside(ctx, pending, decoded)
        failpoints.hit("after_upload")
        await _dead_letter_set_aside(ctx, decoded, set_aside)
        with _timed(stages, "encode"):
            prebuilt = _prebuild(ctx, batch, pending)
    except BaseException:
        _count_orphans(ctx, pending)
        raise
    return Prepared(batch, decoded, pending, stages, prebuilt)


def _prebuild(ctx: FlushContext, batch: Batch, pending: list[PendingObject]) -> object:
    """The transaction's rows, built now: this CPU work then overlaps the batch before's time in
    PostgreSQL. A failure here is left to the transaction, which builds the rows again inside the
    retry and isolation that find the message at fault: building ahead never stops a partition."""
    try:
        return ctx.index.prebuild(batch.ranges, [i for p in pending for i in p.indexed])
    except Exception:
        log.warning("could not build the batch's rows ahead; the transaction builds them", exc_info=True)
        return None


async def commit(ctx: FlushContext, prepared: Prepared) -> FlushReport:
    """The batch transaction, then the Kafka commit.

    Call it only once the batch before it (on the same partitions) has committed: this batch's
    ranges start where that one's end, so before then its compare-and-set can only fail. Raises
    Fenced (nothing written) or PermanentError (the worker must stop); whatever ends it before the
    transaction commits, its uploads are counted as orphans."""
    batch, decoded, pending, stages = prepared.batch, prepared.decoded, prepared.pending, prepared.stages
    try:
        with _timed(stages, "postgres"):
            outcome = await _commit(ctx, batch, pending, decoded, prepared.prebuilt)
        failpoints.hit("after_postgres_commit")
    except BaseException:
        _count_orphans(ctx, pending)
        raise
    if ctx.commit_kafka is not None:
        with _timed(stages, "kafka_commit"):
            await ctx.commit_kafka(batch)
        failpoints.hit("after_kafka_commit")
    return FlushReport(
        messages=len(batch.messages),
        letters=decoded.letters,
        in_batch_duplicates=decoded.in_batch_duplicates,
        outcome=outcome,
        objects=[len(p.body) for p in pending],
        sources=decoded.source,
        stage_seconds=stages,
    )


def discard(ctx: FlushContext, prepared: Prepared) -> None:
    """Give up a prepared batch without committing it (the batch before it did not commit). Its
    uploads become orphans for the janitor; its dead letters were produced and will be produced
    again when the batch is replayed (at-least-once, the dead-letter contract)."""
    _count_orphans(ctx, prepared.pending)


def _count_orphans(ctx: FlushContext, pending: Sequence[PendingObject]) -> None:
    orphans = sum(1 for p in pending if p.uploaded)
    if orphans:
        ctx.metrics.orphaned_uploads.inc(orphans)


async def _load_horizon(ctx: FlushContext) -> date | None:
    """The horizon, to dead-letter expired events up front. It is an early answer only: the batch
    transaction re-reads it under a lock and is what the guarantee rests on. So while PostgreSQL is
    unavailable the flush goes on with the last horizon seen (uploading meanwhile), instead of
    waiting here; the transaction's retries wait for PostgreSQL."""
    try:
        ctx.last_horizon = await ctx.index.load_horizon()
    except Exception as exc:
        kind = classify(exc)
        if kind is not ErrorKind.RETRIABLE:
            raise PermanentError("load_horizon", kind, exc) from exc
        log.info("retention horizon not readable now; using the last one seen", extra={"error": repr(exc)})
    return ctx.last_horizon


# ---- decode ------------------------------------------------------------------------------------


def decode(
    messages: Sequence[Message], policy: ValidationPolicy, now: datetime, horizon: date | None
) -> Decoded:
    """Every message becomes a valid event or a dead letter; this never raises.

    The accepted `started_at` window is measured from the record's Kafka timestamp, capped at `now`:
    a batch replayed after a crash then gets the same verdicts (one offset can never be dead-lettered
    first and indexed later). Only a record stamped in the future of the worker's clock falls back to
    the clock (see docs/contract.md); topics should use LogAppendTime.
    """
    valid: list[ValidEvent] = []
    letters: list[DeadLetter] = []
    source: dict[str, Message] = {}
    in_batch_duplicates = 0
    now_ms = int(now.timestamp() * 1000)
    reference, reference_ms = now, now_ms
    floor = counted_since(now, policy.max_age)
    for message in messages:
        stamp = message.timestamp_ms
        if 0 <= stamp < now_ms and stamp != reference_ms:
            reference, reference_ms = datetime.fromtimestamp(stamp / 1000, UTC), stamp
        elif not 0 <= stamp < now_ms and reference_ms != now_ms:
            reference, reference_ms = now, now_ms
        try:
            result = validate_event(message.value, reference, policy)
        except Exception as exc:  # noqa: BLE001 - validate_event promises not to raise; if it does, one letter
            result = InvalidEvent("internal_error", f"{type(exc).__name__}: {exc}"[:512], type(exc).__name__)
        if isinstance(result, InvalidEvent):
            letters.append(DeadLetter(message, result.reason, result.detail, result.exception))
        elif horizon is not None and result.started_at.date() < horizon:
            letters.append(_expired(message, result, horizon))
        elif result.started_at < floor:
            letters.append(_uncountable(message, result, floor))
        elif result.event_id in source:
            in_batch_duplicates += 1
        else:
            source[result.event_id] = message
            valid.append(result)
    return Decoded(valid, letters, in_batch_duplicates, source)


def counted_since(now: datetime, max_age: timedelta) -> datetime:
    """The oldest `started_at` a flush at `now` accepts, whatever its record's timestamp: the
    merger keeps the user sets (hour, day, month users, sessions) of a day older than that for one
    more day (sinks/merger.py `prune_user_sets`), so a user can never be new twice in one window.
    A worker up to a day behind its topic is not affected; one further behind dead-letters the
    events its records' age would still have accepted beyond that floor."""
    midnight = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return midnight - max_age - timedelta(days=1)


def _uncountable(message: Message, event: ValidEvent, floor: datetime) -> DeadLetter:
    detail = (
        f"started_at: {event.started_at.isoformat()} is before {floor.isoformat()}: the unique users "
        "of its windows are final (the worker is more than a day behind its topic)"
    )
    return DeadLetter(message, "out_of_range_time", detail)


def _expired(message: Message, event: ValidEvent, horizon: date) -> DeadLetter:
    detail = (
        f"started_at: {event.started_at.date().isoformat()} is before the retention horizon "
        f"{horizon.isoformat()} (its day has been expired)"
    )
    return DeadLetter(message, "expired", detail)


# ---- dead letters --------------------------------------------------------------------------------


async def _send_dead_letters(ctx: FlushContext, letters: Sequence[DeadLetter]) -> None:
    if not letters:
        return
    prepared = ctx.dead_letters.prepare(letters)
    if prepared.offloads:
        await ctx.retry.call("dlq_offload", "s3", prepared.offload)
        ctx.metrics.dead_letters_offloaded.inc(prepared.offloads)
    await ctx.retry.call("dlq", "kafka", prepared.send)


# ---- encode and upload ---------------------------------------------------------------------------


def _encode(ctx: FlushContext, events: list[ValidEvent]) -> list[PendingObject]:
    groups: dict[GroupKey, list[ValidEvent]] = defaultdict(list)
    for event in events:
        groups[(event.organization_id, event.started_at.date(), event.server_id)].append(event)
    pending = []
    for (org, day, server), members in groups.items():
        encoded = encode_lines([e.line for e in members], ctx.member_bytes, ctx.gzip_level)
        key = object_key(org, day, server, ctx.topic)
        uri = object_uri(ctx.objects.bucket_for(org), key)
        indexed = [
            IndexedEvent(event, uri, offset, length)
            for event, (offset, length) in zip(members, encoded.pointers, strict=True)
        ]
        record = ObjectRecord(uri, org, day, len(members), len(encoded.body))
        line_ids = [e.event_id for e in members]
        pending.append(PendingObject((org, day, server), key, uri, encoded.body, record, indexed, line_ids))
    return pending


def _release_values(decoded: Decoded) -> None:
    """Let each encoded event's bytes go: from here to the commit a batch holds them only in its
    gzip bodies (about a fifth of their size). With two batches in flight beside the buffer, the raw
    values were the largest part of a worker's memory after the decoded events. A message whose
    value is not the stored line (raw CR/LF turned into spaces) keeps it."""
    source = decoded.source
    for event in decoded.valid:
        message = source[event.event_id]
        if message.value is event.line:
            message.value = None
        event.line = b""


def _sources(decoded: Decoded, p: PendingObject, events: Iterable[ValidEvent]) -> list[Message]:
    """The messages of `events` (all in `p`), each with its value: read back from `p`'s body where
    `_release_values` let it go (the stored line is the value, byte for byte)."""
    lines: dict[str, bytes] | None = None
    messages = []
    for event in events:
        message = decoded.source[event.event_id]
        if message.value is None:
            lines = p.stored_lines() if lines is None else lines
            message = replace(message, value=lines[event.event_id])
        messages.append(message)
    return messages


async def _upload(ctx: FlushContext, pending: list[PendingObject]) -> None:
    async def upload_missing() -> None:
        async def one(p: PendingObject) -> None:
            await ctx.objects.put(p.key, p.body, bucket=p.bucket)
            p.uploaded_at = ctx.monotonic()
            failpoints.hit("during_upload")

        # A TaskGroup cancels the sibling uploads when one fails, so a retry never races a stale
        # upload. It wraps the failure in a group: the first error is what the retry policy judges.
        try:
            async with asyncio.TaskGroup() as group:
                for p in pending:
                    if not p.uploaded:
                        group.create_task(one(p))
        except ExceptionGroup as failed:
            raise failed.exceptions[0] from failed

    await ctx.retry.call("upload", "s3", upload_missing, passthrough=(BucketUnavailable,))


async def _upload_or_set_aside(
    ctx: FlushContext, pending: list[PendingObject], decoded: Decoded
) -> list[DeadLetter]:
    """Upload every object. The objects of a bucket the store gives up on (BucketUnavailable) are
    taken out of the batch and their events become dead letters (`storage_unavailable`), so one
    organization's broken bucket holds the batch no longer than the store's bound."""
    letters: list[DeadLetter] = []
    while True:
        try:
            await _upload(ctx, pending)
            return letters
        except BucketUnavailable as down:
            for p in [p for p in pending if p.bucket == down.bucket]:
                pending.remove(p)
                if p.uploaded:
                    ctx.metrics.orphaned_uploads.inc()
                letters.extend(
                    DeadLetter(m, "storage_unavailable", down.detail[:512])
                    for m in _sources(decoded, p, (i.event for i in p.indexed))
                )
            log.warning("dead-lettering the events of an unavailable bucket", extra={"bucket": down.bucket})


async def _dead_letter_set_aside(ctx: FlushContext, decoded: Decoded, letters: list[DeadLetter]) -> None:
    if letters:
        await _send_dead_letters(ctx, letters)
        decoded.letters.extend(letters)


async def _renew_stale(ctx: FlushContext, pending: list[PendingObject], decoded: Decoded) -> None:
    stale = [p for p in pending if p.stale(ctx.monotonic())]
    if stale:
        ctx.metrics.orphaned_uploads.inc(len(stale))
        for p in stale:
            p.rekey(ctx.topic)
        await _dead_letter_set_aside(ctx, decoded, await _upload_or_set_aside(ctx, pending, decoded))


# ---- the transaction -----------------------------------------------------------------------------


async def _commit(
    ctx: FlushContext, batch: Batch, pending: list[PendingObject], decoded: Decoded, prebuilt: object = None
) -> BatchOutcome:
    """The batch transaction, retried while Postgres is unavailable. Messages found unfit on the way
    (expired days, rows Postgres refuses) are dead-lettered, then the rest is committed."""
    while True:
        await _renew_stale(ctx, pending, decoded)
        letters: list[DeadLetter]
        try:
            return await ctx.retry.call(
                "postgres",
                "postgres",
                lambda: _transaction(ctx, batch, pending, prebuilt=prebuilt),
                passthrough=(Fenced, HorizonMoved, _UploadsStale),
            )
        except _UploadsStale:
            continue
        except HorizonMoved as moved:
            letters = _expire(ctx, pending, decoded, moved.horizon)
        except PermanentError as error:
            if error.kind is not ErrorKind.DATA:
                raise
            try:
                culprits = await _isolate(ctx, batch, pending, error)
            except HorizonMoved as moved:
                letters = _expire(ctx, pending, decoded, moved.horizon)
            else:
                refused = _remove(ctx, pending, decoded, culprits)
                detail = f"{type(error.cause).__name__}: {error.cause}"
                letters = [DeadLetter(m, "rejected_by_database", detail) for _, m in refused]
        log.warning(
            "dead-lettering events the transaction refused",
            extra={"count": len(letters), "reason": letters[0].reason if letters else None},
        )
        await _send_dead_letters(ctx, letters)
        decoded.letters.extend(letters)


async def _transaction(
    ctx: FlushContext,
    batch: Batch,
    pending: list[PendingObject],
    *,
    only: Sequence[IndexedEvent] | None = None,
    rollback: bool = False,
    prebuilt: object = None,
) -> BatchOutcome:
    """The batch transaction over `pending`'s events (or a probe over `only`, rolled back)."""
    if any(p.stale(ctx.monotonic()) for p in pending):
        raise _UploadsStale
    if only is not None:
        return await ctx.index.commit(batch.ranges, only, [], check_horizon=False, rollback=True)
    indexed = [i for p in pending for i in p.indexed]
    records = [p.record for p in pending]
    return await ctx.index.commit(batch.ranges, indexed, records, rollback=rollback, prebuilt=prebuilt)


async def _isolate(
    ctx: FlushContext, batch: Batch, pending: list[PendingObject], error: PermanentError
) -> set[str]:
    """The event ids whose rows alone make the transaction fail with `error`'s kind of data error.

    Raises `error` when no single message explains it (the empty batch fails too, or every event
    fails): a schema or code problem, which dead-lettering everything would only hide."""
    indexed = [i for p in pending for i in p.indexed]

    async def fails(subset: Sequence[IndexedEvent]) -> bool:
        async def probe() -> bool:
            try:
                await _transaction(ctx, batch, pending, only=subset)
            except Exception as exc:
                if classify(exc) is ErrorKind.DATA:
                    return True
                raise
            return False

        return await ctx.retry.call(
            "postgres_isolate", "postgres", probe, passthrough=(Fenced, HorizonMoved, _UploadsStale)
        )

    if await fails([]):
        raise error
    culprits = await find_culprits(indexed, fails)
    if not culprits or (len(culprits) == len(indexed) and len(indexed) > 1):
        raise error
    log.error(
        "events refused by PostgreSQL isolated",
        extra={"event_ids": [c.event.event_id for c in culprits][:20], "error": str(error.cause)[:300]},
    )
    return {c.event.event_id for c in culprits}


def _expire(
    ctx: FlushContext, pending: list[PendingObject], decoded: Decoded, horizon: date
) -> list[DeadLetter]:
    """Dead letters for the events the retention horizon has passed, taken out of the batch."""
    expired = {e.event_id for e in _events(pending) if e.started_at.date() < horizon}
    return [_expired(m, e, horizon) for e, m in _remove(ctx, pending, decoded, expired)]


def _events(pending: list[PendingObject]) -> Iterator[ValidEvent]:
    return (i.event for p in pending for i in p.indexed)


def _remove(
    ctx: FlushContext, pending: list[PendingObject], decoded: Decoded, event_ids: set[str]
) -> list[tuple[ValidEvent, Message]]:
    """Take these events out of the objects' pointers; objects left with none are dropped (their
    uploads become orphans for the janitor). Returns the events removed, each with its message."""
    removed: list[tuple[ValidEvent, Message]] = []
    for p in list(pending):
        keep = [i for i in p.indexed if i.event.event_id not in event_ids]
        if len(keep) == len(p.indexed):
            continue
        gone = [i.event for i in p.indexed if i.event.event_id in event_ids]
        removed.extend(zip(gone, _sources(decoded, p, gone), strict=True))
        p.indexed = keep
        p.record = replace(p.record, event_count=len(keep))
        if not keep:
            pending.remove(p)
            if p.uploaded:
                ctx.metrics.orphaned_uploads.inc()
    return removed
