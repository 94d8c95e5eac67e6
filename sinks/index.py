"""The per-batch Postgres transaction: the one place a batch becomes durable.

Order inside the transaction (docs/ingest.md "One batch, end to end", step 5), and why:
1. compare-and-set every partition's `next_offset` first: it row-locks `ingest_offsets`, so a
   zombie and the new owner of a partition serialise here and the loser fails fast, before work;
2. COPY the batch into a temporary staging table (fast binary COPY, no index maintenance);
3. `INSERT INTO log_index ... SELECT ... ON CONFLICT DO NOTHING`: the rows it inserts are the
   first sightings (all of them when its count is the batch's; else it is redone with `RETURNING
   id`); everything else was indexed before and is a counted duplicate;
4. record the objects the rows point at (`ingest_objects`), so orphans are recognisable;
5. run the batch extensions (usage rows, aggregate parts) on the first sightings only, so a
   replay or a duplicate can never be counted twice.
Any failure rolls the whole batch back; a failed compare-and-set raises `Fenced`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Final, Protocol

import asyncpg

from pipeline.processing.offsets import Fenced, HorizonMoved, PartitionRange
from pipeline.processing.store import BatchOutcome, IndexedEvent, ObjectRecord
from sinks.db import Connection

if TYPE_CHECKING:
    from pipeline.contract import ValidEvent


@dataclass(frozen=True, slots=True)
class Horizon:
    """How the store reads the retention horizon (sinks/retention.py): a plain read before the
    batch, and a share-locked read inside the batch transaction, held until it ends."""

    load: Callable[[Connection], Awaitable[date | None]]
    lock: Callable[[Connection], Awaitable[date | None]]


EnsurePartitions = Callable[[Connection, set[date]], Awaitable[None]]


class BuiltWrites(Protocol):
    """An extension's rows for one set of events, computed without the database."""

    async def write(self, conn: Connection) -> None:
        """Write them in the batch transaction. Must not change what was built: a transaction
        retried after a failure writes the same rows again."""
        ...


