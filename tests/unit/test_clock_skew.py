"""The clock-skew histogram: started_at minus the Kafka record timestamp, matched per event by its
id, sampled, and clients ahead of Kafka logged (never a metric label)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from prometheus_client import CollectorRegistry

from consumers.ingest.batch_report import SKEW_SAMPLE, observe_clock_skew
from pipeline.contract import ValidationPolicy, ValidEvent, validate_event
from pipeline.metrics import WorkerMetrics
from pipeline.processing.batch import Message

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
POLICY = ValidationPolicy(timedelta(days=90), timedelta(hours=1))
CLIENT = "00000000-0000-0000-0000-00000000c11e"


def _record(i: int, skew_s: float, client: str | None = None) -> tuple[Message, ValidEvent]:
    started = NOW + timedelta(seconds=skew_s)
    body = {
        "event_id": f"00000000-0000-0000-0000-{i:012x}",
        "organization_id": "00000000-0000-0000-0000-0000000000aa",
        "started_at": started.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "duration_ms": 5,
        **({"client_id": client} if client else {}),
    }
    value = orjson.dumps(body)
    event = validate_event(value, NOW, POLICY)
    assert isinstance(event, ValidEvent), event
    return Message(0, i, value, len(value), None, int(NOW.timestamp() * 1000)), event


def _skew_samples(metrics: WorkerMetrics) -> dict[str, float]:
    return {
        s.name + str(s.labels.get("le", "")): s.value
        for metric in metrics.clock_skew.collect()
        for s in metric.samples
    }


def test_each_event_is_observed_against_its_own_record() -> None:
    metrics = WorkerMetrics(CollectorRegistry())
    pairs = [_record(1, -30.0), _record(2, 0.5), _record(3, 120.0)]
    # a record without a timestamp (skipped), and an event with no record (skipped)
    extra, extra_event = _record(4, 999.0)
    extra.timestamp_ms = -1
    _, unknown_event = _record(5, 999.0)
    sources = {e.event_id: m for m, e in pairs} | {extra_event.event_id: extra}
    observe_clock_skew(metrics.clock_skew, sources, [e for _, e in pairs] + [extra_event, unknown_event])
    samples = _skew_samples(metrics)
    assert samples["omnilog_clock_skew_seconds_count"] == 3
    # no _sum: OpenMetrics histograms with negative buckets do not expose one
    assert "omnilog_clock_skew_seconds_sum" not in samples
    assert samples["omnilog_clock_skew_seconds_bucket-60.0"] == 0
    assert samples["omnilog_clock_skew_seconds_bucket-10.0"] == 1
    assert samples["omnilog_clock_skew_seconds_bucket1.0"] == 2
    assert samples["omnilog_clock_skew_seconds_bucket300.0"] == 3


def test_a_large_batch_is_sampled_and_clients_ahead_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    metrics = WorkerMetrics(CollectorRegistry())
    pairs = [_record(i, 600.0 if i % 2 else -1.0, CLIENT if i % 2 else None) for i in range(2000)]
    with caplog.at_level(logging.WARNING, logger="omnilog.worker"):
        observe_clock_skew(metrics.clock_skew, {e.event_id: m for m, e in pairs}, [e for _, e in pairs])
    samples = _skew_samples(metrics)
    assert 0 < samples["omnilog_clock_skew_seconds_count"] <= SKEW_SAMPLE
    ahead = [r for r in caplog.records if "clock is ahead" in r.getMessage()]
    assert len(ahead) == 1 and set(ahead[0].__dict__["clients"]) == {CLIENT}


def test_no_new_events_observes_nothing() -> None:
    metrics = WorkerMetrics(CollectorRegistry())
    message, event = _record(1, 5.0)
    observe_clock_skew(metrics.clock_skew, {event.event_id: message}, [])
    assert _skew_samples(metrics)["omnilog_clock_skew_seconds_count"] == 0
