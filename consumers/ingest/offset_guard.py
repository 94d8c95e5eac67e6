"""Stored offsets that no longer fit the partition's log, and what the worker does about them.

A stored offset (Postgres `ingest_offsets`) can fall outside `[log start, log end]`:

- `past_end`: the topic was deleted and re-created, so its offsets began again at 0;
- `before_start`: Kafka retention deleted records this consumer group had not read yet.

Kafka clients left alone handle both by jumping silently (`auto_offset_reset`); here they are
detected — when partitions are assigned (comparing each stored offset with the log's bounds) and
while consuming (the broker's OFFSET_OUT_OF_RANGE, or a high watermark below where the worker
already is, which is how Tansu shows a re-created topic: it never answers out of range) — then
counted, logged once per partition, and resolved by `OMNILOG_OFFSET_OUT_OF_RANGE`:

- `earliest` (default): resume at the first record still in the log. Past the end, that re-reads
  the re-created topic from its start (events already indexed are counted as duplicates by
  event_id); before the start, the records in between are gone and counted as lost.
- `fail`: stop the worker with a non-zero exit and readiness down; nothing is moved, so an
  operator decides (restore the records, or restart with `earliest` to accept the loss).

A move is written to Postgres with a compare-and-set from the value read (sinks/offsets.py), so
the fencing of batches still holds: a zombie worker cannot move an offset it no longer owns.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import asyncpg
from aiokafka import TopicPartition

from pipeline.metrics import WorkerMetrics
from pipeline.processing.retry import ErrorKind, PermanentError, RetryPolicy
from sinks.index import load_offsets
from sinks.offsets import move_offset

log = logging.getLogger("omnilog.offsets")

Policy = Literal["earliest", "fail"]


class OutOfRange(enum.StrEnum):
    BEFORE_START = "before_start"
    PAST_END = "past_end"


class Action(enum.StrEnum):
    KEEP = "keep"  # the stored offset fits the log
    MOVE = "move"  # resume at `Decision.position` and store it
    FAIL = "fail"  # stop the worker; nothing moves


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    position: int  # where consumption resumes (the stored offset unless moved)
    kind: OutOfRange | None = None
    lost: int = 0  # records deleted from the log before they were read


def reconcile(stored: int, log_start: int, log_end: int, policy: Policy) -> Decision:
    """What to do with a partition whose next offset to read is `stored`, when its log holds
    offsets `[log_start, log_end)`. `stored == log_end` means caught up: it fits."""
    if log_start < 0 or log_end < log_start:
        raise ValueError(f"inconsistent log bounds: start {log_start}, end {log_end}")
    if stored < 0:
        raise ValueError(f"a stored offset cannot be negative: {stored}")
    if stored < log_start:
        kind, lost = OutOfRange.BEFORE_START, log_start - stored
    elif stored > log_end:
        kind, lost = OutOfRange.PAST_END, 0
    else:
        return Decision(Action.KEEP, stored)
    if policy == "fail":
        return Decision(Action.FAIL, stored, kind, lost)
    return Decision(Action.MOVE, log_start, kind, lost)


class OffsetsOutOfRange(Exception):
    """The `fail` policy met stored offsets outside their log."""

    def __init__(self, topic: str, partitions: Sequence[int]) -> None:
        super().__init__(
            f"stored offsets outside the log of {topic} partitions {sorted(partitions)} "
            "(OMNILOG_OFFSET_OUT_OF_RANGE=fail)"
        )
        self.partitions = list(partitions)


class OffsetConsumer(Protocol):
    """What the guard needs of a Kafka consumer (aiokafka's AIOKafkaConsumer)."""

    async def beginning_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]: ...
    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]: ...
    def highwater(self, partition: TopicPartition) -> int | None: ...
    def last_poll_timestamp(self, partition: TopicPartition) -> int | None: ...
    def assignment(self) -> set[TopicPartition]: ...