class BatchExtension(Protocol):
    """Extra writes in the batch transaction, fed only the events seen for the first time.

    `source_partition` is one partition of the batch; the writing worker owns it (the offset
    compare-and-set earlier in the same transaction proved that), so rows keyed by it are never
    written by two live workers at once.
    """

    def build(self, new_events: Sequence[ValidEvent], source_partition: int) -> BuiltWrites:
        """The rows for `new_events`, without the database: pure, so it may run before the
        transaction, while the batch before this one commits (`PostgresIndexStore.prebuild`)."""
        ...

    async def write(
        self, conn: Connection, new_events: Sequence[ValidEvent], source_partition: int
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class PrebuiltBatch:
    """What the batch transaction writes, computed before it from `indexed` on the bet that every
    event is new (the usual case). The transaction uses it only for exactly those IndexedEvent
    objects (rekeyed, expired or refused events make new lists: it then builds again), and the
    extensions' rows only when every event was indexed for the first time."""

    indexed: Sequence[IndexedEvent]
    days: frozenset[date]
    stage: StageRows
    writes: Sequence[BuiltWrites]

    def fits(self, indexed: Sequence[IndexedEvent]) -> bool:
        return len(indexed) == len(self.indexed) and all(
            a is b for a, b in zip(indexed, self.indexed, strict=True)
        )


LOG_INDEX_COLUMNS = (
    "id",
    "organization_id",
    "server_id",
    "session_id",
    "rpc_method",
    "level",
    "started_at",
    "duration_ms",
    "status_code",
    "error_flag",
    "storage_provider",
    "object_uri",
    "byte_offset",
    "byte_length",
    "user_id",
    "remote_ip",
    "client_id",
    "connection_id",
    "redaction_version",
)
_COLS = ", ".join(LOG_INDEX_COLUMNS)

# What the batch COPYs per event into its temporary stage: the cheapest form for asyncpg to encode,
# turned into log_index's columns by the INSERT, in PostgreSQL (all in C, in its own process):
# - remote_ip as text, cast to INET: asyncpg's binary INET encoder parses every address with the
#   `ipaddress` module (about 9% of a worker's CPU when it did); validate_event only passes
#   literals that INET accepts;
# - started_at as an integer, microseconds since 2000-01-01 UTC (PostgreSQL's own representation):
#   asyncpg's timestamptz encoder costs ~0.7 µs per value (it compares every value with its
#   infinities, aware against naive), an integer ~0.03 µs plus ~0.2 µs to compute it. The INSERT
#   adds whole seconds and the remaining microseconds to the epoch: both products are exact in
#   float8 over the whole timestamptz range (seconds × 10^6 has at most 53 significant bits), so
#   the stored value is the event's to the microsecond;
# - the object and member as one number, `member`, into the batch's list of distinct pointers
#   (object_uri, byte_offset, byte_length) sent once as arrays: ~70 events share a gzip member,
#   and the URI alone is ~150 bytes per row;
# - storage_provider not at all: it is always 's3'.
_STAGE_COLUMNS = (
    "id",
    "organization_id",
    "server_id",
    "session_id",
    "rpc_method",
    "level",
    "started_us",
    "duration_ms",
    "status_code",
    "error_flag",
    "member",
    "user_id",
    "remote_ip",
    "client_id",
    "connection_id",
    "redaction_version",
)
_STAGE_TYPES = {"started_us": "0::bigint", "member": "0::int", "remote_ip": "remote_ip::text"}
_STAGE = "log_index_stage_v3"
_CREATE_STAGE = (
    f"CREATE TEMP TABLE IF NOT EXISTS {_STAGE} ON COMMIT DELETE ROWS AS SELECT "
    + ", ".join(f"{_STAGE_TYPES.get(c, c)} AS {c}" for c in _STAGE_COLUMNS)
    + " FROM log_index WITH NO DATA"
)
_FROM_STAGE = {
    "started_at": "timestamptz '2000-01-01 00:00:00+00' + (s.started_us / 1000000) * interval '1 second'"
    " + (s.started_us % 1000000) * interval '1 microsecond'",
    "storage_provider": "'s3'",
    "object_uri": "m.object_uri",
    "byte_offset": "m.byte_offset",
    "byte_length": "m.byte_length",
    "remote_ip": "s.remote_ip::inet",
}
_INSERT = (
    f"INSERT INTO log_index ({_COLS}) SELECT "
    + ", ".join(_FROM_STAGE.get(c, f"s.{c}") for c in LOG_INDEX_COLUMNS)
    + f" FROM {_STAGE} AS s JOIN unnest($1::text[], $2::bigint[], $3::int[]) WITH ORDINALITY"
    " AS m(object_uri, byte_offset, byte_length, member) ON m.member = s.member"
    # In key order: consecutive rows go into the same leaf pages of the primary key and (the ids
    # being time-ordered UUIDv7) of the (..., started_at) indexes. Out-of-order arrival: the
    # insert's µs/row halved (bench/harness/index_buffers.py, docs/performance.md); in order the
    # rows are sorted already and the sort of 20 000 rows costs within the noise.
    " ORDER BY s.id, s.started_us"
    " ON CONFLICT DO NOTHING"
)
# The same, naming the rows it inserted (as text: the caller matches them against event_id strings).
_INSERT_RETURNING = f"{_INSERT} RETURNING id::text"
_ADVANCE_OFFSETS = """
UPDATE ingest_offsets AS o
   SET next_offset = v.end_offset, updated_at = now()
  FROM unnest($3::int[], $4::bigint[], $5::bigint[]) AS v(partition, start_offset, end_offset)
 WHERE o.consumer_group = $1 AND o.topic = $2
   AND o.partition = v.partition AND o.next_offset = v.start_offset
RETURNING o.partition
"""
_INSERT_OBJECTS = """
INSERT INTO ingest_objects (object_uri, organization_id, log_date, event_count, byte_size)
SELECT * FROM unnest($1::text[], $2::uuid[], $3::date[], $4::int[], $5::bigint[])
"""
_PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)


@dataclass(slots=True)
class StageRows:
    """A batch's events as stage records, and the distinct pointers their `member` numbers index."""

    records: list[tuple[object, ...]]
    events: list[ValidEvent]
    uris: list[str]
    offsets: list[int]
    lengths: list[int]


