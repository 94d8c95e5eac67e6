"""The worker's clients: how each is built and closed. Consumption logic lives elsewhere."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from pipeline.settings import Settings

log = logging.getLogger("omnilog.worker")
CLIENT_STOP_TIMEOUT_S = 5.0


async def create_pool(settings: Settings) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        settings.database_url.get_secret_value(), min_size=1, max_size=4, command_timeout=60
    )


def dead_letter_producer(settings: Settings) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        acks="all",
        linger_ms=5,
        # Dead letters are at-least-once by contract; idempotence would need InitProducerId,
        # which the local broker lacks.
        enable_idempotence=False,
        compression_type=None if settings.dlq_compression == "none" else settings.dlq_compression,
        # Letters are cut to OMNILOG_DLQ_MAX_RECORD_BYTES; the request limit must let them through.
        max_request_size=settings.dlq_max_record_bytes + 64 * 1024,
    )


def input_consumer(settings: Settings) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        group_id=settings.consumer_group,
        enable_auto_commit=False,
        # Never jump silently: a position outside the log raises from getmany and is handled by
        # OMNILOG_OFFSET_OUT_OF_RANGE (the worker's _fetch, consumers/ingest/offset_guard.py).
        auto_offset_reset="none",
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=max(500, settings.kafka_session_timeout_ms // 5),
        max_partition_fetch_bytes=2 * 1024 * 1024,
        fetch_max_bytes=min(32 * 1024 * 1024, settings.max_inflight_bytes),
    )


async def bounded_stop(name: str, stop: Callable[[], Awaitable[None]]) -> None:
    """Close a Kafka client without letting it hold the exit: stuck in a group join, aiokafka's
    stop waits out its request timeout (40 s), past the pod's grace. Everything it could still do
    is already durable or will be redone by the next owner."""
    try:
        await asyncio.wait_for(stop(), CLIENT_STOP_TIMEOUT_S)
    except TimeoutError:
        log.warning("kafka client did not stop in time; exiting anyway", extra={"client": name})


async def close_pool(pool: asyncpg.Pool) -> None:
    try:
        await asyncio.wait_for(pool.close(), CLIENT_STOP_TIMEOUT_S)
    except TimeoutError:
        log.warning("postgres pool did not close in time; terminating its connections")
        pool.terminate()
