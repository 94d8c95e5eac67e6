"""Shared machinery for the ingest tests: a test's own traffic (its oracle), running workers
in-process or as `omnilog ingest` subprocesses, and the exactly-once verification against
Postgres, S3 and the dead-letter topic."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from isal import igzip

from pipeline.processing.layout import parse_object_uri
from pipeline.settings import Settings
from sinks.objects import s3_client

ORGS = [str(uuid.UUID(int=0x1000 + i)) for i in range(3)]
SERVERS = [None] + [str(uuid.UUID(int=0x2000 + i)) for i in range(3)]
METHODS = ["tools/call", "resources/read", "prompts/get", "initialize"]


@dataclass
class Traffic:
    """What a test sent, as its own oracle."""

    valid: dict[str, bytes] = field(default_factory=dict)  # event_id -> the exact value sent
    invalid: dict[tuple[int, int], str] = field(default_factory=dict)  # (partition, offset) -> reason
    resent: int = 0
    end_offsets: dict[int, int] = field(default_factory=dict)


def make_event(rng: random.Random, now: datetime) -> dict[str, Any]:
    started = now - timedelta(days=rng.choice([0, 0, 0, 1, 2]), seconds=rng.randint(0, 80_000))
    status = rng.choice([200, 200, 200, 200, 404, 500])
    event = {
        "event_id": str(uuid.UUID(int=rng.getrandbits(128))),
        "organization_id": rng.choice(ORGS),
        "started_at": started.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "duration_ms": int(rng.lognormvariate(4, 1)),
        "server_id": rng.choice(SERVERS),
        "rpc_method": rng.choice(METHODS),
        "status_code": status,
        "bytes_in": rng.randint(0, 5000),
        "bytes_out": rng.randint(0, 50000),
        "user_id": f"user-{rng.randint(1, 20)}",
        "remote_ip": rng.choice(["10.0.0.7", "2001:db8::1"]),
        "request": {"jsonrpc": "2.0", "params": {"q": "x" * rng.randint(10, 600)}},
        "response": {"ok": status < 400},
        "extra_field_kept": rng.randint(0, 9),
    }
    if rng.random() < 0.3:
        event["model"] = "gpt-x"
        event["input_tokens"] = rng.randint(1, 1000)
    return event


def invalid_values(rng: random.Random, now: datetime) -> Iterator[tuple[bytes, str]]:
    """One of each invalid kind the worker must dead-letter, with its expected reason."""
    good = make_event(rng, now)

    def variant(**changes: Any) -> bytes:
        event = dict(good, event_id=str(uuid.uuid4()))
        for key, value in changes.items():
            if value is _DROP:
                event.pop(key)
            else:
                event[key] = value
        return orjson.dumps(event)

    yield b"\xff\xfe not utf-8", "not_utf8"
    yield b"{not json", "not_json"
    yield b"[1, 2, 3]", "not_object"
    yield variant(organization_id=_DROP), "missing_field"
    yield variant(event_id="not-a-uuid"), "bad_uuid"
    yield variant(started_at="yesterday"), "bad_timestamp"
    yield variant(remote_ip="999.1.1.1"), "bad_ip"
    yield variant(duration_ms=-5), "negative_value"
    yield variant(rpc_method="m" * 101), "too_long"
    yield variant(level="loud"), "bad_enum"
    yield variant(started_at=(now - timedelta(days=400)).isoformat()), "out_of_range_time"


_DROP = object()


async def create_topic(settings: Settings, name: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()


async def produce_traffic(
    settings: Settings,
    count: int,
    seed: int,
    invalid_copies: int = 1,
    resend_fraction: float = 0.05,
    traffic: Traffic | None = None,
) -> Traffic:
    """Send `count` valid events (plus re-sends and invalid ones), recording where each landed."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    traffic = traffic or Traffic()
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, linger_ms=20)
    await producer.start()
    try:
        pending: list[tuple[Any, str | None, bytes]] = []
        sent: list[bytes] = []
        invalid = [v for _ in range(invalid_copies) for v in invalid_values(rng, now)]
        for i in range(count):
            value = orjson.dumps(make_event(rng, now))
            sent.append(value)
            pending.append((await producer.send(settings.topic, value=value), None, value))
            if sent and rng.random() < resend_fraction:
                again = rng.choice(sent)
                pending.append((await producer.send(settings.topic, value=again), "resent", again))
            if invalid and rng.random() < len(invalid) / max(1, count - i):
                raw, reason = invalid.pop()
                pending.append((await producer.send(settings.topic, value=raw), reason, raw))
        for raw, reason in invalid:
            pending.append((await producer.send(settings.topic, value=raw), reason, raw))
        for future, kind, value in pending:
            meta = await future
            traffic.end_offsets[meta.partition] = max(
                traffic.end_offsets.get(meta.partition, 0), meta.offset + 1
            )
            if kind is None:
                traffic.valid[orjson.loads(value)["event_id"]] = value
            elif kind == "resent":
                traffic.resent += 1
            else:
                traffic.invalid[(meta.partition, meta.offset)] = kind
    finally:
        await producer.stop()
    return traffic


