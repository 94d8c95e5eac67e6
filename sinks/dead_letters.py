"""The dead-letter sink: invalid messages go to the dead-letter topic with their reason and source
coordinates in headers (docs/contract.md §2).

A dead letter can always be produced, whatever the message was:
- a tombstone (no value) is sent with an empty value and `omnilog.value.null: 1`, keeping its key;
- a record too large for the dead-letter topic (`max_record_bytes`, key + value + headers) keeps a
  truncated copy of its value; the whole value is stored first in object storage under a name derived
  from its coordinates and digest (so a retried flush writes the same object again), and the headers
  `omnilog.value.uri`, `omnilog.value.size` and `omnilog.value.sha256` say where and what it is. A key
  longer than `KEY_MAX_BYTES` is cut the same way (`omnilog.key.size`, `omnilog.key.sha256`).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from pipeline.processing.dead_letters import DeadLetter
from pipeline.processing.layout import object_uri
from sinks.objects import ObjectWriter

# Room kept for the record's framing and the headers we add (their values are bounded below).
_RECORD_OVERHEAD: Final = 4096
DETAIL_MAX_BYTES: Final = 1024
KEY_MAX_BYTES: Final = 1024


@dataclass(frozen=True, slots=True)
class OutgoingLetter:
    """One dead-letter record as it will be produced, and the value to store aside if it is cut."""

    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]
    offload_key: str | None = None  # object key of the whole value, when the record carries a cut copy
    offload_body: bytes = b""


@dataclass(frozen=True)
class DeadLetterWriter:
    """Turns dead letters into records that fit the dead-letter topic, and produces them."""

    producer: Any
    dlq_topic: str
    source_topic: str
    objects: ObjectWriter
    max_record_bytes: int
    object_prefix: str = "dead-letters/"

    def prepare(self, letters: Sequence[DeadLetter]) -> PreparedDeadLetters:
        return PreparedDeadLetters(self, [self._outgoing(letter) for letter in letters])

    def _outgoing(self, letter: DeadLetter) -> OutgoingLetter:
        m = letter.message
        headers = [
            ("omnilog.error", letter.reason.encode()),
            ("omnilog.error.detail", _cut_utf8(letter.detail, DETAIL_MAX_BYTES)),
            ("omnilog.source.topic", self.source_topic.encode()),
            ("omnilog.source.partition", str(m.partition).encode()),
            ("omnilog.source.offset", str(m.offset).encode()),
        ]
        if letter.exception is not None:
            headers.append(("omnilog.error.exception", letter.exception.encode()[:256]))
        key = m.key
        if key is not None and len(key) > KEY_MAX_BYTES:
            headers.append(("omnilog.key.size", str(len(key)).encode()))
            headers.append(("omnilog.key.sha256", hashlib.sha256(key).hexdigest().encode()))
            key = key[:KEY_MAX_BYTES]
        if m.value is None:
            # The producer refuses a record with neither key nor value; an empty value plus this
            # header keeps "it was a tombstone" without inventing content.
            headers.append(("omnilog.value.null", b"1"))
            return OutgoingLetter(key, b"", headers)
        room = self.max_record_bytes - _RECORD_OVERHEAD - len(key or b"") - sum(len(v) for _, v in headers)
        if len(m.value) <= room:
            return OutgoingLetter(key, m.value, headers)
        digest = hashlib.sha256(m.value).hexdigest()
        object_key = f"{self.object_prefix}{self.source_topic}/{m.partition}/{m.offset}-{digest}"
        headers += [
            ("omnilog.value.uri", object_uri(self.objects.bucket, object_key).encode()),
            ("omnilog.value.size", str(len(m.value)).encode()),
            ("omnilog.value.sha256", digest.encode()),
        ]
        room -= 512  # the three headers above (bucket names and topics are short)
        return OutgoingLetter(key, m.value[: max(room, 0)], headers, object_key, m.value)

    async def offload(self, outgoing: Sequence[OutgoingLetter]) -> None:
        async with asyncio.TaskGroup() as group:
            for o in outgoing:
                if o.offload_key is not None:
                    group.create_task(self.objects.put_blob(o.offload_key, o.offload_body))

    async def send(self, outgoing: Sequence[OutgoingLetter]) -> None:
        futures = [
            await self.producer.send(self.dlq_topic, key=o.key, value=o.value, headers=o.headers)
            for o in outgoing
        ]
        if futures:
            await asyncio.gather(*futures)


@dataclass(frozen=True, slots=True)
class PreparedDeadLetters:
    """`DeadLetterWriter.prepare`'s result (pipeline.processing.store.PreparedLetters)."""

    writer: DeadLetterWriter
    records: list[OutgoingLetter]

    @property
    def offloads(self) -> int:
        return sum(1 for o in self.records if o.offload_key is not None)

    async def offload(self) -> None:
        await self.writer.offload(self.records)

    async def send(self) -> None:
        await self.writer.send(self.records)


def _cut_utf8(text: str, limit: int) -> bytes:
    """`text` as UTF-8, at most `limit` bytes, never ending inside a character."""
    encoded = text.encode("utf-8", "backslashreplace")
    if len(encoded) <= limit:
        return encoded
    return encoded[:limit].decode("utf-8", "ignore").encode()