class OffsetGuard:
    """Keeps a worker's positions inside its partitions' logs (see the module docstring).

    Past the end is acted on only once a fetch confirmed it: the broker refused the position, or
    answered with a high watermark below it. The end offset a ListOffsets request reports is not
    enough: Tansu 0.6 reports the base offset of the last record batch plus one there (1 for a
    log of one 50-record batch), which would restart healthy partitions from their log start.
    The log start it reports is right, so before the start is acted on at assignment already.
    """

    def __init__(
        self, policy: Policy, topic: str, consumer_group: str, metrics: WorkerMetrics, retry: RetryPolicy
    ) -> None:
        self.policy = policy
        self._topic = topic
        self._group = consumer_group
        self._metrics = metrics
        self._retry = retry
        self._refused: set[int] = set()  # partitions whose fetch position the broker refused
        # When each partition was last sought (ms, the clock aiokafka stamps fetch responses
        # with): a high watermark from before that belongs to the old position, not this one.
        self._sought_ms: dict[int, int] = {}

    def note_seek(self, partitions: Iterable[int]) -> None:
        now_ms = int(time.time() * 1000)
        for partition in partitions:
            self._sought_ms[partition] = now_ms

    def note_refused(self, partitions: Iterable[int]) -> None:
        """The broker answered OFFSET_OUT_OF_RANGE for these partitions' fetch positions."""
        self._refused.update(partitions)

    async def fit(
        self, consumer: OffsetConsumer, pool: asyncpg.Pool, stored: Mapping[int, int]
    ) -> dict[int, int]:
        """The positions to seek to: `stored`, with every offset outside its log moved by the
        policy (in Postgres too). Raises PermanentError for the `fail` policy, or when Kafka or
        Postgres fail permanently; retries while they are unavailable."""
        if not stored:
            return {}
        partitions = sorted(stored)

        async def read_bounds() -> dict[int, tuple[int, int]]:
            return await self._log_bounds(consumer, partitions)

        bounds = await self._retry.call("log_bounds", "kafka", read_bounds)
        refused, self._refused = self._refused, set()
        positions: dict[int, int] = {}
        stopping: list[int] = []
        owned = consumer.assignment()
        for partition in partitions:
            offset = stored[partition]
            log_start, listed_end = bounds[partition]
            highwater = self._fresh_highwater(consumer, TopicPartition(self._topic, partition), owned)
            log_end = max(listed_end, highwater if highwater is not None else -1)
            if offset > log_end and highwater is None and partition not in refused:
                # Unconfirmed: seek there; the first fetch confirms it (or shows the listed end was low).
                log.debug(
                    "stored offset beyond the listed log end; the first fetch will tell",
                    extra={"partition": partition, "stored_offset": offset, "listed_end": listed_end},
                )
                log_end = offset
            try:
                decision = reconcile(offset, log_start, max(log_end, log_start), self.policy)
            except ValueError as exc:
                raise PermanentError("log_bounds", ErrorKind.FATAL, exc) from exc
            if decision.kind is None:
                positions[partition] = offset
                continue
            self._metrics.offset_out_of_range.labels(decision.kind.value).inc()
            details = {
                "partition": partition,
                "stored_offset": offset,
                "log_start": log_start,
                "log_end": log_end,
                "kind": decision.kind.value,
                "records_lost": decision.lost,
                "policy": self.policy,
            }
            if decision.action is Action.FAIL:
                log.error("stored offset outside the log: stopping, nothing moved", extra=details)
                stopping.append(partition)
                continue
            positions[partition] = await self._move(pool, partition, offset, decision, details)
        if stopping:
            raise PermanentError(
                "offset_out_of_range", ErrorKind.FATAL, OffsetsOutOfRange(self._topic, stopping)
            )
        return positions

    def past_end_suspected(self, consumer: OffsetConsumer, positions: Mapping[int, int]) -> bool:
        """True when an owned partition's high watermark, from a fetch at its current position,
        is below where the worker already is: the log shrank under it (a re-created topic).
        Kafka answers such a fetch with OFFSET_OUT_OF_RANGE, but Tansu answers it with no
        records, and would then serve the records produced later from that offset on, skipping
        those before it without a word."""
        owned = consumer.assignment()
        for tp in owned:
            position = positions.get(tp.partition)
            if tp.topic != self._topic or position is None:
                continue
            highwater = self._fresh_highwater(consumer, tp, owned)
            if highwater is not None and highwater < position:
                return True
        return False

    def _fresh_highwater(
        self, consumer: OffsetConsumer, tp: TopicPartition, owned: set[TopicPartition]
    ) -> int | None:
        """The high watermark of the last fetch answered since the partition's last seek."""
        if tp not in owned:
            return None
        highwater, polled_ms = consumer.highwater(tp), consumer.last_poll_timestamp(tp)
        if highwater is None or polled_ms is None or polled_ms < self._sought_ms.get(tp.partition, 0):
            return None
        return highwater

    async def _log_bounds(
        self, consumer: OffsetConsumer, partitions: list[int]
    ) -> dict[int, tuple[int, int]]:
        tps = [TopicPartition(self._topic, p) for p in partitions]
        starts = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        return {tp.partition: (starts[tp], ends[tp]) for tp in tps}

    async def _move(
        self, pool: asyncpg.Pool, partition: int, stored: int, decision: Decision, details: dict[str, Any]
    ) -> int:
        """Store the decided position (compare-and-set from `stored`) and return where to resume."""

        async def attempt() -> int | None:
            async with pool.acquire() as conn:
                if await move_offset(conn, self._group, self._topic, partition, stored, decision.position):
                    return None
                # Moved meanwhile (a batch of ours committed, or another owner): resume from what is
                # stored now; if that does not fit either, the next fetch detects it again.
                current = await load_offsets(conn, self._group, self._topic, [partition])
                return current.get(partition, stored)

        current = await self._retry.call("move_offset", "postgres", attempt)
        if current is not None:
            log.warning(
                "stored offset outside the log, but it changed before it could be moved; resuming from it",
                extra={**details, "action": "none", "current_offset": current},
            )
            return current
        if decision.lost:
            self._metrics.offsets_lost.inc(decision.lost)
        log.warning(
            "stored offset outside the log: moved to the log start",
            extra={**details, "action": "move", "new_offset": decision.position},
        )
        return decision.position
