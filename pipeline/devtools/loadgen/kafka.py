"""Send pre-encoded messages to Kafka as fast as one core allows (the load generator's sender).

`EventProducer` hands aiokafka one message at a time (~60 k msg/s on this machine). The load
generator needs more headroom, so this sender fills one record batch per partition itself and
submits whole batches (`send_batch`, ~90 k msg/s): partitions are chosen with Kafka's default
murmur2 partitioner (so keys land where any Kafka client would put them), cached per key because the
generator's keys are a small set. Outstanding batches are bounded (backpressure), and every record
ends up counted as delivered or failed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import aiokafka.errors as kafka_errors
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from pipeline.devtools.loadgen.generator import LoadConfig, generate
from pipeline.devtools.loadgen.summary import SummaryBuilder

log = logging.getLogger(__name__)


class BatchSender:
    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        *,
        compression: Literal["gzip", "none"] = "none",
        acks: Literal["all", 1] = 1,
        max_batch_bytes: int = 512 * 1024,
        linger_s: float = 0.05,
        max_outstanding_batches: int = 64,
        request_timeout_ms: int = 30_000,
        on_failure: Callable[[int, BaseException], None] | None = None,
    ) -> None:
        self.topic = topic
        self.sent = 0  # records submitted
        self.delivered = 0
        self.failed = 0
        self._linger_s = linger_s
        self._max_outstanding = max_outstanding_batches
        self._on_failure = on_failure
        self._kafka = AIOKafkaProducer(
            bootstrap_servers=bootstrap_servers,
            client_id="omnilog-loadgen",
            acks=acks,
            compression_type=None if compression == "none" else compression,
            max_batch_size=max_batch_bytes,
            request_timeout_ms=request_timeout_ms,
        )
        self._partitions: list[int] = []
        self._partition_of: dict[bytes | None, int] = {}
        self._builders: dict[int, tuple[Any, float, int]] = {}  # partition -> (builder, opened, records)
        self._outstanding: set[asyncio.Future[Any]] = set()
        self._slot = asyncio.Event()
        self._round_robin = 0

    async def start(self) -> None:
        await self._kafka.start()
        try:
            partitions = await self._kafka.partitions_for(self.topic)
        except BaseException:
            await self._kafka.stop()
            raise
        if not partitions:
            await self._kafka.stop()
            raise kafka_errors.UnknownTopicOrPartitionError(self.topic)
        self._partitions = sorted(partitions)

    async def send(self, key: bytes | None, value: bytes) -> None:
        """Add one record; waits only when too many batches are outstanding."""
        partition = self._partition_of.get(key)
        if partition is None:
            partition = self._partition(key)
        entry = self._builders.get(partition)
        if entry is None:
            entry = (self._kafka.create_batch(), time.monotonic(), 0)
        builder, opened, records = entry
        if builder.append(key=key, value=value, timestamp=None) is None:
            await self._submit(partition, builder, records)
            builder, opened, records = self._kafka.create_batch(), time.monotonic(), 0
            if builder.append(key=key, value=value, timestamp=None) is None:
                raise kafka_errors.MessageSizeTooLargeError(f"one record of {len(value)} bytes")
        self._builders[partition] = (builder, opened, records + 1)
        self.sent += 1

    async def flush_lingering(self) -> None:
        """Submit batches open longer than the linger time (call this while pacing)."""
        now = time.monotonic()
        for partition, (builder, opened, records) in list(self._builders.items()):
            if now - opened >= self._linger_s:
                del self._builders[partition]
                await self._submit(partition, builder, records)

    async def close(self) -> None:
        """Submit every open batch, wait for all acknowledgements, disconnect."""
        try:
            for partition, (builder, _, records) in list(self._builders.items()):
                del self._builders[partition]
                await self._submit(partition, builder, records)
            if self._outstanding:
                await asyncio.wait(set(self._outstanding))
        finally:
            await self._kafka.stop()

    def _partition(self, key: bytes | None) -> int:
        if key is None:
            self._round_robin += 1
            return self._partitions[self._round_robin % len(self._partitions)]
        partition = int(DefaultPartitioner()(key, self._partitions, self._partitions))
        self._partition_of[key] = partition
        return partition

    async def _submit(self, partition: int, builder: Any, records: int) -> None:
        while len(self._outstanding) >= self._max_outstanding:
            self._slot.clear()
            await self._slot.wait()
        try:
            future = await self._kafka.send_batch(builder, self.topic, partition=partition)
        except kafka_errors.KafkaError as exc:
            self._failed(records, exc)
            return
        self._outstanding.add(future)
        future.add_done_callback(lambda f: self._done(f, records))

    def _done(self, future: asyncio.Future[Any], records: int) -> None:
        self._outstanding.discard(future)
        self._slot.set()
        if future.cancelled():
            self._failed(records, asyncio.CancelledError())
        elif (error := future.exception()) is not None:
            self._failed(records, error)
        else:
            self.delivered += records

    def _failed(self, records: int, error: BaseException) -> None:
        self.failed += records
        log.error("a batch of %d records to %s failed: %r", records, self.topic, error)
        if self._on_failure is not None:
            self._on_failure(records, error)


@dataclass(frozen=True)
class LoadResult:
    sent: int
    delivered: int
    failed: int
    elapsed_s: float
    summary: dict[str, Any]  # the oracle of exactly the messages sent (see .summary)


async def run_load(
    bootstrap_servers: str,
    topic: str,
    config: LoadConfig,
    *,
    rate: float = 0.0,
    duration_s: float | None = None,
    compression: Literal["gzip", "none"] = "none",
    progress: Callable[[int], None] | None = None,
) -> LoadResult:
    """Generate `config`'s messages and send them to `topic`.

    `rate` is messages per second (0: as fast as possible). `duration_s` stops the run after that
    long (with `config.count=None` the stream is endless and this is what ends it).
    """
    if rate < 0:
        raise ValueError("rate must be >= 0")
    if config.count is None and duration_s is None:
        raise ValueError("an endless stream (count=None) needs a duration")
    sender = BatchSender(bootstrap_servers, topic, compression=compression)
    summary = SummaryBuilder(config)
    await sender.start()
    began = time.monotonic()
    deadline = None if duration_s is None else began + duration_s
    sent = 0
    try:
        for message in generate(config):
            if rate > 0:
                delay = began + sent / rate - time.monotonic()
                if delay > 0:
                    await sender.flush_lingering()
                    await asyncio.sleep(delay)
            await sender.send(message.key, message.value)
            summary.add(message)
            sent += 1
            if sent % 1024 == 0 or 0 < rate < 1024:
                if progress is not None:
                    progress(sent)
                await sender.flush_lingering()
                if deadline is not None and time.monotonic() >= deadline:
                    break
    finally:
        await sender.close()
    elapsed = time.monotonic() - began
    if progress is not None:
        progress(sent)
    return LoadResult(sender.sent, sender.delivered, sender.failed, elapsed, summary.build())
