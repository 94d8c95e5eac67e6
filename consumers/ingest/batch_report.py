"""What a committed batch adds to the metrics and the log: per batch, never per event, except the
freshness histogram (one observation per new event, the figure the freshness target is set on)."""

from __future__ import annotations

import logging

from pipeline.metrics import WorkerMetrics
from pipeline.processing.batch import Batch
from pipeline.processing.flush import FlushReport

log = logging.getLogger("omnilog.worker")


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
    committed = outcome.committed_at
    freshness = m.freshness
    for event in outcome.new_events:
        freshness.observe((committed - event.started_at).total_seconds())
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