def stage_rows(indexed: Sequence[IndexedEvent]) -> StageRows:
    """One pass over the batch. A member number is given per run of equal pointers: the flush lists
    an object's events member by member, so each member is one run (two runs of one member would
    only repeat a pointer, never mix two)."""
    records: list[tuple[object, ...]] = []
    events: list[ValidEvent] = []
    uris: list[str] = []
    offsets: list[int] = []
    lengths: list[int] = []
    add, add_event = records.append, events.append
    uri: str | None = None
    offset = length = member = 0
    epoch, microsecond = _PG_EPOCH, _MICROSECOND
    for item in indexed:
        if item.byte_offset != offset or item.byte_length != length or item.object_uri is not uri:
            uri, offset, length = item.object_uri, item.byte_offset, item.byte_length
            uris.append(uri)
            offsets.append(offset)
            lengths.append(length)
            member = len(uris)  # WITH ORDINALITY counts from 1
        e = item.event
        add_event(e)
        add(
            (
                e.event_id,
                e.organization_id,
                e.server_id,
                e.session_id,
                e.rpc_method,
                e.level,
                (e.started_at - epoch) // microsecond,
                e.duration_ms,
                e.status_code,
                e.error,
                member,
                e.user_id,
                e.remote_ip,
                e.client_id,
                e.connection_id,
                e.redaction_version,
            )
        )
    return StageRows(records, events, uris, offsets, lengths)


async def _insert_new(conn: Connection, stage: StageRows) -> list[ValidEvent]:
    """INSERT the staged rows; return the events inserted (the others were indexed before).

    Usually every event is new, and the INSERT's count says so: asking for the inserted ids instead
    would make asyncpg decode a row per event (~0.5 µs each). So the plain INSERT runs in a
    savepoint, and only when it inserted fewer rows than events (a replay) is it undone and run
    again naming the rows it inserts."""
    args = (stage.uris, stage.offsets, stage.lengths)
    savepoint = conn.transaction()
    await savepoint.start()
    status = await conn.execute(_INSERT, *args)
    if int(status.rpartition(" ")[2]) == len(stage.events):  # "INSERT 0 <rows>"
        await savepoint.commit()
        return stage.events
    await savepoint.rollback()
    new_ids = {row[0] for row in await conn.fetch(_INSERT_RETURNING, *args)}
    return [e for e in stage.events if e.event_id in new_ids]


async def commit_batch(
    conn: Connection,
    *,
    consumer_group: str,
    topic: str,
    ranges: Sequence[PartitionRange],
    indexed: Sequence[IndexedEvent],
    objects: Sequence[ObjectRecord],
    extensions: Sequence[BatchExtension] = (),
    lock_horizon: Callable[[Connection], Awaitable[date | None]] | None = None,
    earliest_day: date | None = None,
    prebuilt: PrebuiltBatch | None = None,
) -> BatchOutcome:
    """Make one batch durable, or raise (Fenced, HorizonMoved, or the database error) with nothing
    written. `lock_horizon` reads the retention horizon and keeps `maintain` from moving it until
    this transaction ends, so no row can land in a day partition that is being dropped.
    `earliest_day` is the earliest started_at day of `indexed` when the caller already has the
    batch's days (`PostgresIndexStore.commit` does): the events are then not scanned again.
    `prebuilt`: the stage rows and extension rows computed before, for exactly `indexed`."""
    if prebuilt is not None and not prebuilt.fits(indexed):
        prebuilt = None
    async with conn.transaction():
        advanced = await conn.fetch(
            _ADVANCE_OFFSETS,
            consumer_group,
            topic,
            [r.partition for r in ranges],
            [r.start for r in ranges],
            [r.end for r in ranges],
        )
        if len(advanced) != len(ranges):
            moved = {r.partition for r in ranges} - {row["partition"] for row in advanced}
            raise Fenced(sorted(moved))
        if lock_horizon is not None and indexed:
            horizon = await lock_horizon(conn)
            if earliest_day is None:
                earliest_day = min(i.event.started_at.date() for i in indexed)
            if horizon is not None and earliest_day < horizon:
                raise HorizonMoved(horizon)
        new_events: list[ValidEvent] = []
        if indexed:
            stage = prebuilt.stage if prebuilt is not None else stage_rows(indexed)
            await conn.execute(_CREATE_STAGE)
            await conn.copy_records_to_table(_STAGE, records=stage.records, columns=_STAGE_COLUMNS)
            new_events = await _insert_new(conn, stage)
        if objects:
            await conn.execute(
                _INSERT_OBJECTS,
                [o.object_uri for o in objects],
                [o.organization_id for o in objects],
                [o.log_date for o in objects],
                [o.event_count for o in objects],
                [o.byte_size for o in objects],
            )
        if new_events:
            if prebuilt is not None and new_events is prebuilt.stage.events:  # every event is new
                writes = prebuilt.writes
            else:
                writes = [extension.build(new_events, ranges[0].partition) for extension in extensions]
            for built in writes:
                await built.write(conn)
        committed_at = await conn.fetchval("SELECT clock_timestamp()")
    return BatchOutcome(
        new_events=new_events, duplicates=len(indexed) - len(new_events), committed_at=committed_at
    )


