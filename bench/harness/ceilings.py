"""References the ingest rate is compared with: what one core of each tool does alone.

- Kafka consume: aiokafka (the worker's client) reading the same backlog, no processing; and
  confluent-kafka (librdkafka) as the alternative client, for the record.
- COPY: binary COPY of the same events' index rows straight into `log_index` (same schema and
  indexes, partitioned by day), in batches of the worker's size, one connection.
- gzip: `sinks.objects.encode_lines` (ISA-L, 64 KiB members) over the same bytes.
- validate: `pipeline.contract.validate_event` over the same bytes (the decode stage alone).
- index transaction: `sinks.index.commit_batch` (stage COPY + insert-select + offsets) alone.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.harness.env import connect
from pipeline.contract import ValidationPolicy, ValidEvent, validate_event
from pipeline.processing.layout import encode_lines
from pipeline.processing.offsets import PartitionRange
from pipeline.processing.store import IndexedEvent
from sinks.index import LOG_INDEX_COLUMNS, commit_batch
from sinks.partitions import ensure_day_partitions

Rate = dict[str, Any]
POLICY = ValidationPolicy(max_age=timedelta(days=90), max_future_skew=timedelta(hours=1))


def rate(events: int, seconds: float, **extra: Any) -> Rate:
    per_s = round(events / seconds, 1)
    return {"events": events, "seconds": round(seconds, 4), "events_per_s": per_s, **extra}


async def kafka_aiokafka(bootstrap: str, topic: str, total: int, batch: int = 5000) -> Rate:
    """Read `total` messages from the start of every partition; timed from the first record."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        max_partition_fetch_bytes=2 * 1024 * 1024,
        fetch_max_bytes=32 * 1024 * 1024,
    )
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        seen = 0
        first = 0.0
        nbytes = 0
        while seen < total:
            records = await consumer.getmany(timeout_ms=100, max_records=batch)
            if records and not first:
                first = time.perf_counter()
            for rs in records.values():
                seen += len(rs)
                for r in rs:
                    nbytes += len(r.value) if r.value is not None else 0
        seconds = time.perf_counter() - first
        return rate(seen, seconds, client="aiokafka", mb_per_s=round(nbytes / seconds / 1e6, 1))
    finally:
        await consumer.stop()


def kafka_confluent(bootstrap: str, topic: str, total: int, batch: int = 5000) -> Rate:
    """The same read with confluent-kafka (librdkafka), blocking (run it in a thread)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer
    from confluent_kafka import TopicPartition as CTopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-confluent-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        partitions = sorted(metadata.topics[topic].partitions)
        consumer.assign([CTopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        seen = 0
        first = 0.0
        while seen < total:
            messages = consumer.consume(num_messages=batch, timeout=0.1)
            if messages and not first:
                first = time.perf_counter()
            for m in messages:
                if m.error() is None:
                    seen += 1
        return rate(seen, time.perf_counter() - first, client="confluent-kafka")
    finally:
        consumer.close()


def validated(values: Sequence[bytes]) -> list[ValidEvent]:
    now = datetime.now(UTC)
    out = []
    for v in values:
        result = validate_event(v, now, POLICY)
        if not isinstance(result, ValidEvent):
            raise TypeError(f"benchmark traffic holds an invalid event: {result}")
        out.append(result)
    return out


def validate(values: Sequence[bytes]) -> Rate:
    t0 = time.perf_counter()
    validated(values)
    return rate(len(values), time.perf_counter() - t0)


def gzip(values: Sequence[bytes], batch: int = 5000, level: int = 1) -> Rate:
    t0 = time.perf_counter()
    text = 0
    compressed = 0
    for start in range(0, len(values), batch):
        encoded = encode_lines(values[start : start + batch], 64 * 1024, level)
        text += encoded.text_bytes
        compressed += len(encoded.body)
    seconds = time.perf_counter() - t0
    return rate(
        len(values),
        seconds,
        mb_per_s=round(text / seconds / 1e6, 1),
        ratio=round(text / compressed, 2),
        level=level,
    )


def index_rows(events: Sequence[ValidEvent]) -> list[tuple[object, ...]]:
    uri = "s3://bench/ceiling.jsonl.gz"
    return [
        (e.event_id, e.organization_id, e.server_id, e.session_id, e.rpc_method, e.level, e.started_at,
         e.duration_ms, e.status_code, e.error, "s3", uri, 0, 1000, e.user_id, e.remote_ip, e.client_id,
         e.connection_id, e.redaction_version)
        for e in events
    ]  # fmt: skip


async def copy(database_url: str, events: Sequence[ValidEvent], batch: int = 5000) -> Rate:
    """Binary COPY of index rows into `log_index` itself (all its indexes), one COPY per batch."""
    rows = index_rows(events)
    async with connect(database_url) as conn:
        await ensure_day_partitions(conn, "log_index", {e.started_at.date() for e in events})
        t0 = time.perf_counter()
        for start in range(0, len(rows), batch):
            async with conn.transaction():
                await conn.copy_records_to_table(
                    "log_index", records=rows[start : start + batch], columns=LOG_INDEX_COLUMNS
                )
        seconds = time.perf_counter() - t0
    return rate(len(rows), seconds, batch=batch)


async def index_transaction(database_url: str, events: Sequence[ValidEvent], batch: int = 5000) -> Rate:
    """The worker's own Postgres stage (`commit_batch`, no extensions) on the same events."""
    indexed = [IndexedEvent(e, "s3://bench/tx.jsonl.gz", 0, 1000) for e in events]
    async with connect(database_url) as conn:
        await ensure_day_partitions(conn, "log_index", {e.started_at.date() for e in events})
        await conn.execute(
            "INSERT INTO ingest_offsets (consumer_group, topic, partition, next_offset) "
            "VALUES ('bench', 'bench', 0, 0)"
        )
        t0 = time.perf_counter()
        offset = 0
        for start in range(0, len(indexed), batch):
            chunk = indexed[start : start + batch]
            await commit_batch(
                conn,
                consumer_group="bench",
                topic="bench",
                ranges=[PartitionRange(0, offset, offset + len(chunk))],
                indexed=chunk,
                objects=[],
            )
            offset += len(chunk)
        seconds = time.perf_counter() - t0
    return rate(len(indexed), seconds, batch=batch)


async def kafka_confluent_async(bootstrap: str, topic: str, total: int) -> Rate:
    return await asyncio.to_thread(kafka_confluent, bootstrap, topic, total)
