"""Hostile bytes on a real partition never stop ingestion (docs/contract.md §6).

One partition carries valid events, then a run of hostile messages of every kind the worker has
met in the wild, then valid events again. Within seconds every offset must be in exactly one place
(an index row or a dead letter), the valid events after the run are indexed, the worker stays ready,
and it exits 0 when told to stop.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from isal import igzip
from prometheus_client import CollectorRegistry

from consumers.ingest.factory import build_worker
from pipeline.processing.layout import parse_object_uri
from pipeline.settings import Settings
from sinks.migrate import migrate
from sinks.objects import s3_client
from tests.integration.ingest_support import create_topic, make_event, wait_caught_up

pytestmark = pytest.mark.integration


@dataclass
class Sent:
    """What was produced, by offset: the oracle."""

    valid: dict[int, tuple[str, bytes]] = field(default_factory=dict)  # offset -> (event_id, stored line)
    invalid: dict[int, str] = field(default_factory=dict)  # offset -> expected dead-letter reason
    values: dict[int, bytes | None] = field(default_factory=dict)
    end: int = 0


def _nested(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def _hostile(rng: random.Random, now: datetime) -> list[tuple[bytes | None, bytes | None, str | None]]:
    """(key, value, expected reason or None when the event is valid and must be indexed)."""

    def event(**changes: Any) -> dict[str, Any]:
        base = make_event(rng, now)
        base["event_id"] = str(uuid.UUID(int=rng.getrandbits(128)))
        base.update(changes)
        return base

    deep_valid = orjson.dumps(event()).rstrip(b"}") + b',"free":' + _nested(300) + b"}"
    pretty_deep = deep_valid.replace(b",", b",\r\n  ", 3)  # CR/LF as whitespace + 300-deep nesting
    huge_int = orjson.dumps(event()).rstrip(b"}") + b',"n":123456789012345678901234567890123}'
    upper_id = str(uuid.UUID(int=rng.getrandbits(128))).upper()
    big_valid = orjson.dumps(event(request={"blob": "x" * (2 * 1024 * 1024)}))
    big_invalid = b'{"junk":"' + b"y" * (3 * 1024 * 1024) + b'"'
    duplicate_keys = orjson.dumps(event()).rstrip(b"}") + b',"level":"debug","level":"error"}'
    return [
        (None, pretty_deep, None),
        (None, huge_int, None),
        (None, orjson.dumps(event(event_id=upper_id)), None),
        (None, big_valid, None),
        (None, duplicate_keys, None),
        (None, None, "not_json"),  # a tombstone without a key
        (b"some-key", None, "not_json"),  # a tombstone with a key
        (None, b"", "not_json"),
        (None, _nested(2000), "not_json"),  # deeper than any JSON parser accepts
        (None, big_invalid, "not_json"),  # larger than the dead-letter topic takes: offloaded
        (b"k" * 5000, b"{not json", "not_json"),  # an oversized key is cut
        (None, b"\xef\xbb\xbf" + orjson.dumps(event()), "not_json"),  # a byte-order mark
        (None, b'{"event_id":"\\ud800"}', "not_json"),  # a lone surrogate
        (None, b"\xff\xfe\x00", "not_utf8"),
        (None, b'{"a":NaN}', "not_json"),
        (None, orjson.dumps(event(user_id="a\x00b")), "bad_type"),
        (None, orjson.dumps(event(bytes_in=2**63)), "out_of_range"),
        (None, orjson.dumps(event(duration_ms=1e300)), "out_of_range"),
        (None, b"[" * 100 + b"]" * 100, "not_object"),
    ]


async def _produce(settings: Settings, seed: int) -> Sent:
    rng = random.Random(seed)
    now = datetime.now(UTC)
    sent = Sent()
    messages: list[tuple[bytes | None, bytes | None, str | None]] = []
    messages += [(None, orjson.dumps(make_event(rng, now)), None) for _ in range(200)]
    messages += _hostile(rng, now)
    messages += [(None, orjson.dumps(make_event(rng, now)), None) for _ in range(200)]
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        compression_type="gzip",  # so a 3 MiB value fits the broker's request limit
        max_request_size=8 * 1024 * 1024,
        linger_ms=5,
    )
    await producer.start()
    try:
        for key, value, reason in messages:
            # A batch built by hand: the producer's send() refuses a record with neither key nor
            # value, which other clients produce happily.
            batch = producer.create_batch()
            assert batch.append(key=key, value=value, timestamp=None) is not None
            meta = await (await producer.send_batch(batch, settings.topic, partition=0))
            sent.values[meta.offset] = value
            if reason is not None:
                sent.invalid[meta.offset] = reason
            else:
                assert value is not None
                event_id = str(orjson.loads(value)["event_id"]).lower()
                sent.valid[meta.offset] = (event_id, value.replace(b"\r", b" ").replace(b"\n", b" "))
            sent.end = meta.offset + 1
    finally:
        await producer.stop()
    return sent


async def _dead_letters(settings: Settings) -> dict[int, Any]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    await consumer.start()
    letters: dict[int, Any] = {}
    try:
        await consumer._client.force_metadata_update()
        tps = [
            TopicPartition(settings.dlq_topic, p)
            for p in consumer.partitions_for_topic(settings.dlq_topic) or []
        ]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        idle = 0
        while idle < 6:
            batch = await consumer.getmany(timeout_ms=500)
            idle = 0 if any(batch.values()) else idle + 1
            for records in batch.values():
                for record in records:
                    headers = dict(record.headers)
                    letters[int(headers["omnilog.source.offset"])] = record
    finally:
        await consumer.stop()
    return letters


async def test_hostile_messages_never_stop_a_partition(fresh_database_url, make_settings):
    settings = make_settings(
        database_url=fresh_database_url, batch_max_events=50, batch_max_age_s=0.3, metrics_port=0
    )
    await migrate(fresh_database_url)
    await create_topic(settings, settings.topic, partitions=1)
    await create_topic(settings, settings.dlq_topic, partitions=1)
    sent = await _produce(settings, seed=5)

    registry = CollectorRegistry()
    worker = build_worker(settings, registry=registry)
    task = asyncio.create_task(worker.run())
    try:
        await wait_caught_up(fresh_database_url, settings, {0: sent.end}, timeout=60)
        assert worker.health is not None
        url = f"http://127.0.0.1:{worker.health.bound_port}/readyz"
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            assert response.status == 200, await response.text()
    finally:
        worker.request_stop()
        assert await asyncio.wait_for(task, 60) == 0

    conn = await asyncpg.connect(fresh_database_url)
    try:
        rows = await conn.fetch("SELECT id::text AS id, object_uri, byte_offset, byte_length FROM log_index")
    finally:
        await conn.close()
    indexed = {r["id"]: r for r in rows}
    letters = await _dead_letters(settings)

    # Every offset in exactly one place.
    assert set(letters) == set(sent.invalid), set(letters) ^ set(sent.invalid)
    assert {event_id for event_id, _ in sent.valid.values()} == set(indexed)
    assert len(indexed) == len(sent.valid)
    for offset, reason in sent.invalid.items():
        headers = dict(letters[offset].headers)
        assert headers["omnilog.error"].decode() == reason, (offset, headers)

    # The stored line of each valid event is what was sent (raw CR/LF as spaces), one line each.
    async with s3_client(settings) as s3:
        for event_id, line in sent.valid.values():
            row = indexed[event_id]
            bucket, key = parse_object_uri(row["object_uri"])
            end = row["byte_offset"] + row["byte_length"] - 1
            response = await s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={row['byte_offset']}-{end}")
            async with response["Body"] as stream:
                member = igzip.decompress(await stream.read())
            assert line in member.split(b"\n"), event_id

        # Tombstones: an empty value and a header saying so; the key is kept.
        tombstones = [o for o, v in sent.values.items() if v is None]
        for offset in tombstones:
            record = letters[offset]
            assert record.value == b"" and dict(record.headers)["omnilog.value.null"] == b"1"
        assert {letters[o].key for o in tombstones} == {None, b"some-key"}

        # The oversized dead letter: a cut copy in the record, the whole value in object storage.
        big = next(o for o, v in sent.values.items() if v is not None and len(v) > 3 * 1024 * 1024)
        headers = dict(letters[big].headers)
        value = sent.values[big]
        assert value is not None
        assert len(letters[big].value) < settings.dlq_max_record_bytes
        assert value.startswith(letters[big].value)
        assert int(headers["omnilog.value.size"]) == len(value)
        assert headers["omnilog.value.sha256"].decode() == hashlib.sha256(value).hexdigest()
        bucket, key = parse_object_uri(headers["omnilog.value.uri"].decode())
        response = await s3.get_object(Bucket=bucket, Key=key)
        async with response["Body"] as stream:
            assert await stream.read() == value

    # The oversized key is cut, with its size and digest.
    cut = next(record for record in letters.values() if dict(record.headers).get("omnilog.key.size"))
    assert dict(cut.headers)["omnilog.key.size"] == b"5000" and cut.key == b"k" * 1024

    assert registry.get_sample_value("omnilog_dead_letters_offloaded_total") == 1
    assert registry.get_sample_value("omnilog_fatal_errors_total", {"operation": "flush"}) is None
