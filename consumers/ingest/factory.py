"""Builds a production ingest worker: the worker core plus the batch extensions and partition
maintenance that live in `sinks`."""

from __future__ import annotations

from datetime import date

from prometheus_client import CollectorRegistry

from consumers.ingest.worker import IngestWorker
from pipeline.settings import Settings
from sinks.aggregates import build_extensions, build_merger
from sinks.db import Connection
from sinks.partitions import PartitionCache, ensure_day_partitions

# Tables a batch inserts into, partitioned by the event's UTC day.
_DAY_PARTITIONED = ("log_index", "usage_events", "mcp_usage")


def build_worker(settings: Settings, registry: CollectorRegistry | None = None) -> IngestWorker:
    cache = PartitionCache()

    async def ensure_partitions(conn: Connection, days: set[date]) -> None:
        # Late events are normal: a missing day is created on demand (cheap when cached).
        for table in _DAY_PARTITIONED:
            await ensure_day_partitions(conn, table, days, cache)

    return IngestWorker(
        settings,
        registry=registry,
        extensions=build_extensions(),
        ensure_partitions=ensure_partitions,
        background=[build_merger(settings)],
    )
