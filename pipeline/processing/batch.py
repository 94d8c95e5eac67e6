"""Accumulating consumed messages into batches bounded by count, raw message bytes and age.

A batch spans every partition the worker owns: one flush then writes fewer, larger objects and
one transaction for all of them (the offset compare-and-set fences each partition separately).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.processing.offsets import PartitionRange


@dataclass(slots=True)
class Message:
    """What a flush needs of one Kafka record: its bytes, coordinates and timestamp."""

    partition: int
    offset: int
    value: bytes | None  # None for a tombstone
    size: int  # key + value bytes
    key: bytes | None = None
    timestamp_ms: int = -1  # the record's Kafka timestamp; -1 when the record has none


@dataclass(slots=True)
class Batch:
    messages: list[Message]
    ranges: list[PartitionRange]
    size_bytes: int

    @property
    def partitions(self) -> list[int]:
        return [r.partition for r in self.ranges]


@dataclass(slots=True)
class BatchLimits:
    max_events: int
    max_bytes: int
    max_age_s: float


@dataclass
class BatchBuffer:
    """Messages since the last `take`, and each partition's next expected offset.

    `positions[p]` is where the next batch of p starts; it equals the stored Postgres offset
    whenever nothing is buffered or in flight, so a batch's ranges always chain exactly.
    """

    limits: BatchLimits
    clock: Any = time.monotonic
    positions: dict[int, int] = field(default_factory=dict)
    _messages: list[Message] = field(default_factory=list)
    _first_offset: dict[int, int] = field(default_factory=dict)
    _last_offset: dict[int, int] = field(default_factory=dict)
    _bytes: int = 0
    _opened_at: float | None = None

    def __len__(self) -> int:
        return len(self._messages)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def add(self, partition: int, records: Sequence[Any]) -> int:
        """Append consumed records of one partition; returns how many were accepted.

        Records before the partition's position (a stale fetch racing a seek) are dropped:
        they belong to a range that is already committed or will be re-read.
        """
        if partition not in self.positions:
            return 0  # not (or no longer) ours
        accepted = 0
        last = self._last_offset.get(partition, self.positions[partition] - 1)
        for record in records:
            if record.offset <= last:
                continue
            value, key = record.value, record.key
            size = (len(value) if value is not None else 0) + (len(key) if key is not None else 0)
            timestamp = record.timestamp if isinstance(record.timestamp, int) else -1
            self._messages.append(Message(partition, record.offset, value, size, key, timestamp))
            self._bytes += size
            last = record.offset
            accepted += 1
        if accepted:
            self._last_offset[partition] = last
            if self._opened_at is None:
                self._opened_at = self.clock()
        return accepted

    def full(self) -> bool:
        return len(self._messages) >= self.limits.max_events or self._bytes >= self.limits.max_bytes

    def due(self) -> bool:
        if not self._messages:
            return False
        assert self._opened_at is not None
        return self.full() or self.clock() - self._opened_at >= self.limits.max_age_s

    def take(self) -> Batch:
        """Close the current batch; the positions move to where the next batch starts."""
        ranges = []
        for partition, last in sorted(self._last_offset.items()):
            ranges.append(PartitionRange(partition, self.positions[partition], last + 1))
            self.positions[partition] = last + 1
        batch = Batch(self._messages, ranges, self._bytes)
        self._messages = []
        self._last_offset = {}
        self._bytes = 0
        self._opened_at = None
        return batch

    def assign(self, positions: dict[int, int]) -> None:
        self.positions.update(positions)

    def revoke(self, partitions: Sequence[int]) -> None:
        """Forget partitions: their buffered messages are dropped (the next owner re-reads them)."""
        gone = set(partitions)
        for p in gone:
            self.positions.pop(p, None)
            self._last_offset.pop(p, None)
        if gone and self._messages:
            kept = [m for m in self._messages if m.partition not in gone]
            self._messages = kept
            self._bytes = sum(m.size for m in kept)
            if not kept:
                self._opened_at = None

    def reset(self, positions: dict[int, int]) -> None:
        """Drop everything buffered and restart each partition at the given stored offsets."""
        self._messages = []
        self._last_offset = {}
        self._bytes = 0
        self._opened_at = None
        self.positions = dict(positions)
