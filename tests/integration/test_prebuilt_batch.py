"""Rows built before the batch transaction (`PostgresIndexStore.prebuild`, which the flush calls
while the batch before commits) write exactly what the transaction would have built itself: the
same database after the same batches, with and without them, including a replay (some events
indexed before: the prebuilt extension rows assumed every event new and must not be used) and a
batch whose pointers changed after the prebuild (a rekeyed upload: new IndexedEvent objects)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from consumers.ingest.factory import partition_ensurer
from pipeline.contract import ValidEvent
from pipeline.devtools.stack.databases import create_database, drop_database
from pipeline.devtools.stack.info import StackInfo
from pipeline.processing.offsets import PartitionRange
from pipeline.processing.store import IndexedEvent, ObjectRecord
from sinks.aggregates import build_extensions
from sinks.index import PostgresIndexStore, PrebuiltBatch, init_offsets
from sinks.migrate import migrate
from sinks.partitions import PartitionCache
from tests.timescale.support import make_events

GROUP, TOPIC = "prebuilt", "gateway.requests.v1"
# Columns stamped by the server's clock: equal only by chance between the two databases.
CLOCK_COLUMNS = ("created_at", "updated_at", "committed_at", "inserted_at", "folded_at")
# Bookkeeping of the migrations and the API, not written by a batch (and clock-stamped).
NOT_BATCH_TABLES = {"schema_migrations", "rate_limits"}


@pytest.fixture
async def two_stores(stack_info: StackInfo) -> AsyncIterator[tuple[PostgresIndexStore, PostgresIndexStore]]:
    names = [f"t_prebuilt_{uuid.uuid4().hex[:10]}" for _ in range(2)]
    pools = []
    try:
        for name in names:
            url = create_database(stack_info, name)
            await migrate(url)
            pools.append(await asyncpg.create_pool(url, min_size=1, max_size=2))
        stores = [
            PostgresIndexStore(
                pool,
                GROUP,
                TOPIC,
                extensions=build_extensions(),
                ensure_partitions=partition_ensurer(PartitionCache()),
            )
            for pool in pools
        ]
        for pool in pools:
            async with pool.acquire() as conn:
                await init_offsets(conn, GROUP, TOPIC, {0: 0})
        yield stores[0], stores[1]
    finally:
        for pool in pools:
            await pool.close()
        for name in names:
            drop_database(stack_info, name)


def _batch(events: Sequence[ValidEvent], uri: str) -> tuple[list[IndexedEvent], list[ObjectRecord]]:
    indexed = [IndexedEvent(e, uri, 100 * (i // 7), 100) for i, e in enumerate(events)]  # 7 per member
    first = events[0]
    return indexed, [ObjectRecord(uri, first.organization_id, first.started_at.date(), len(events), 100)]


async def _contents(pool: asyncpg.Pool) -> dict[str, list[str]]:
    """Every table's rows (partitioned tables through their parent), clock columns left out."""
    async with pool.acquire() as conn:
        tables = await conn.fetch(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition "
            "AND NOT c.relname = ANY($1::text[])",
            sorted(NOT_BATCH_TABLES),
        )
        drop = " - ".join(f"'{c}'" for c in CLOCK_COLUMNS)
        out: dict[str, list[str]] = {}
        for (table,) in tables:
            rows = await conn.fetch(f'SELECT (to_jsonb(t) - {drop})::text FROM "{table}" AS t')
            out[table] = sorted(r[0] for r in rows)
        return out


async def _commit(
    store: PostgresIndexStore, start: int, events: Sequence[ValidEvent], uri: str, ahead: bool
) -> Any:
    ranges = [PartitionRange(0, start, start + len(events))]
    indexed, objects = _batch(events, uri)
    prebuilt = store.prebuild(ranges, indexed) if ahead else None
    return await store.commit(ranges, indexed, objects, prebuilt=prebuilt)


async def test_prebuilt_rows_write_what_the_transaction_builds(
    two_stores: tuple[PostgresIndexStore, PostgresIndexStore],
) -> None:
    plain, ahead = two_stores
    events = make_events(seed=5, count=650, days=0.5, now=datetime.now(UTC))
    # 0-299 new; 200-499 a replay of 100 and 200 new; then 500-599 new.
    batches = [(0, events[:300], "a"), (300, events[200:500], "b"), (600, events[500:600], "c")]
    for start, chunk, name in batches:
        uri = f"s3://omnilog/org/x/date=d/s/{name}.jsonl.gz"
        one = await _commit(plain, start, chunk, uri, ahead=False)
        other = await _commit(ahead, start, chunk, uri, ahead=True)
        assert (one.duplicates, len(one.new_events)) == (other.duplicates, len(other.new_events))
    assert one.duplicates == 0

    # A prebuild for pointers that changed before the commit (a rekeyed upload): ignored.
    ranges = [PartitionRange(0, 700, 750)]
    stale, _ = _batch(events[600:], "s3://omnilog/org/x/date=d/s/old.jsonl.gz")
    prebuilt = ahead.prebuild(ranges, stale)
    indexed, objects = _batch(events[600:], "s3://omnilog/org/x/date=d/s/new.jsonl.gz")
    assert isinstance(prebuilt, PrebuiltBatch) and not prebuilt.fits(indexed)
    await plain.commit(ranges, indexed, objects)
    await ahead.commit(ranges, indexed, objects, prebuilt=prebuilt)

    one_rows, other_rows = await _contents(plain.pool), await _contents(ahead.pool)
    assert one_rows.keys() == other_rows.keys()
    differing = [t for t in one_rows if one_rows[t] != other_rows[t]]
    assert not differing, differing
    # The comparison saw the batches' rows: indexed once each, with deltas and usage rows.
    assert len(one_rows["log_index"]) == 650
    assert sum("new.jsonl.gz" in r for r in other_rows["log_index"]) == 50
    assert not any("old.jsonl.gz" in r for r in other_rows["log_index"])
    assert one_rows["usage_events"] and one_rows["usage_deltas"] and one_rows["log_aggregate_deltas"]
