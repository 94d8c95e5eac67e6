"""The benchmark's input: load-generator traffic, as a pre-produced backlog or at a fixed rate."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from pipeline.devtools.loadgen.generator import LoadConfig, generate
from pipeline.devtools.loadgen.kafka import BatchSender

_STARTED_AT = b'"started_at":"'
_STAMP_LEN = len("2026-11-23T05:20:42.123Z")


# started_at spread over the last hour: a live stream's backlog (a 24 h spread, the generator's
# default for demos, multiplies the hourly aggregate keys every batch touches by ~24).
SPAN_HOURS = 1.0


def config(count: int, seed: int, span_hours: float = SPAN_HOURS) -> LoadConfig:
    """The load generator's defaults (10 orgs x 5 servers, Zipf bodies) over `span_hours`,
    only valid events: the benchmark measures the happy path's throughput."""
    return LoadConfig(count=count, seed=seed, span_hours=span_hours)


def values(count: int, seed: int, ordered: bool = False) -> list[bytes]:
    """The exact bytes a backlog of `config(count, seed)` puts on the topic; `ordered`: restamped
    in arrival order as `produce_backlog(ordered=True)` does, ending now."""
    raw = [m.value for m in generate(config(count, seed))]
    if not ordered:
        return raw
    end_ms = int(time.time() * 1000)
    return [in_arrival_order(v, i, count, end_ms, ORDER_JITTER_MS) for i, v in enumerate(raw)]


ORDERED, RANDOM = "ordered", "random"


def arrival(ordered: bool) -> str:
    """The name results use: "ordered" (a live stream's backlog, roughly in time order) or
    "random" (started_at and event ids spread at random over the span: the indexes' worst case).
    Results written before the field existed had random arrival."""
    return ORDERED if ordered else RANDOM


@dataclass(frozen=True)
class Produced:
    delivered: int
    seconds: float


_EVENT_ID = b'"event_id":"'
# How far an event may arrive out of its started_at order in an ordered backlog: producers on
# several gateway replicas, each sending as requests finish.
ORDER_JITTER_MS = 2_000


def in_arrival_order(value: bytes, position: int, count: int, end_ms: int, jitter_ms: int) -> bytes:
    """`value` restamped as the `position`-th of `count` events of a stream that ran for SPAN_HOURS
    until `end_ms`: started_at grows with the position (give or take `jitter_ms`), and the event_id's
    UUIDv7 time prefix follows it, as the gateway's SDK makes them (pipeline/sdk). Same length."""
    span_ms = int(SPAN_HOURS * 3_600_000)
    jitter = (hash((position, count)) % (2 * jitter_ms + 1)) - jitter_ms if jitter_ms else 0
    started_ms = min(end_ms, end_ms - span_ms + (position * span_ms) // max(count, 1) + jitter)
    return stamped_at(value, started_ms)


def stamped_at(value: bytes, started_ms: int) -> bytes:
    """`value` with started_at and the event_id's UUIDv7 time prefix set to `started_ms`, as the
    gateway's SDK makes them at the request (pipeline/sdk). Same length: a splice, no re-encode."""
    restamped = with_started_at(value, _stamp(datetime.fromtimestamp(started_ms / 1000, UTC)))
    at = restamped.index(_EVENT_ID) + len(_EVENT_ID)
    prefix = f"{started_ms:012x}".encode()  # the 48-bit millisecond time of a UUIDv7
    return restamped[:at] + prefix[:8] + b"-" + prefix[8:] + restamped[at + 13 :]


async def produce_backlog(
    bootstrap: str, topic: str, count: int, seed: int, ordered: bool = False
) -> Produced:
    """Send `config(count, seed)`'s messages as fast as the broker takes them.

    `ordered`: started_at (and the event_id's time) grow with the position in the backlog, as in a
    live stream that fell behind; otherwise they are spread at random over the span, so successive
    events land anywhere in the hour (the generator's default, and the harder case for the indexes).

    Streams: the generator yields one message at a time and the sender holds a bounded number of
    batches, so 5 M events take no more memory than 5 k. (`run_load` also builds the generator's
    oracle summary, which keeps a few facts per event: gigabytes for 5 M, and slower.)"""
    sender = BatchSender(bootstrap, topic)
    await sender.start()
    began = time.monotonic()
    end_ms = int(time.time() * 1000)
    try:
        for sent, message in enumerate(generate(config(count, seed)), start=1):
            value = message.value
            if ordered:
                value = in_arrival_order(value, sent - 1, count, end_ms, ORDER_JITTER_MS)
            await sender.send(message.key, value)
            if sent % 1024 == 0:
                await sender.flush_lingering()
    finally:
        await sender.close()
    if sender.failed or sender.delivered != count:
        raise RuntimeError(f"backlog: {sender.delivered}/{count} delivered, {sender.failed} failed")
    return Produced(sender.delivered, time.monotonic() - began)


def _stamp(moment: datetime) -> bytes:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.").encode() + f"{moment.microsecond // 1000:03d}Z".encode()


def with_started_at(value: bytes, stamp: bytes) -> bytes:
    """`value` with its started_at replaced by `stamp` (same length, so a splice, no re-encode)."""
    at = value.index(_STARTED_AT) + len(_STARTED_AT)
    return value[:at] + stamp + value[at + _STAMP_LEN :]


async def produce_at_rate(bootstrap: str, topic: str, rate: float, duration_s: float, seed: int) -> Produced:
    """Send `rate` events/s for `duration_s`, each stamped started_at = its send time (ms), its
    event_id's time too (a live stream: arrival order by nature).

    Sends in 10 ms ticks: every tick sends the events due by then, stamped with that tick's clock.
    """
    sender = BatchSender(bootstrap, topic, linger_s=0.005)
    await sender.start()
    source: Iterator[bytes] = (m.value for m in generate(LoadConfig(count=None, seed=seed)))
    began = time.monotonic()
    sent = 0
    try:
        while (elapsed := time.monotonic() - began) < duration_s:
            due = int(elapsed * rate) - sent
            if due > 0:
                now_ms = int(time.time() * 1000)
                for _ in range(due):
                    await sender.send(None, stamped_at(next(source), now_ms))
                sent += due
            await sender.flush_lingering()
            await asyncio.sleep(0.01)
    finally:
        await sender.close()
    if sender.failed:
        raise RuntimeError(f"rate producer: {sender.failed} of {sender.sent} failed")
    return Produced(sender.delivered, time.monotonic() - began)
