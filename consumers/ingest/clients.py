"""The worker's clients: how each is built and closed. Consumption logic lives elsewhere."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from pipeline.settings import Settings
from sinks.buckets import BucketRoute, RoutedObjects, check_route, keep_refreshed

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

log = logging.getLogger("omnilog.worker")
CLIENT_STOP_TIMEOUT_S = 5.0
# How often the worker re-reads organization_buckets: `omnilog buckets set` reaches new batches
# within this time.
BUCKET_ROUTES_REFRESH_S = 30.0
CHECK_TIMEOUT_S = 15.0  # a start-up check of one customer bucket


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


def routed_objects(settings: Settings, s3: S3Client, stack: AsyncExitStack) -> RoutedObjects:
    """The object store of the flush: the deployment's bucket plus the organizations' own
    (docs/storage.md), their clients closed with `stack`. Knows no route before
    `load_bucket_routes`."""
    objects = RoutedObjects(
        s3, settings.s3_bucket, settings.multipart_threshold_bytes, outage_s=settings.customer_bucket_outage_s
    )
    stack.push_async_callback(objects.aclose)
    return objects


async def load_bucket_routes(objects: RoutedObjects, pool: asyncpg.Pool, stack: AsyncExitStack) -> None:
    """Read the routes (before the first batch, so no organization's objects go to the wrong
    bucket; raises while PostgreSQL is unavailable: the caller retries), check each customer
    bucket once and refresh the routes in the background from then on.

    A broken customer bucket is logged, never fatal: its organization's uploads wait for it
    (docs/storage.md), everyone else's go on."""
    async with pool.acquire() as conn:
        await objects.refresh(conn)

    async def check(route: BucketRoute) -> None:
        try:
            await asyncio.wait_for(check_route(route), CHECK_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - one tenant's bucket never stops the worker
            log.warning("customer bucket not usable: %s: %s (%s)", type(exc).__name__, exc, route.describe())

    await asyncio.gather(*(check(r) for r in objects.routes() if not r.retired))
    refresher = asyncio.create_task(keep_refreshed(objects, pool.acquire, BUCKET_ROUTES_REFRESH_S))

    async def stop_refreshing() -> None:
        refresher.cancel()
        await asyncio.gather(refresher, return_exceptions=True)

    stack.push_async_callback(stop_refreshing)
