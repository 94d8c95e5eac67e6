"""What a committed batch adds to the metrics and the log: per batch, never per event. The freshness
histogram holds one observation per new event (the figure the freshness target is set on) and the
clock-skew histogram a bounded sample of each batch's new events; both are added to their buckets
once per batch (`observe_many`)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Final

import numpy as np
from prometheus_client import Histogram

from pipeline.contract import ValidEvent
from pipeline.metrics import WorkerMetrics, observe_many
from pipeline.processing.batch import Batch, Message
from pipeline.processing.flush import FlushReport

log = logging.getLogger("omnilog.worker")

# Skew observations per batch: evenly spaced over its new events. A drifting gateway shows in any
# fair sample; observing all 5 000 events of a batch would double the per-event metric work.
SKEW_SAMPLE: Final = 256
# |started_at - record timestamp| above this is logged with the gateway clients it came from
# (the alert's threshold, docs/operations.md "OmnilogClockSkew"); the metric has no client label.
SKEW_LOG_THRESHOLD_S: Final = 60.0


def observe_clock_skew(
    histogram: Histogram, sources: Mapping[str, Message], new_events: Sequence[ValidEvent]
) -> None:
    """Observe started_at minus the Kafka record timestamp for a sample of `new_events`.

    `sources` maps each event id to its record (the flush's own map): only the sample is looked up,
    and records without a timestamp are skipped.
    Clients whose events are ahead by more than SKEW_LOG_THRESHOLD_S are logged at WARNING, at most
    five per batch: the client id is unbounded, so it is a log field, never a metric label."""
    if not new_events:
        return
    step = max(1, len(new_events) // SKEW_SAMPLE)
    sample = new_events[::step][:SKEW_SAMPLE]
    ahead: Counter[str] = Counter()
    worst = 0.0
    skews: list[float] = []
    for event in sample:
        source = sources.get(event.event_id)
        if source is None or source.timestamp_ms < 0:
            continue
        stamp = source.timestamp_ms
        skew = event.started_at.timestamp() - stamp / 1000
        skews.append(skew)
        if skew > SKEW_LOG_THRESHOLD_S:
            ahead[event.client_id or "unknown"] += 1
            worst = max(worst, skew)
    observe_many(histogram, skews)
    if ahead:
        log.warning(
            "events started after Kafka received them: a gateway clock is ahead",
            extra={"clients": dict(ahead.most_common(5)), "max_skew_s": round(worst, 3)},
        )


def freshness_seconds(committed: datetime, events: Sequence[ValidEvent]) -> np.ndarray:
    """``(committed - started_at).total_seconds()`` of every event, vectorised and equal to it:
    both instants as whole microseconds (a float epoch times 1e6 is within 0.4 us of its integer
    for any date before 2255), the difference divided once, correctly rounded as timedelta's."""
    started_us = np.rint(np.array([e.started_at.timestamp() for e in events], dtype=np.float64) * 1e6)
    committed_us = round(committed.timestamp() * 1e6)
    return (committed_us - started_us.astype(np.int64)) / 1e6


def record_batch(metrics: WorkerMetrics, batch: Batch, report: FlushReport) -> None:
    m = metrics
    outcome = report.outcome
    duplicates = outcome.duplicates + report.in_batch_duplicates
    m.events_indexed.inc(len(outcome.new_events))
    m.events_duplicate.inc(duplicates)
    m.objects_written.inc(len(report.objects))
    m.object_bytes_written.inc(sum(report.objects))
    for size in report.objects:
        m.object_size_bytes.observe(size)
    for letter in report.letters:
        m.events_dead_lettered.labels(letter.reason).inc()
    m.batch_events.observe(report.messages)
    m.last_commit_timestamp.set(outcome.committed_at.timestamp())
    for stage, seconds in report.stage_seconds.items():
        m.flush_stage_duration.labels(stage).observe(seconds)
    observe_many(m.freshness, freshness_seconds(outcome.committed_at, outcome.new_events))
    observe_clock_skew(m.clock_skew, report.sources, outcome.new_events)
    log.info(
        "batch committed",
        extra={
            "ranges": [(r.partition, r.start, r.end) for r in batch.ranges],
            "messages": report.messages,
            "indexed": len(outcome.new_events),
            "duplicates": duplicates,
            "invalid": report.invalid,
            "objects": len(report.objects),
            "object_bytes": sum(report.objects),
            "stage_ms": {k: round(v * 1000, 1) for k, v in report.stage_seconds.items()},
        },
    )