@dataclass(frozen=True)
class PostgresIndexStore:
    """The batch transaction and offset store on a pool (pipeline.processing.store.IndexStore)."""

    pool: asyncpg.Pool
    consumer_group: str
    topic: str
    extensions: Sequence[BatchExtension] = ()
    # Creates the batch's day partitions (outside the transaction: DDL takes its own locks); may
    # raise HorizonMoved for days maintain has expired meanwhile.
    ensure_partitions: EnsurePartitions | None = None
    horizon: Horizon | None = None

    async def load_horizon(self) -> date | None:
        if self.horizon is None:
            return None
        async with self.pool.acquire() as conn:
            return await self.horizon.load(conn)

    def prebuild(self, ranges: Sequence[PartitionRange], indexed: Sequence[IndexedEvent]) -> PrebuiltBatch:
        """The transaction's rows for `indexed`, built now: the flush calls it while the batch before
        commits, so this CPU work overlaps that batch's time in PostgreSQL instead of adding to
        this batch's."""
        stage = stage_rows(indexed)
        partition = ranges[0].partition if ranges else 0
        writes = (
            [extension.build(stage.events, partition) for extension in self.extensions] if indexed else []
        )
        days = frozenset(i.event.started_at.date() for i in indexed)
        return PrebuiltBatch(indexed=list(indexed), days=days, stage=stage, writes=writes)

    async def commit(
        self,
        ranges: Sequence[PartitionRange],
        indexed: Sequence[IndexedEvent],
        objects: Sequence[ObjectRecord],
        *,
        check_horizon: bool = True,
        rollback: bool = False,
        prebuilt: object = None,
    ) -> BatchOutcome:
        ready = prebuilt if isinstance(prebuilt, PrebuiltBatch) and prebuilt.fits(indexed) else None
        async with self.pool.acquire() as conn:
            days = set(ready.days) if ready is not None else {i.event.started_at.date() for i in indexed}
            if self.ensure_partitions is not None and days:
                await self.ensure_partitions(conn, days)

            def write() -> Awaitable[BatchOutcome]:
                return commit_batch(
                    conn,
                    consumer_group=self.consumer_group,
                    topic=self.topic,
                    ranges=ranges,
                    indexed=indexed,
                    objects=objects,
                    extensions=self.extensions,
                    lock_horizon=self.horizon.lock if self.horizon is not None and check_horizon else None,
                    earliest_day=min(days) if days else None,
                    prebuilt=ready,
                )

            if not rollback:
                return await write()
            # A probe: the same writes inside an outer transaction that is always rolled back.
            transaction = conn.transaction()
            await transaction.start()
            try:
                return await write()
            finally:
                await transaction.rollback()


async def load_offsets(
    conn: Connection, consumer_group: str, topic: str, partitions: Sequence[int]
) -> dict[int, int]:
    rows = await conn.fetch(
        "SELECT partition, next_offset FROM ingest_offsets "
        "WHERE consumer_group = $1 AND topic = $2 AND partition = ANY($3::int[])",
        consumer_group,
        topic,
        list(partitions),
    )
    return {row["partition"]: row["next_offset"] for row in rows}


async def init_offsets(
    conn: Connection, consumer_group: str, topic: str, starts: dict[int, int]
) -> dict[int, int]:
    """Create rows for partitions never seen before, then return every partition's stored offset.

    ON CONFLICT keeps a row another worker created meanwhile: the stored value always wins.
    """
    if starts:
        await conn.execute(
            "INSERT INTO ingest_offsets (consumer_group, topic, partition, next_offset) "
            "SELECT $1, $2, p, o FROM unnest($3::int[], $4::bigint[]) AS v(p, o) "
            "ON CONFLICT DO NOTHING",
            consumer_group,
            topic,
            list(starts),
            list(starts.values()),
        )
    return await load_offsets(conn, consumer_group, topic, list(starts))
