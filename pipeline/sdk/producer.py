"""The producer SDK: how a gateway service emits gateway request events (docs/contract.md §1) to Kafka.

    async with EventProducer("kafka:9092", "gateway.requests.v1") as producer:
        await producer.emit(GatewayRequestEvent(organization_id=org, started_at=t0, duration_ms=12))

Contract of the buffer: an event is *in flight* from the moment `emit`/`emit_nowait` accepts it
until the broker acknowledges it or its delivery fails. In-flight events are bounded by count and
by encoded bytes. When the bound is reached, `emit` waits (backpressure: a slow or absent broker
slows the caller instead of growing memory without limit) and `emit_nowait` drops the event and
counts it (for callers that must never wait, e.g. a request path with a latency budget).

Every accepted event ends in exactly one counter: `delivered` or `failed`. A failure also calls
`on_delivery_failure` with the message bytes (so a caller may spool them) and is logged; nothing is
lost silently. `close()` flushes: it returns once every accepted event is delivered or failed (or
its timeout passes, and then the rest are counted as failed).

Idempotent producing (`idempotence="auto"`, the default) asks the broker for a producer id so retries
cannot duplicate a message. A broker that cannot do that (the local Tansu broker has no
InitProducerId; old brokers; missing IdempotentWrite ACL) is detected at start: one warning, and the
producer restarts without idempotence. Duplicates are harmless downstream anyway: the ingest worker
deduplicates on `event_id`. `idempotence="on"` makes that failure fatal instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal, Self

import aiokafka.errors as kafka_errors
import orjson
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry, Counter, Gauge

from pipeline.sdk.event_builder import GatewayRequestEvent
from pipeline.sdk.redaction import RedactionConfig

__all__ = [
    "DeliveryFailure",
    "EventProducer",
    "ProducerClosedError",
    "ProducerStats",
    "message_key",
]

log = logging.getLogger(__name__)

Compression = Literal["gzip", "none"]
Idempotence = Literal["auto", "on", "off"]

# Answers to InitProducerId that mean "this broker cannot give this client a producer id".
# Connection errors are not among them: a broker that is down must fail start, not degrade it.
_NO_IDEMPOTENCE_ERRORS: Final = (
    kafka_errors.UnknownError,  # Tansu 0.6: InitProducerId unimplemented
    kafka_errors.UnsupportedVersionError,
    kafka_errors.IncompatibleBrokerVersion,
    kafka_errors.ClusterAuthorizationFailedError,  # no IdempotentWrite permission
)

_DEFAULT_REDACTION: Final = RedactionConfig()


class ProducerClosedError(RuntimeError):
    """`emit` on a producer that is not started, or is closing."""


@dataclass(frozen=True, slots=True)
class DeliveryFailure:
    """A message the broker did not acknowledge: its bytes and why."""

    key: bytes | None
    value: bytes
    error: BaseException


DeliveryCallback = Callable[[DeliveryFailure], None]


@dataclass(slots=True)
class ProducerStats:
    """Counters of one producer. `accepted == delivered + failed + in_flight` at all times."""

    accepted: int = 0
    delivered: int = 0
    failed: int = 0
    dropped: int = 0  # refused by emit_nowait because the buffer was full (never accepted)
    in_flight: int = 0
    in_flight_bytes: int = 0


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        events = Counter(
            "omnilog_producer_events_total",
            "Events by outcome: delivered, failed (not acknowledged), dropped (buffer full)",
            ["outcome"],
            registry=registry,
        )
        self.delivered = events.labels("delivered")
        self.failed = events.labels("failed")
        self.dropped = events.labels("dropped")
        self.in_flight = Gauge(
            "omnilog_producer_inflight_events", "Accepted events not yet acknowledged", registry=registry
        )
        self.in_flight_bytes = Gauge(
            "omnilog_producer_inflight_bytes",
            "Encoded bytes of accepted events not yet acknowledged",
            registry=registry,
        )


class _DropInitProducerIdError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "InitProducerIdRequest" not in record.getMessage()


@contextlib.contextmanager
def _quiet_init_producer_id_error() -> Iterator[None]:
    # aiokafka logs an ERROR before raising; we log one WARNING saying what we do about it instead.
    sender_log = logging.getLogger("aiokafka.producer.sender")
    quiet = _DropInitProducerIdError()
    sender_log.addFilter(quiet)
    try:
        yield
    finally:
        sender_log.removeFilter(quiet)


def message_key(organization_id: str, server_id: str | None) -> bytes:
    """`<organization_id>:<server_id or _>`: a partition-affinity hint (docs/contract.md §2)."""
    return f"{organization_id}:{server_id or '_'}".encode()


class EventProducer:
    """An asyncio Kafka producer of gateway request events with a bounded in-flight buffer."""

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        *,
        redaction: RedactionConfig | None = _DEFAULT_REDACTION,
        compression: Compression = "gzip",
        linger_ms: int = 20,
        max_batch_bytes: int = 256 * 1024,
        max_request_bytes: int = 1024 * 1024,
        max_in_flight_events: int = 20_000,
        max_in_flight_bytes: int = 32 * 1024 * 1024,
        idempotence: Idempotence = "auto",
        acks: Literal["all", 1] = "all",
        request_timeout_ms: int = 30_000,
        client_id: str = "omnilog-producer",
        on_delivery_failure: DeliveryCallback | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if max_in_flight_events < 1 or max_in_flight_bytes < 1:
            raise ValueError("in-flight bounds must be positive")
        if idempotence != "off" and acks != "all":
            raise ValueError('idempotent producing needs acks="all"; pass idempotence="off" for acks=1')
        self.topic = topic
        self.redaction = redaction
        self.stats = ProducerStats()
        self.idempotent = False  # set by start(): whether the broker granted a producer id
        self._bootstrap_servers = bootstrap_servers
        self._idempotence: Idempotence = idempotence
        self._max_events = max_in_flight_events
        self._max_bytes = max_in_flight_bytes
        self._on_failure = on_delivery_failure
        self._metrics = _Metrics(registry) if registry is not None else None
        self._kafka_options: dict[str, Any] = {
            "bootstrap_servers": bootstrap_servers,
            "client_id": client_id,
            "acks": acks,
            "compression_type": None if compression == "none" else compression,
            "linger_ms": linger_ms,
            "max_batch_size": max_batch_bytes,
            "max_request_size": max_request_bytes,
            "request_timeout_ms": request_timeout_ms,
        }
        self._kafka: AIOKafkaProducer | None = None
        self._pending: deque[tuple[bytes | None, bytes]] = deque()
        self._pending_ready = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._all_done = asyncio.Event()
        self._all_done.set()
        self._pump: asyncio.Task[None] | None = None
        self._closing = False
        self._last_failure_log = 0.0

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (and obtain a producer id when idempotent). Raises if the broker is unreachable."""
        if self._kafka is not None:
            raise RuntimeError("EventProducer already started")
        if self._idempotence == "off":
            self._kafka = await self._start_kafka(idempotent=False)
        else:
            try:
                with _quiet_init_producer_id_error():
                    self._kafka = await self._start_kafka(idempotent=True)
                self.idempotent = True
            except _NO_IDEMPOTENCE_ERRORS as exc:
                if self._idempotence == "on":
                    raise
                log.warning(
                    "broker %s cannot grant a producer id (%s): producing WITHOUT idempotence; a retried "
                    "send may duplicate a message (the ingest worker deduplicates on event_id)",
                    self._bootstrap_servers,
                    type(exc).__name__,
                )
                self._kafka = await self._start_kafka(idempotent=False)
        self._pump = asyncio.create_task(self._pump_loop(), name="omnilog-producer-pump")

    async def _start_kafka(self, *, idempotent: bool) -> AIOKafkaProducer:
        kafka = AIOKafkaProducer(enable_idempotence=idempotent, **self._kafka_options)
        try:
            await kafka.start()
        except BaseException:
            await kafka.stop()
            raise
        return kafka

    async def flush(self) -> None:
        """Wait until every event accepted so far is delivered or failed."""
        await self._all_done.wait()

    async def close(self, grace_s: float | None = 60.0) -> None:
        """Flush, then disconnect. After `grace_s` seconds, events still in flight count as failed."""
        if self._kafka is None or self._closing:
            return
        self._closing = True
        self._pending_ready.set()
        self._space.set()  # wake blocked emitters: they raise ProducerClosedError
        kafka = self._kafka
        try:
            await asyncio.wait_for(self._drain_and_stop(kafka), grace_s)
            return
        except TimeoutError:
            pass
        log.error("producer close: %d events still in flight after %ss", self.stats.in_flight, grace_s)
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.wait({self._pump})
        await self._abandon(kafka)

    async def _drain_and_stop(self, kafka: AIOKafkaProducer) -> None:
        if self._pump is not None:
            await self._pump  # the pump exits once the pending queue is empty
        await kafka.flush()
        await self._all_done.wait()
        await kafka.stop()

    async def _abandon(self, kafka: AIOKafkaProducer) -> None:
        error = kafka_errors.KafkaTimeoutError("producer closed before the broker acknowledged")
        while self._pending:
            key, value = self._pending.popleft()
            self._settle(key, value, error)
        # Stopping fails the accumulator's remaining batches; their callbacks count them failed.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(kafka.stop(), 5.0)
        if self.stats.in_flight:
            log.error("producer close: %d events never settled; counted as failed", self.stats.in_flight)
            self.stats.failed += self.stats.in_flight
            if self._metrics is not None:
                self._metrics.failed.inc(self.stats.in_flight)
            self.stats.in_flight = 0
            self.stats.in_flight_bytes = 0
            self._all_done.set()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- emitting --------------------------------------------------------------------------------

    def encode(self, event: GatewayRequestEvent | Mapping[str, Any]) -> tuple[bytes, bytes]:
        """(key, value) of an event after redaction: what `emit` would send."""
        obj = event.to_dict() if isinstance(event, GatewayRequestEvent) else dict(event)
        if self.redaction is not None:
            obj = self.redaction.redact(obj)
        server_id = obj.get("server_id")
        key = message_key(str(obj.get("organization_id")), server_id if isinstance(server_id, str) else None)
        return key, orjson.dumps(obj)

    async def emit(self, event: GatewayRequestEvent | Mapping[str, Any]) -> None:
        """Accept one event, waiting while the in-flight buffer is full."""
        key, value = self.encode(event)
        await self.emit_raw(key, value)

    def emit_nowait(self, event: GatewayRequestEvent | Mapping[str, Any]) -> bool:
        """Accept one event if the buffer has room; otherwise drop it, count it, return False."""
        key, value = self.encode(event)
        return self.emit_raw_nowait(key, value)

    async def emit_raw(self, key: bytes | None, value: bytes) -> None:
        """`emit` for bytes already encoded (and redacted) by the caller, e.g. the load generator."""
        while not self._has_room(len(value)):
            self._check_open()
            self._space.clear()
            await self._space.wait()
        self._check_open()
        self._accept(key, value)

    def emit_raw_nowait(self, key: bytes | None, value: bytes) -> bool:
        self._check_open()
        if not self._has_room(len(value)):
            self.stats.dropped += 1
            if self._metrics is not None:
                self._metrics.dropped.inc()
            return False
        self._accept(key, value)
        return True

    def _check_open(self) -> None:
        if self._kafka is None or self._closing:
            raise ProducerClosedError("EventProducer is not started or is closing")
        pump = self._pump
        if pump is not None and pump.done():
            # Accepting more would only fill the buffer for nobody: say why the send loop ended.
            cause = None if pump.cancelled() else pump.exception()
            raise ProducerClosedError("the producer's send loop has stopped") from cause

    def _has_room(self, size: int) -> bool:
        stats = self.stats
        if stats.in_flight == 0:
            return True  # one event larger than the byte bound must still be able to go
        return stats.in_flight < self._max_events and stats.in_flight_bytes + size <= self._max_bytes

    def _accept(self, key: bytes | None, value: bytes) -> None:
        stats = self.stats
        stats.accepted += 1
        stats.in_flight += 1
        stats.in_flight_bytes += len(value)
        self._all_done.clear()
        self._pending.append((key, value))
        self._pending_ready.set()

    # -- delivery --------------------------------------------------------------------------------

    async def _pump_loop(self) -> None:
        # One task hands messages to aiokafka in acceptance order, so emit_nowait needs no task of
        # its own and per-key order is preserved.
        kafka = self._kafka
        assert kafka is not None
        pending = self._pending
        while True:
            if not pending:
                if self._closing:
                    return
                self._pending_ready.clear()
                await self._pending_ready.wait()
                continue
            key, value = pending.popleft()
            try:
                future = await kafka.send(self.topic, value=value, key=key)
            except asyncio.CancelledError:
                pending.appendleft((key, value))
                raise
            except kafka_errors.KafkaError as exc:
                self._settle(key, value, exc)
                continue
            future.add_done_callback(lambda f, k=key, v=value: self._on_done(f, k, v))

    def _on_done(self, future: asyncio.Future[Any], key: bytes | None, value: bytes) -> None:
        if future.cancelled():
            self._settle(key, value, asyncio.CancelledError("delivery cancelled"))
        else:
            self._settle(key, value, future.exception())

    def _settle(self, key: bytes | None, value: bytes, error: BaseException | None) -> None:
        stats = self.stats
        stats.in_flight -= 1
        stats.in_flight_bytes -= len(value)
        if error is None:
            stats.delivered += 1
            if self._metrics is not None:
                self._metrics.delivered.inc()
        else:
            stats.failed += 1
            if self._metrics is not None:
                self._metrics.failed.inc()
            self._report_failure(DeliveryFailure(key, value, error))
        if self._metrics is not None:
            self._metrics.in_flight.set(stats.in_flight)
            self._metrics.in_flight_bytes.set(stats.in_flight_bytes)
        if not self._space.is_set() and self._has_room(0):
            self._space.set()
        if stats.in_flight == 0:
            self._all_done.set()

    def _report_failure(self, failure: DeliveryFailure) -> None:
        now = time.monotonic()
        if now - self._last_failure_log >= 5.0:  # one line per 5 s, not one per message
            self._last_failure_log = now
            log.error(
                "delivery to %s failed: %r (%d failed so far)", self.topic, failure.error, self.stats.failed
            )
        if self._on_failure is not None:
            try:
                self._on_failure(failure)
            except Exception:
                log.exception("on_delivery_failure callback raised")
