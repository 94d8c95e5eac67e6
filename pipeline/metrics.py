"""The worker's Prometheus metrics: every name the dashboards and alert rules may query.

Names carry their unit (`_seconds`, `_bytes`, `_total`). Labels are bounded: `reason` is one of the
validation reasons, `stage` one of FLUSH_STAGES, `partition` is bounded by the topic's partition count.
A registry is passed in so tests can hold several workers in one process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

FLUSH_STAGES: Final = ("decode", "encode", "upload", "dlq", "postgres", "kafka_commit")

_LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_FRESHNESS_BUCKETS: Final = (
    0.5,
    1.0,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    15.0,
    30.0,
    60.0,
    120.0,
    300.0,
    900.0,
    3600.0,
)
# Signed seconds, started_at minus the Kafka record timestamp: below zero is normal (the gateway's
# buffering and send time, late events); above zero the gateway's clock is ahead of Kafka's.
_CLOCK_SKEW_BUCKETS: Final = (
    -86400.0,
    -3600.0,
    -600.0,
    -300.0,
    -60.0,
    -10.0,
    -1.0,
    0.0,
    1.0,
    10.0,
    60.0,
    300.0,
    600.0,
    3600.0,
    86400.0,
)
_SIZE_BUCKETS: Final = tuple(float(2**k) for k in range(10, 28, 2))  # 1 KiB .. 128 MiB
_COUNT_BUCKETS: Final = (1, 10, 50, 100, 500, 1000, 2500, 5000, 10000, 25000, 50000)


def observe_many(histogram: Histogram, values: Sequence[float] | np.ndarray) -> None:
    """`histogram.observe(v)` for every value, as one count per bucket and one addition to the sum.

    Per batch rather than per event: observing 5 000 freshness values one by one walks the buckets
    and takes two locks per value. The bucket counts are those of `observe` (a value goes to the
    first bound >= it; NaN to none); the sum is the same up to float rounding (one `math.fsum`
    instead of one rounding per value). It reads prometheus_client's Histogram internals
    (`_upper_bounds`, `_buckets`, `_sum`, stable since 0.4): when they are missing it falls back
    to `observe` per value, and tests/unit/test_batch_report.py compares both on every release.
    """
    amounts = np.asarray(values, dtype=np.float64).ravel()
    if amounts.size == 0:
        return
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for amount in amounts.tolist():
            histogram.observe(amount)
        return
    histogram._raise_if_not_observable()  # type: ignore[no-untyped-call]  # a labelled parent raises
    # side="left": the first bound >= the value, as observe's `amount <= bound`; NaN sorts last.
    counts = np.bincount(np.searchsorted(np.asarray(bounds), amounts, side="left"), minlength=len(bounds) + 1)
    for bucket, count in zip(buckets, counts[: len(bounds)].tolist(), strict=True):
        if count:
            bucket.inc(count)
    total.inc(math.fsum(amounts.tolist()))


class WorkerMetrics:
    """All metrics of one ingest worker, registered in `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.events_consumed = Counter(
            "omnilog_events_consumed_total", "Kafka messages consumed from the input topic", registry=registry
        )
        self.events_indexed = Counter(
            "omnilog_events_indexed_total",
            "Events indexed in log_index for the first time",
            registry=registry,
        )
        self.events_duplicate = Counter(
            "omnilog_events_duplicate_total",
            "Valid events whose event_id was already indexed (counted, not re-indexed)",
            registry=registry,
        )
        self.events_dead_lettered = Counter(
            "omnilog_events_dead_lettered_total",
            "Invalid messages produced to the dead-letter topic, by reason",
            ["reason"],
            registry=registry,
        )
        self.objects_written = Counter(
            "omnilog_objects_written_total", "Objects uploaded to object storage", registry=registry
        )
        self.object_bytes_written = Counter(
            "omnilog_object_bytes_written_total",
            "Compressed bytes uploaded to object storage",
            registry=registry,
        )
        self.object_size_bytes = Histogram(
            "omnilog_object_size_bytes",
            "Size of each uploaded object",
            buckets=_SIZE_BUCKETS,
            registry=registry,
        )
        self.flush_stage_duration = Histogram(
            "omnilog_flush_stage_duration_seconds",
            "Time spent in each stage of a flush",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.flush_failures = Counter(
            "omnilog_flush_failures_total",
            "Flush attempts that failed at a stage (each is retried)",
            ["stage"],
            registry=registry,
        )
        self.batch_events = Histogram(
            "omnilog_batch_events", "Messages per flushed batch", buckets=_COUNT_BUCKETS, registry=registry
        )
        self.consumer_lag = Gauge(
            "omnilog_consumer_lag_messages",
            "High watermark minus next offset to process, per assigned partition (never negative)",
            ["topic", "partition"],
            registry=registry,
        )
        self.freshness = Histogram(
            "omnilog_freshness_seconds",
            "Postgres commit time minus the event's started_at",
            buckets=_FRESHNESS_BUCKETS,
            registry=registry,
        )
        self.clock_skew = Histogram(
            "omnilog_clock_skew_seconds",
            "An indexed event's started_at minus its Kafka record timestamp (a sample of each batch)",
            buckets=_CLOCK_SKEW_BUCKETS,
            registry=registry,
        )
        self.orphaned_uploads = Counter(
            "omnilog_orphaned_uploads_total",
            "Objects uploaded by a flush that then failed or was fenced (garbage for the janitor)",
            registry=registry,
        )
        self.fenced_batches = Counter(
            "omnilog_fenced_batches_total",
            "Batches dropped because the partition's stored offset moved (another owner)",
            registry=registry,
        )
        self.last_commit_timestamp = Gauge(
            "omnilog_last_commit_timestamp_seconds",
            "Unix time of the last successful Postgres commit of a batch",
            registry=registry,
        )
        self.inflight_bytes = Gauge(
            "omnilog_inflight_bytes",
            "Message bytes held by the worker and not yet committed",
            registry=registry,
        )
        self.ready = Gauge(
            "omnilog_worker_ready",
            "1 when the worker is consuming and its dependencies answer",
            registry=registry,
        )
        self.dependency_up = Gauge(
            "omnilog_dependency_up",
            "1 when the last call to the dependency succeeded",
            ["dependency"],
            registry=registry,
        )
        self.dlq_limit_tripped = Gauge(
            "omnilog_dlq_limit_tripped",
            "1 when the dead-letter limit stopped consumption",
            registry=registry,
        )
        self.aggregate_merge_duration = Histogram(
            "omnilog_aggregate_merge_duration_seconds",
            "Time of one merger pass folding parts into log_aggregates and usage rollups",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.aggregate_parts_merged = Counter(
            "omnilog_aggregate_parts_merged_total", "Aggregate parts folded by the merger", registry=registry
        )
        # One retry policy for the whole worker (pipeline/processing/retry.py): every operation that
        # retries a dependency counts its failed attempts here and says since when it has been failing.
        self.retry_attempts = Counter(
            "omnilog_retry_attempts_total",
            "Failed attempts of an operation that were retried (a retriable error), by operation",
            ["operation"],
            registry=registry,
        )
        self.retrying_since = Gauge(
            "omnilog_retrying_since_timestamp_seconds",
            "Unix time when the operation's current run of failed attempts began; 0 when it is not retrying",
            ["operation"],
            registry=registry,
        )
        self.fatal_errors = Counter(
            "omnilog_fatal_errors_total",
            "Permanent errors not caused by one message: the worker stopped (non-zero exit)",
            ["operation"],
            registry=registry,
        )
        self.dead_letters_offloaded = Counter(
            "omnilog_dead_letters_offloaded_total",
            "Dead letters too large for one Kafka record: the full value was stored in object storage",
            registry=registry,
        )
        self.aggregate_keys_isolated = Gauge(
            "omnilog_aggregate_keys_isolated",
            "Aggregate keys whose merge failed permanently and are held aside so the other keys go on",
            registry=registry,
        )
        self.aggregate_merge_failures = Counter(
            "omnilog_aggregate_merge_failures_total",
            "Merger failures by kind: retriable (the pass is retried) or key (one key isolated)",
            ["kind"],
            registry=registry,
        )
        self.offset_out_of_range = Counter(
            "omnilog_offset_out_of_range_total",
            "Stored offsets that did not fit the partition's log, by kind (before_start, past_end)",
            ["kind"],
            registry=registry,
        )
        self.offsets_lost = Counter(
            "omnilog_offsets_lost_total",
            "Records deleted from the log (Kafka retention) before this consumer group read them",
            registry=registry,
        )
