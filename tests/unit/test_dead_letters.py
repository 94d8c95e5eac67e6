"""A dead letter can always be produced: tombstones, oversized values and keys, hostile details."""

from __future__ import annotations

import hashlib
from typing import Any

from pipeline.processing.batch import Message
from pipeline.processing.dead_letters import DeadLetter
from sinks.dead_letters import DETAIL_MAX_BYTES, KEY_MAX_BYTES, DeadLetterWriter


class _Objects:
    bucket = "logs"

    def __init__(self) -> None:
        self.stored: dict[str, bytes] = {}

    async def put_blob(self, key: str, body: bytes) -> None:
        self.stored[key] = body


class _Producer:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send(self, topic: str, **record: Any) -> Any:
        assert record["key"] is not None or record["value"] is not None  # what aiokafka asserts
        self.sent.append({"topic": topic, **record})

        async def delivered() -> None:
            return None

        return delivered()


def _writer(limit: int = 64 * 1024) -> tuple[DeadLetterWriter, _Objects, _Producer]:
    objects, producer = _Objects(), _Producer()
    writer = DeadLetterWriter(producer, "in.dlq", "in", objects, limit)  # type: ignore[arg-type]
    return writer, objects, producer


def _letter(value: bytes | None, key: bytes | None = None, detail: str = "why", **kw: Any) -> DeadLetter:
    size = len(value or b"") + len(key or b"")
    return DeadLetter(Message(3, 42, value, size, key, 0), "not_json", detail, **kw)


async def test_a_tombstone_becomes_an_empty_value_with_a_header() -> None:
    writer, _, producer = _writer()
    await writer.prepare([_letter(None), _letter(None, key=b"k")]).send()
    assert [(r["key"], r["value"]) for r in producer.sent] == [(None, b""), (b"k", b"")]
    for record in producer.sent:
        headers = dict(record["headers"])
        assert headers["omnilog.value.null"] == b"1"
        assert headers["omnilog.source.partition"] == b"3" and headers["omnilog.source.offset"] == b"42"


async def test_an_oversized_value_is_cut_and_stored_whole() -> None:
    writer, objects, producer = _writer(limit=64 * 1024)
    value = bytes(range(256)) * 1024  # 256 KiB
    prepared = writer.prepare([_letter(value)])
    assert prepared.offloads == 1
    await prepared.offload()
    await prepared.send()
    (record,) = producer.sent
    headers = dict(record["headers"])
    size = len(record["value"]) + sum(len(k) + len(v) for k, v in record["headers"])
    assert size < 64 * 1024 and value.startswith(record["value"])
    digest = hashlib.sha256(value).hexdigest()
    assert headers["omnilog.value.sha256"] == digest.encode()
    assert headers["omnilog.value.size"] == str(len(value)).encode()
    assert headers["omnilog.value.uri"] == f"s3://logs/dead-letters/in/3/42-{digest}".encode()
    assert objects.stored == {f"dead-letters/in/3/42-{digest}": value}


async def test_a_value_that_fits_is_sent_as_it_is() -> None:
    writer, objects, _ = _writer()
    prepared = writer.prepare([_letter(b"x" * 1000)])
    (outgoing,) = prepared.records
    assert outgoing.value == b"x" * 1000 and outgoing.offload_key is None
    assert prepared.offloads == 0
    await prepared.offload()
    assert objects.stored == {}


def test_long_keys_and_details_are_cut_safely() -> None:
    writer, _, _ = _writer()
    key = b"k" * 10_000
    (outgoing,) = writer.prepare([_letter(b"{", key=key, detail="é" * 5000, exception="KeyError")]).records
    headers = dict(outgoing.headers)
    assert outgoing.key == key[:KEY_MAX_BYTES]
    assert headers["omnilog.key.size"] == b"10000"
    assert headers["omnilog.key.sha256"] == hashlib.sha256(key).hexdigest().encode()
    assert len(headers["omnilog.error.detail"]) <= DETAIL_MAX_BYTES
    headers["omnilog.error.detail"].decode("utf-8")  # never cut inside a character
    assert headers["omnilog.error.exception"] == b"KeyError"
