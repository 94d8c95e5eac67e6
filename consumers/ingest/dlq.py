"""Dead letters: invalid messages go to the dead-letter topic with their reason and source
coordinates in headers (docs/contract.md, "Dead letters"), and a limit that stops a bad deploy from
being drained into the dead-letter topic.

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
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from consumers.ingest.batch import Message
from sinks.objects import ObjectWriter, object_uri

# Room kept for the record's framing and the headers we add (their values are bounded below).
_RECORD_OVERHEAD: Final = 4096
DETAIL_MAX_BYTES: Final = 1024
KEY_MAX_BYTES: Final = 1024


@dataclass(frozen=True, slots=True)
class DeadLetter:
    message: Message
    reason: str
    detail: str
    exception: str | None = None  # the exception class, for reason `internal_error`


class DeadLetterLimitExceeded(Exception):
    """Too many invalid messages: consumption stops so the bad input is not silently drained."""


class DeadLetterLimit:
    """Trips when, over the last `window` messages (once that many were seen), the share of
    invalid ones exceeds `max_ratio`."""

    def __init__(self, max_ratio: float, window: int) -> None:
        self._max_ratio = max_ratio
        self._window = window
        self._recent: deque[tuple[int, int]] = deque()  # (messages, invalid) per batch
        self._messages = 0
        self._invalid = 0

    def check(self, messages: int, invalid: int) -> None:
        """Record one batch; raise DeadLetterLimitExceeded if the limit is crossed."""
        self._recent.append((messages, invalid))
        self._messages += messages
        self._invalid += invalid
        while self._recent and self._messages - self._recent[0][0] >= self._window:
            old_messages, old_invalid = self._recent.popleft()
            self._messages -= old_messages
            self._invalid -= old_invalid
        if self._messages >= self._window and self._invalid > self._max_ratio * self._messages:
            raise DeadLetterLimitExceeded(
                f"{self._invalid} of the last {self._messages} messages were invalid "
                f"(limit {self._max_ratio:.0%}, OMNILOG_DLQ_MAX_RATIO); consumption stopped"
            )


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

    def prepare(self, letters: Sequence[DeadLetter]) -> list[OutgoingLetter]:
        return [self._outgoing(letter) for letter in letters]

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

    async def offload(self, outgoing: Sequence[OutgoingLetter]) -> int:
        """Store the whole values of cut letters (idempotent: same name, same bytes). Returns how many."""
        cut = [o for o in outgoing if o.offload_key is not None]
        async with asyncio.TaskGroup() as group:
            for o in cut:
                assert o.offload_key is not None
                group.create_task(self.objects.put_blob(o.offload_key, o.offload_body))
        return len(cut)

    async def send(self, outgoing: Sequence[OutgoingLetter]) -> None:
        """Produce every letter and wait until the broker has them all (at-least-once)."""
        futures = [
            await self.producer.send(self.dlq_topic, key=o.key, value=o.value, headers=o.headers)
            for o in outgoing
        ]
        if futures:
            await asyncio.gather(*futures)


def _cut_utf8(text: str, limit: int) -> bytes:
    """`text` as UTF-8, at most `limit` bytes, never ending inside a character."""
    encoded = text.encode("utf-8", "backslashreplace")
    if len(encoded) <= limit:
        return encoded
    return encoded[:limit].decode("utf-8", "ignore").encode()
