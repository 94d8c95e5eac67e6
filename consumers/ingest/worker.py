"""The ingest worker: one consumer-group member (docs/contract.md §6, docs/ingest.md).

The poll loop never blocks on a flush: flushes run as tasks while the loop keeps polling (so
group membership and liveness hold during a dependency outage) and fills the next batch. Up to two
batches are in flight (pipeline/processing/flush_pipeline.py): one committing, the next preparing
(decode, dead letters, encode, upload), which commits only after the first has. When no batch can
start and the buffer is full too, or the bytes buffered and in flight reach the in-flight byte cap,
the loop pauses the partitions (backpressure) until a flush moves on.

Progress lives in Postgres (`ingest_offsets`). aiokafka rebalances eagerly: every member revokes
all its partitions before any is assigned, so the revoke callback is where the flushes in flight
are finished in order or abandoned (both within one OMNILOG_REBALANCE_DRAIN_S) and the buffer
dropped; the assign callback seeks every partition to its stored offset. A late commit of an
abandoned flush is harmless: the offset compare-and-set in its transaction fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from contextlib import AsyncExitStack
from datetime import date, timedelta
from typing import Any, TypeVar

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import NoOffsetForPartitionError, OffsetOutOfRangeError
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

from consumers.ingest import clients
from consumers.ingest.batch_report import record_batch
from consumers.ingest.health import HealthServer
from consumers.ingest.offset_guard import OffsetGuard
from consumers.ingest.readiness import Readiness
from pipeline.contract import ValidationPolicy
from pipeline.metrics import WorkerMetrics
from pipeline.processing.batch import Batch, BatchBuffer, BatchLimits
from pipeline.processing.dead_letters import DeadLetterLimit, DeadLetterLimitExceeded
from pipeline.processing.flush import FlushContext
from pipeline.processing.flush_pipeline import Discarded, FlushPipeline, InFlight
from pipeline.processing.offsets import Fenced
from pipeline.processing.retry import PermanentError, RetryPolicy, Stopped
from pipeline.settings import Settings
from sinks.db import Connection
from sinks.dead_letters import DeadLetterWriter
from sinks.index import BatchExtension, Horizon, PostgresIndexStore, init_offsets, load_offsets
from sinks.objects import ObjectWriter, s3_client

log = logging.getLogger("omnilog.worker")
# How long a stop waits for the poll loop's current await before cancelling it.
POLL_STOP_TIMEOUT_S = 5.0

T = TypeVar("T")
EnsurePartitions = Callable[[Connection, set[date]], Awaitable[None]]
# A job running beside the poll loop (the aggregates merger): started once the worker is up,
# cancelled at shutdown after the last flush.
BackgroundJob = Callable[[asyncpg.Pool, WorkerMetrics], Coroutine[Any, Any, None]]


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: IngestWorker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._worker.on_revoked([tp.partition for tp in revoked if tp.topic == self._worker.topic])

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._worker.on_assigned([tp.partition for tp in assigned if tp.topic == self._worker.topic])


class IngestWorker:
    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry | None = None,
        extensions: Sequence[BatchExtension] = (),
        ensure_partitions: EnsurePartitions | None = None,
        background: Sequence[BackgroundJob] = (),
        horizon: Horizon | None = None,
    ) -> None:
        self.settings = settings
        self.topic = settings.topic
        self.registry = registry or CollectorRegistry()
        self.metrics = WorkerMetrics(self.registry)
        if registry is None:
            # process_* (RSS, CPU, fds) feed the memory panels and alerts; a registry passed in by
            # a caller (tests, several workers in one process) is left as the caller built it.
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        self._extensions = extensions
        self._ensure_partitions = ensure_partitions
        self._background = background
        self._horizon = horizon
        self._buffer = BatchBuffer(
            BatchLimits(settings.batch_max_events, settings.batch_max_bytes, settings.batch_max_age_s)
        )
        self._stop = asyncio.Event()
        self._flushes: FlushPipeline | None = None  # built with the flush context, once connected
        self._committed: dict[int, int] = {}
        self._loop_progress = time.monotonic()
        self._ready = Readiness(self.metrics)
        self._consumer: AIOKafkaConsumer | None = None
        self._pool: asyncpg.Pool | None = None
        self._ctx: FlushContext | None = None
        self.health: HealthServer | None = None
        self.exit_code = 0
        self._retry = RetryPolicy(
            self.metrics, settings.retry_max_s, on_dependency=self._ready.set_dependency
        )
        self._offset_guard = OffsetGuard(
            settings.offset_out_of_range, settings.topic, settings.consumer_group, self.metrics, self._retry
        )

    # ---- lifecycle ---------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:
        """Run until `request_stop`; returns the process exit code."""
        async with AsyncExitStack() as stack:
            self.health = HealthServer(
                self.registry, self.settings.metrics_port, lambda: self._loop_progress, self._readiness
            )
            await self.health.start()
            stack.push_async_callback(self.health.stop)
            log.info(
                "worker starting",
                extra={
                    "topic": self.topic,
                    "group": self.settings.consumer_group,
                    "metrics_port": self.health.bound_port,
                },
            )
            if not await self._start(stack):
                return self.exit_code
            self._ready.started = True
            gc.collect()
            gc.freeze()  # long-lived objects (clients, pools) leave the collector's scans
            assert self._pool is not None
            jobs = [asyncio.create_task(job(self._pool, self.metrics)) for job in self._background]
            for task in jobs:
                task.add_done_callback(self._background_ended)
            try:
                await self._poll_until_stopped()
            finally:
                await self._shutdown()
                for task in jobs:
                    task.cancel()
                await asyncio.gather(*jobs, return_exceptions=True)
        log.info("worker stopped", extra={"exit_code": self.exit_code})
        return self.exit_code

    async def _start(self, stack: AsyncExitStack) -> bool:
        """Connect to every dependency, retrying while they are unavailable. False when told to
        stop meanwhile, or when one fails permanently (wrong password, missing database...)."""
        try:
            return await self._connect(stack)
        except Stopped:
            return False
        except PermanentError as exc:
            self._stop_fatally(exc)
            return False

    async def _connect(self, stack: AsyncExitStack) -> bool:
        s = self.settings
        self._pool = await self._until_stopped("connect_postgres", "postgres", lambda: clients.create_pool(s))
        stack.push_async_callback(clients.close_pool, self._pool)
        s3 = await stack.enter_async_context(s3_client(s))
        producer = clients.dead_letter_producer(s)
        await self._until_stopped("connect_kafka_producer", "kafka", producer.start)
        stack.push_async_callback(clients.bounded_stop, "producer", producer.stop)
        objects = clients.routed_objects(s, s3, stack)
        pool = self._pool
        await self._until_stopped(
            "load_bucket_routes", "postgres", lambda: clients.load_bucket_routes(objects, pool, stack)
        )
        self._ctx = self._flush_context(self._pool, objects, producer)
        self._flushes = FlushPipeline(self._ctx, depth=self.settings.flush_pipeline_depth)

        consumer = clients.input_consumer(s)
        consumer.subscribe([s.topic], listener=_Listener(self))
        await self._until_stopped("connect_kafka_consumer", "kafka", consumer.start)
        self._consumer = consumer
        stack.push_async_callback(clients.bounded_stop, "consumer", consumer.stop)
        return True

    def _flush_context(self, pool: asyncpg.Pool, objects: ObjectWriter, producer: Any) -> FlushContext:
        s = self.settings
        return FlushContext(
            topic=s.topic,
            index=PostgresIndexStore(
                pool,
                s.consumer_group,
                s.topic,
                extensions=self._extensions,
                ensure_partitions=self._ensure_partitions,
                horizon=self._horizon,
            ),
            objects=objects,
            dead_letters=DeadLetterWriter(
                producer, s.dlq_topic, s.topic, objects, s.dlq_max_record_bytes, s.dlq_object_prefix
            ),
            metrics=self.metrics,
            policy=ValidationPolicy(
                max_age=timedelta(days=s.max_event_age_days),
                max_future_skew=timedelta(seconds=s.max_future_skew_s),
            ),
            member_bytes=s.gzip_member_bytes,
            gzip_level=s.gzip_level,
            retry=self._retry,
            dlq_limit=DeadLetterLimit(s.dlq_max_ratio, s.dlq_min_window),
            commit_kafka=self._commit_kafka,
        )

    async def _until_stopped(self, operation: str, dependency: str, call: Callable[[], Awaitable[T]]) -> T:
        """A start-up call, retried while its dependency is unavailable; Stopped if told to stop."""
        if self._stop.is_set():
            raise Stopped(operation)
        return await self._retry.call(operation, dependency, call, stop=self._stop)

    async def _shutdown(self) -> None:
        """Finish (or abandon) the flushes in flight, in order, and then the open batch, all within
        the grace period."""
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        await self._finish_flushes(deadline - time.monotonic())
        flushes = self._flushes
        if len(self._buffer) and not self._ready.stopped_by_error and self._consumer is not None:
            remaining = deadline - time.monotonic()
            if remaining > 0 and flushes is not None:
                flushes.start(self._buffer.take())
                await self._finish_flushes(remaining)
        log.info("drained", extra={"abandoned_messages": len(self._buffer)})

    async def _finish_flushes(self, budget_s: float) -> None:
        """Let the flushes in flight end in order within `budget_s` (abandoning what cannot), and
        act on each outcome."""
        if self._flushes is None:
            return
        for flight in await self._flushes.settle(budget_s):
            await self._reap(flight)

    # ---- the poll loop -----------------------------------------------------------------------

    async def _poll_until_stopped(self) -> None:
        """The poll loop, ended by `request_stop`. A stop must end it even when one of its awaits
        never returns (seen once in CI: a worker silent after a rebalance ignored SIGTERM): after
        POLL_STOP_TIMEOUT_S it is cancelled, its stack logged, and the shutdown goes on."""
        poll = asyncio.create_task(self._poll_loop(), name="omnilog-poll")
        stopped = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({poll, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not poll.done():
                await asyncio.wait({poll}, timeout=POLL_STOP_TIMEOUT_S)
            if not poll.done():
                stack = io.StringIO()
                poll.print_stack(file=stack)
                log.error("poll loop did not stop; cancelling it", extra={"stack": stack.getvalue()})
                poll.cancel()
                await asyncio.wait({poll}, timeout=POLL_STOP_TIMEOUT_S)
                return
            poll.result()  # a poll loop that ended by itself raised: let it stop the worker
        finally:
            stopped.cancel()

    async def _poll_loop(self) -> None:
        consumer, flushes = self._consumer, self._flushes
        assert consumer is not None and flushes is not None
        while not self._stop.is_set():
            self._loop_progress = time.monotonic()
            self._apply_backpressure(consumer, flushes)
            if len(flushes) and consumer.paused():
                # Paused behind running flushes: wake when one ends or finishes preparing, not after
                # a whole poll timeout (that idled ~100 ms per batch while draining a backlog; see
                # docs/performance.md).
                await flushes.wait(0.1)
            else:
                self._add(await self._fetch(consumer))
            await self._reap_finished(flushes)
            if flushes.has_room() and self._ready.dlq_tripped is None and self._buffer.due():
                flushes.start(self._buffer.take())
            self._update_lag(consumer)

    def _add(self, records: dict[TopicPartition, list[Any]]) -> None:
        # A function of its own: the fetched records (aiokafka's objects, one per event) are let go
        # once buffered, not held through the loop's next awaits.
        for tp, fetched in records.items():
            self.metrics.events_consumed.inc(self._buffer.add(tp.partition, fetched))

    async def _fetch(self, consumer: AIOKafkaConsumer) -> dict[TopicPartition, list[Any]]:
        """getmany, except when a fetch position no longer fits its log (OFFSET_OUT_OF_RANGE, or a
        high watermark below where the worker is): then the flushes in flight are finished in order
        (or abandoned at OMNILOG_REBALANCE_DRAIN_S), and every owned partition restarts from its
        stored offset, fitted to its log by OMNILOG_OFFSET_OUT_OF_RANGE
        (consumers/ingest/offset_guard.py)."""
        try:
            # No more than the open batch has room for: a batch never outgrows
            # OMNILOG_BATCH_MAX_EVENTS (a fetch of a whole batch's worth onto a nearly full buffer
            # made batches of up to ~1.2x that, and a worker's memory grows with its batches). What
            # is not taken now stays in aiokafka's fetch buffer, as received.
            room = max(1, self.settings.batch_max_events - len(self._buffer))
            records: dict[TopicPartition, list[Any]] = await consumer.getmany(
                timeout_ms=100, max_records=room
            )
        except NoOffsetForPartitionError:
            # aiokafka fetches newly assigned partitions before on_assigned has sought them; the
            # seek that follows replaces this position.
            return {}
        except OffsetOutOfRangeError as exc:
            positions = self._buffer.positions  # as sought by now (a seek replaces the dict)
            refused = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
            ours = [tp.partition for tp in refused if tp.topic == self.topic and tp.partition in positions]
            if refused and not ours:
                return {}  # a position aiokafka took before on_assigned sought the partition
            log.warning("fetch position outside the log", extra={"partitions": ours or sorted(positions)})
            self._offset_guard.note_refused(ours or positions)
        else:
            if not self._offset_guard.past_end_suspected(consumer, self._buffer.positions):
                return records
            log.warning("high watermark below the worker's position: checking the log's bounds")
        if not self._stop.is_set():
            # Records just fetched are dropped with the buffer: they are re-read from the stored offsets.
            await self._finish_flushes(self.settings.rebalance_drain_s)
            await self._reset_positions()
        return {}

    def _apply_backpressure(self, consumer: AIOKafkaConsumer, flushes: FlushPipeline) -> None:
        held = self._buffer.size_bytes + flushes.size_bytes  # both batches in flight count
        self.metrics.inflight_bytes.set(held)
        pause = (
            self._ready.dlq_tripped is not None
            or (self._buffer.full() and not flushes.has_room())
            or held >= self.settings.max_inflight_bytes
        )
        assigned = consumer.assignment()
        if pause:
            consumer.pause(*assigned)
        elif consumer.paused():
            consumer.resume(*consumer.paused())

    async def _reap_finished(self, flushes: FlushPipeline) -> None:
        # A function of its own: no loop variable keeps the last report (a whole batch of events)
        # alive while the next batches are in flight.
        for flight in await flushes.take_finished():
            await self._reap(flight)

    async def _reap(self, flight: InFlight) -> None:
        """Act on one ended flush; called in batch order."""
        task, batch = flight.task, flight.batch
        # Abandoned at a drain deadline, or discarded behind a batch that failed (that one is acted
        # on): nothing was committed, and flush.py counted the orphaned uploads.
        if task.cancelled() or isinstance(task.exception(), Discarded):
            return
        exc = task.exception()
        if exc is None:
            for r in batch.ranges:
                self._committed[r.partition] = r.end
            record_batch(self.metrics, batch, task.result())
        elif isinstance(exc, Fenced):
            self.metrics.fenced_batches.inc()
            log.warning(
                "batch fenced: another owner moved the offsets; re-reading from Postgres",
                extra={"partitions": exc.partitions},
            )
            await self._reset_positions()
        elif isinstance(exc, DeadLetterLimitExceeded):
            self._ready.dlq_tripped = str(exc)
            self._ready.refresh()
            self.metrics.dlq_limit_tripped.set(1)
            log.error("dead-letter limit exceeded", extra={"reason": str(exc)})
        else:
            # A permanent error no single message explains (a bug, a missing table, a bucket that
            # is gone): retrying would loop forever in silence, so the worker stops loudly instead.
            self._stop_fatally(exc)

    def _stop_fatally(self, exc: BaseException) -> None:
        operation = exc.operation if isinstance(exc, PermanentError) else "flush"
        self._ready.fatal = f"stopped by a permanent error in {operation}: {type(exc).__name__}: {exc}"
        self._ready.refresh()
        self.metrics.fatal_errors.labels(operation).inc()
        self.exit_code = 1
        log.error("permanent error: stopping the worker", exc_info=exc, extra={"operation": operation})
        self.request_stop()

    def _background_ended(self, task: asyncio.Task[None]) -> None:
        """A background job (the merger) ends only when cancelled at shutdown, or on a permanent
        error: then the worker stops too, rather than ingest on with stale aggregates unnoticed."""
        if task.cancelled() or self._stop.is_set():
            return
        exc = task.exception()
        self._stop_fatally(exc if exc is not None else RuntimeError("background job returned"))

    async def _commit_kafka(self, batch: Batch) -> None:
        """The flush's last step: Kafka's committed offsets follow PostgreSQL's, for lag tools.
        Advisory: a failure is logged, never raised (PostgreSQL is the source of truth)."""
        consumer = self._consumer
        if consumer is None:
            return
        owned = consumer.assignment()
        offsets = {
            tp: r.end for r in batch.ranges if (tp := TopicPartition(self.topic, r.partition)) in owned
        }
        if offsets:
            try:
                await consumer.commit(offsets)
            except Exception as exc:  # noqa: BLE001 - Postgres is the source of truth; lag tools lag
                log.warning("kafka offset commit failed", extra={"error": f"{type(exc).__name__}: {exc}"})

    def _update_lag(self, consumer: AIOKafkaConsumer) -> None:
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            committed = self._committed.get(tp.partition)
            if high is not None and committed is not None:
                # Never negative (Vector #21134): the broker's watermark may trail our commit briefly.
                self.metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(max(0, high - committed))

    # ---- rebalance -----------------------------------------------------------------------------

    async def on_revoked(self, partitions: list[int]) -> None:
        t0 = time.monotonic()
        await self._finish_flushes(self.settings.rebalance_drain_s)
        self._buffer.revoke(partitions)
        for p in partitions:
            self._committed.pop(p, None)
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(self.topic, str(p))
        log.info(
            "partitions revoked", extra={"partitions": partitions, "drain_s": round(time.monotonic() - t0, 3)}
        )

    async def on_assigned(self, partitions: list[int]) -> None:
        try:
            positions = await self._load_positions(partitions, create=True)
        except PermanentError as exc:
            self._stop_fatally(exc)
            return
        self._seek(positions)
        self._ready.assigned_once = True
        self._ready.refresh()
        log.info("partitions assigned", extra={"positions": positions})

    async def _reset_positions(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        owned = [tp.partition for tp in consumer.assignment() if tp.topic == self.topic]
        try:
            positions = await self._load_positions(owned, create=False)
        except PermanentError as exc:
            self._stop_fatally(exc)
            return
        self._seek(positions)

    def _seek(self, positions: dict[int, int]) -> None:
        """Drop everything buffered and restart the given partitions at their stored offsets."""
        self._buffer.reset({**self._buffer.positions, **positions})
        self._committed.update(positions)
        if self._consumer is not None:
            for p, offset in positions.items():
                self._consumer.seek(TopicPartition(self.topic, p), offset)
            self._offset_guard.note_seek(positions)

    async def _load_positions(self, partitions: list[int], create: bool) -> dict[int, int]:
        """Stored offsets from Postgres; partitions never seen start at Kafka's committed offset,
        else the earliest. Retries until Postgres answers: a worker never guesses a position."""
        if not partitions:
            return {}
        pool = self._pool
        assert pool is not None

        async def attempt() -> dict[int, int]:
            async with pool.acquire() as conn:
                stored = await load_offsets(conn, self.settings.consumer_group, self.topic, partitions)
                missing = [p for p in partitions if p not in stored]
                if missing and create:
                    starts = await self._fallback_offsets(missing)
                    stored.update(await init_offsets(conn, self.settings.consumer_group, self.topic, starts))
                return stored

        stored = await self._retry.call("load_offsets", "postgres", attempt)
        consumer = self._consumer
        assert consumer is not None
        return await self._offset_guard.fit(consumer, pool, stored)

    async def _fallback_offsets(self, partitions: list[int]) -> dict[int, int]:
        consumer = self._consumer
        assert consumer is not None
        tps = [TopicPartition(self.topic, p) for p in partitions]
        starts: dict[int, int] = {}
        earliest = await consumer.beginning_offsets(tps)
        for tp in tps:
            committed = await consumer.committed(tp)
            starts[tp.partition] = committed if committed is not None else earliest[tp]
        return starts

    # ---- health ---------------------------------------------------------------------------------

    def _readiness(self) -> tuple[bool, str]:
        return self._ready.state()