async def produce_events(
    settings: Settings, events: list[dict[str, Any]], partition: int = 0
) -> dict[int, dict[str, Any]]:
    """Send `events` to one partition, in order; returns offset -> the event sent there."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(settings.topic, orjson.dumps(e), partition=partition) for e in events]
        return {(await f).offset: e for f, e in zip(futures, events, strict=True)}
    finally:
        await producer.stop()


async def stored_offsets(database_url: str, settings: Settings) -> dict[int, int]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT partition, next_offset FROM ingest_offsets WHERE consumer_group=$1 AND topic=$2",
            settings.consumer_group,
            settings.topic,
        )
    finally:
        await conn.close()
    return {r["partition"]: r["next_offset"] for r in rows}


async def wait_caught_up(
    database_url: str, settings: Settings, end_offsets: dict[int, int], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    stored: dict[int, int] = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            stored = await stored_offsets(database_url, settings)
            if all(stored.get(p, 0) >= end for p, end in end_offsets.items()):
                return
        await asyncio.sleep(0.5)
    raise AssertionError(f"workers did not catch up in {timeout}s: stored {stored}, want {end_offsets}")


async def verify_exactly_once(database_url: str, settings: Settings, traffic: Traffic) -> dict[str, int]:
    """docs/contract.md §6: every valid event indexed once with a pointer that reads back to exactly what
    was sent, every object a whole JSON Lines gzip file, every invalid offset dead-lettered."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT id::text AS id, object_uri, byte_offset, byte_length FROM log_index")
        objects = {r["object_uri"] for r in await conn.fetch("SELECT object_uri FROM ingest_objects")}
    finally:
        await conn.close()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "an event_id is indexed twice"
    assert set(ids) == set(traffic.valid), (
        f"missing {len(set(traffic.valid) - set(ids))}, unexpected {len(set(ids) - set(traffic.valid))}"
    )
    assert {r["object_uri"] for r in rows} <= objects, "a pointer names an object missing from the ledger"
    async with s3_client(settings) as s3:
        bodies: dict[str, bytes] = {}
        for uri in {r["object_uri"] for r in rows}:
            bucket, key = parse_object_uri(uri)
            response = await s3.get_object(Bucket=bucket, Key=key)
            async with response["Body"] as stream:
                bodies[uri] = await stream.read()
    for body in bodies.values():
        for line in gzip.decompress(body).splitlines():  # plain gzip reads the whole object
            orjson.loads(line)
    for r in rows:
        member = bodies[r["object_uri"]][r["byte_offset"] : r["byte_offset"] + r["byte_length"]]
        lines = igzip.decompress(member).split(b"\n")
        assert traffic.valid[r["id"]] in lines, f"pointer of {r['id']} does not lead to the event"
    letters = await read_dead_letters(settings)
    assert set(letters) == set(traffic.invalid), (
        f"dead letters missing {set(traffic.invalid) - set(letters)}, "
        f"unexpected {set(letters) - set(traffic.invalid)}"
    )
    for coords, reason in traffic.invalid.items():
        assert letters[coords] == reason, f"{coords}: reason {letters[coords]!r}, expected {reason!r}"
    stored = await stored_offsets(database_url, settings)
    assert stored == traffic.end_offsets
    return {"indexed": len(ids), "objects": len(bodies), "dead_letters": len(letters)}


async def read_dead_letters(settings: Settings) -> dict[tuple[int, int], str]:
    """(source partition, source offset) -> reason; repeats after a crash collapse by coordinates."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    letters: dict[tuple[int, int], str] = {}
    try:
        partitions = consumer.partitions_for_topic(settings.dlq_topic) or set()
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(settings.dlq_topic) or set()
        tps = [TopicPartition(settings.dlq_topic, p) for p in partitions]
        if not tps:
            return letters
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        idle_since = time.monotonic()
        while time.monotonic() - idle_since < 3.0:
            batch = await consumer.getmany(timeout_ms=500)
            if any(batch.values()):
                idle_since = time.monotonic()
            for records in batch.values():
                for record in records:
                    headers = {k: v.decode() for k, v in record.headers}
                    coords = (int(headers["omnilog.source.partition"]), int(headers["omnilog.source.offset"]))
                    assert headers["omnilog.source.topic"] == settings.topic
                    letters[coords] = headers["omnilog.error"]
    finally:
        await consumer.stop()
    return letters


async def wait_for_log(log_path: Path, text: str, timeout: float) -> None:
    """Wait until a worker's JSON log mentions `text` (e.g. its partitions were assigned)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log_path.exists() and text in log_path.read_text(errors="replace"):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{log_path.name} never said {text!r} within {timeout}s")


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "OMNILOG_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
            "OMNILOG_DATABASE_URL": settings.database_url.get_secret_value(),
            "OMNILOG_S3_ENDPOINT_URL": settings.s3_endpoint_url,
            "OMNILOG_S3_BUCKET": settings.s3_bucket,
            "OMNILOG_TOPIC": settings.topic,
            "OMNILOG_DLQ_TOPIC": settings.dlq_topic,
            "OMNILOG_CONSUMER_GROUP": settings.consumer_group,
            "OMNILOG_METRICS_PORT": "0",
            "AWS_ACCESS_KEY_ID": settings.aws_access_key_id.get_secret_value()
            if settings.aws_access_key_id
            else "",
            "AWS_SECRET_ACCESS_KEY": (
                settings.aws_secret_access_key.get_secret_value() if settings.aws_secret_access_key else ""
            ),
            "AWS_REGION": settings.aws_region,
            "OMNILOG_BATCH_MAX_EVENTS": str(settings.batch_max_events),
            "OMNILOG_BATCH_MAX_AGE_S": str(settings.batch_max_age_s),
            "OMNILOG_REBALANCE_DRAIN_S": str(settings.rebalance_drain_s),
            "OMNILOG_SHUTDOWN_GRACE_S": str(settings.shutdown_grace_s),
            "OMNILOG_RETRY_MAX_S": str(settings.retry_max_s),
            "OMNILOG_KAFKA_SESSION_TIMEOUT_MS": str(settings.kafka_session_timeout_ms),
        }
    )
    env.update(extra)
    return env


def start_worker(settings: Settings, log_path: Path, **extra: str) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [str(Path(sys.executable).parent / "omnilog"), "ingest"],
            env=worker_env(settings, **extra),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
