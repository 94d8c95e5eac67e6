"""Builds a production ingest worker: the worker core plus the batch extensions and partition
maintenance that live in `sinks`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import date

from prometheus_client import CollectorRegistry

from consumers.ingest.worker import IngestWorker
from pipeline.processing.offsets import HorizonMoved
from pipeline.settings import Settings
from sinks.aggregates import build_extensions, build_merger
from sinks.db import Connection
from sinks.index import Horizon
from sinks.partitions import PartitionCache, PartitionExpired, ensure_day_partitions
from sinks.retention import load_horizon, lock_horizon

# Tables a batch inserts into, partitioned by the event's UTC day.
_DAY_PARTITIONED = ("log_index", "usage_events", "mcp_usage")


def partition_ensurer(cache: PartitionCache) -> Callable[[Connection, set[date]], Awaitable[None]]:
    """What a flush calls before its batch transaction: the batch's days exist afterwards, or
    `HorizonMoved` says maintain moved the retention horizon past some of them since the flush
    read it (nothing created for them): the flush then dead-letters those events as expired."""

    async def ensure_partitions(conn: Connection, days: set[date]) -> None:
        # Late events are normal: a missing day is created on demand (cheap when cached). The
        # horizon is re-read every time (one primary-key read), so the cache forgets the days
        # maintain has dropped since before it is consulted.
        cache.note_horizon(await load_horizon(conn))
        try:
            for table in _DAY_PARTITIONED:
                await ensure_day_partitions(conn, table, days, cache)
        except PartitionExpired as expired:
            raise HorizonMoved(expired.horizon) from expired

    return ensure_partitions


def build_worker(settings: Settings, registry: CollectorRegistry | None = None) -> IngestWorker:
    return IngestWorker(
        settings,
        registry=registry,
        extensions=build_extensions(settings.server_stats_window_s),
        ensure_partitions=partition_ensurer(PartitionCache()),
        # The in-process merger runs on its own thread (never on the ingest loop); off when
        # `omnilog merge` runs as its own process (OMNILOG_MERGER_IN_WORKER=false).
        background=[build_merger(settings)] if settings.merger_in_worker else [],
        horizon=Horizon(load=load_horizon, lock=lock_horizon),
    )
