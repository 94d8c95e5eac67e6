"""The read path finds every accepted event whatever the case or escaping of its id in the bytes
sent, and one unreadable object does not abort `logs query --with-body` (real worker, real stack)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aioboto3
import asyncpg
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from consumers.ingest.factory import build_worker
from pipeline.settings import Settings
from sinks.migrate import migrate
from tests.integration.ingest_support import create_topic, wait_caught_up, worker_env

pytestmark = pytest.mark.integration

OMNILOG = str(Path(sys.executable).with_name("omnilog"))


def _escaped(text: str, chars: str) -> str:
    """`text` as JSON string content with each of `chars` written as a \\u escape."""
    return "".join(f"\\u{ord(c):04X}" if c in chars else c for c in text)


@dataclass
class Sent:
    org: str
    event_id: str  # canonical, as the index holds it
    value: bytes  # exactly what was produced

    @property
    def stored(self) -> bytes:
        # The worker stores the value as received, raw CR/LF bytes (whitespace) turned into spaces.
        return self.value.replace(b"\r", b" ").replace(b"\n", b" ")


def _values(orgs: list[str], now: datetime) -> Iterator[Sent]:
    started = (now - timedelta(minutes=5)).isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def common(org: str) -> str:
        return f'"organization_id":"{org}","started_at":"{started}","duration_ms":7'

    org = orgs[0]
    upper, escaped, key_escaped, decoy_target = (str(uuid.uuid4()) for _ in range(4))
    # A decoy first: its body holds another event's id (lower case), the needle of the old search.
    decoy = str(uuid.uuid4())
    yield Sent(
        org,
        decoy,
        orjson.dumps({"event_id": decoy, "organization_id": org, "started_at": started, "duration_ms": 1,
                      "request": {"see": decoy_target}}),
    )  # fmt: skip
    yield Sent(org, upper, f'{{"event_id":"{upper.upper()}",{common(org)}}}'.encode())
    yield Sent(org, escaped, f'{{"event_id":"{_escaped(escaped, "abcdef-")}",{common(org)}}}'.encode())
    mixed = "".join(c.upper() if i % 2 else c for i, c in enumerate(key_escaped))
    yield Sent(org, key_escaped, f'{{"event\\u005Fid" : "{mixed}" , {common(org)}}}'.encode())
    # Pretty-printed over CRLF lines, the id upper case: never compact, never lower case.
    pretty = f'{{\r\n  "event_id": "{decoy_target.upper()}",\r\n  {common(org)},\r\n  "level": "info"\r\n}}'
    yield Sent(org, decoy_target, pretty.encode())
    # Hostile sizes and shapes: a 2 MiB string, 300-deep nesting, escapes everywhere.
    big, deep = str(uuid.uuid4()), str(uuid.uuid4())
    blob = {"blob": "x" * (2 << 20)}
    value = {"event_id": big.upper(), "organization_id": org, "started_at": started, "duration_ms": 2}
    yield Sent(org, big, orjson.dumps({**value, "request": blob}))
    nested = '{"a":' * 300 + '"\\u00e9\\n"' + "}" * 300
    yield Sent(
        org,
        deep,
        f'{{"metadata":{nested},"event_id":"{_escaped(deep, "0123456789")}",{common(org)}}}'.encode(),
    )
    # One plain event in each of the other organizations (their own objects, tampered with later).
    for other in orgs[1:]:
        plain = str(uuid.uuid4())
        yield Sent(other, plain, f'{{"event_id":"{plain}",{common(other)}}}'.encode())


async def _produce(settings: Settings, values: list[Sent]) -> dict[int, int]:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers, max_request_size=8 << 20)
    await producer.start()
    try:
        end: dict[int, int] = {}
        for sent in values:
            meta = await producer.send_and_wait(settings.topic, value=sent.value, partition=0)
            end[meta.partition] = max(end.get(meta.partition, 0), meta.offset + 1)
    finally:
        await producer.stop()
    return end


def _omnilog(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([OMNILOG, *args], env=env, cwd=cwd, capture_output=True, timeout=120, check=False)


async def _object_of(database_url: str, org: str) -> str:
    conn = await asyncpg.connect(database_url)
    try:
        uris = await conn.fetch(
            "SELECT DISTINCT object_uri FROM log_index WHERE organization_id = $1::uuid", org
        )
    finally:
        await conn.close()
    assert len(uris) == 1
    return str(uris[0]["object_uri"])


async def _tamper(settings: Settings, missing_uri: str, corrupt_uri: str) -> None:
    """Delete one object and overwrite another with bytes that are not gzip (test-only tampering)."""
    async with aioboto3.Session().client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        aws_access_key_id=settings.aws_access_key_id.get_secret_value()
        if settings.aws_access_key_id
        else None,
        aws_secret_access_key=(
            settings.aws_secret_access_key.get_secret_value() if settings.aws_secret_access_key else None
        ),
        region_name=settings.aws_region,
    ) as s3:
        bucket, _, key = missing_uri[5:].partition("/")
        await s3.delete_object(Bucket=bucket, Key=key)
        bucket, _, key = corrupt_uri[5:].partition("/")
        await s3.put_object(Bucket=bucket, Key=key, Body=b"this is not a gzip member " * 4096)


async def test_ids_in_any_case_or_escaping_are_found_and_bad_objects_stay_on_their_row(
    fresh_database_url: str, make_settings: Any, tmp_path: Path
) -> None:
    settings = make_settings(database_url=fresh_database_url, batch_max_events=100, batch_max_age_s=0.5)
    await migrate(fresh_database_url)
    await create_topic(settings, settings.topic, partitions=1)
    orgs = [str(uuid.uuid4()) for _ in range(3)]
    sent = list(_values(orgs, datetime.now(UTC)))
    end_offsets = await _produce(settings, sent)
    worker = build_worker(settings)
    task = asyncio.create_task(worker.run())
    try:
        await wait_caught_up(fresh_database_url, settings, end_offsets, timeout=120)
    finally:
        worker.request_stop()
        assert await asyncio.wait_for(task, 60) == 0
    env = worker_env(settings)

    # `logs get`: the exact stored line of every event, by its canonical id and by its id upper case.
    for event in sent:
        for given in (event.event_id, event.event_id.upper()):
            done = await asyncio.to_thread(_omnilog, ["logs", "get", given], env, tmp_path)
            assert done.returncode == 0, (event.event_id, done.stderr[-2000:])
            assert done.stdout.rstrip(b"\n") == event.stored, event.event_id

    # --pretty re-indents even the 300-deep event (orjson would refuse to encode it).
    for event in sent:
        done = await asyncio.to_thread(_omnilog, ["logs", "get", event.event_id, "--pretty"], env, tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout) == json.loads(event.stored)

    # `logs query --with-body`: every body of the first organization, parsed.
    args = ["logs", "query", "--org", orgs[0], "--with-body", "--format", "json", "--limit", "100"]
    done = await asyncio.to_thread(_omnilog, args, env, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [orjson.loads(line) for line in done.stdout.splitlines()]
    expected = {e.event_id: orjson.loads(e.stored) for e in sent if e.org == orgs[0]}
    assert {row["id"]: row["event"] for row in rows} == expected

    # A missing object and a corrupt one: their rows say why, the others print, exit 1.
    missing, corrupt = orgs[1], orgs[2]
    await _tamper(
        settings,
        await _object_of(fresh_database_url, missing),
        await _object_of(fresh_database_url, corrupt),
    )
    args = ["logs", "query", "--with-body", "--format", "json", "--limit", "100"]
    done = await asyncio.to_thread(_omnilog, args, env, tmp_path)
    assert done.returncode == 1
    assert b"Traceback" not in done.stderr
    assert (
        done.stderr.decode().strip()
        == f"omnilog: 2 of {len(sent)} bodies could not be read (see event_error)"
    )
    by_org = {row["organization_id"]: row for row in map(orjson.loads, done.stdout.splitlines())}
    assert "NoSuchKey" in by_org[missing]["event_error"] and "event" not in by_org[missing]
    assert "not a readable gzip member" in by_org[corrupt]["event_error"]
    good = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert {r["id"]: r["event"] for r in good if "event" in r} == expected

    # `logs get` of the same: one line each, exit 1.
    for org, words in ((missing, "NoSuchKey"), (corrupt, "not a readable gzip member")):
        event_id = next(e.event_id for e in sent if e.org == org)
        done = await asyncio.to_thread(_omnilog, ["logs", "get", event_id], env, tmp_path)
        assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done.stderr
        assert words in done.stderr.decode()

    # Object storage down: `logs get` names it in one line; `logs query` still lists the index.
    down = {**env, "OMNILOG_S3_ENDPOINT_URL": "http://127.0.0.1:1"}
    done = await asyncio.to_thread(_omnilog, ["logs", "get", sent[0].event_id], down, tmp_path)
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done.stderr
    assert b"object storage (OMNILOG_S3_ENDPOINT_URL" in done.stderr
    done = await asyncio.to_thread(
        _omnilog, ["logs", "query", "--with-body", "--format", "json"], down, tmp_path
    )
    assert done.returncode == 1 and b"Traceback" not in done.stderr
    rows = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert len(rows) == len(sent) and all("object storage" in row["event_error"] for row in rows)
