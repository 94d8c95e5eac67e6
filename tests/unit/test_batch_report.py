"""Per-batch metric work (consumers/ingest/batch_report.py, pipeline/metrics.py): the bulk
observations give the histograms exactly what one `observe` per value gives."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from consumers.ingest.batch_report import freshness_seconds
from pipeline.contract import ValidEvent
from pipeline.metrics import WorkerMetrics, observe_many

BOUNDS = (-60.0, -1.0, 0.0, 0.5, 1.0, 3.0, 3600.0)
amounts = st.lists(
    st.one_of(
        st.sampled_from(BOUNDS),  # exactly on a bound: counted in that bucket
        st.floats(-1e5, 1e5, allow_nan=False),
        st.just(math.inf),
    ),
    max_size=300,
)


def _samples(histogram: Histogram) -> dict[str, float]:
    return {s.name + s.labels.get("le", ""): s.value for m in histogram.collect() for s in m.samples}


def _pair() -> tuple[Histogram, Histogram]:
    return tuple(  # type: ignore[return-value]
        Histogram("h", "h", buckets=BOUNDS, registry=CollectorRegistry()) for _ in range(2)
    )


@settings(max_examples=200, deadline=None)
@given(amounts, amounts)
def test_observe_many_equals_observe_per_value(first: list[float], second: list[float]) -> None:
    one_by_one, bulk = _pair()
    for batch in (first, second):
        for value in batch:
            one_by_one.observe(value)
        observe_many(bulk, batch)
    expected, got = _samples(one_by_one), _samples(bulk)
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        if name.endswith("_sum"):
            assert got[name] == pytest.approx(value, rel=1e-12, abs=1e-9, nan_ok=True)
        elif not name.endswith("_created"):
            assert got[name] == value, name


def test_observe_many_counts_nan_in_no_bucket_as_observe() -> None:
    one_by_one, bulk = _pair()
    one_by_one.observe(math.nan)
    observe_many(bulk, [math.nan])
    assert {k: v for k, v in _samples(bulk).items() if "bucket" in k or "count" in k} == {
        k: v for k, v in _samples(one_by_one).items() if "bucket" in k or "count" in k
    }


def test_observe_many_refuses_a_labelled_parent_as_observe() -> None:
    labelled = Histogram("l", "l", ["stage"], buckets=BOUNDS, registry=CollectorRegistry())
    with pytest.raises(ValueError):
        labelled.observe(1.0)
    with pytest.raises(ValueError):
        observe_many(labelled, [1.0])


class _Timed:
    """The one field of an event `freshness_seconds` reads."""

    def __init__(self, started_at: datetime) -> None:
        self.started_at = started_at


instants = st.datetimes(datetime(2020, 1, 1), datetime(2100, 1, 1), timezones=st.just(UTC))
offsets = st.one_of(
    st.sampled_from([timedelta(0), timedelta(seconds=0.5), timedelta(seconds=3600), timedelta(seconds=-1)]),
    st.timedeltas(timedelta(days=-2), timedelta(days=100)),
)


@settings(max_examples=300, deadline=None)
@given(instants, st.lists(offsets, min_size=1, max_size=50))
def test_freshness_seconds_equal_timedelta_total_seconds(committed: datetime, ages: list[timedelta]) -> None:
    events = [_Timed(committed - age) for age in ages]
    got = freshness_seconds(committed, events)  # type: ignore[arg-type]
    assert got.tolist() == [(committed - e.started_at).total_seconds() for e in events]


def test_worker_histograms_expose_what_observe_would() -> None:
    # The real buckets of the freshness histogram, through the worker's metrics object.
    one_by_one, bulk = WorkerMetrics(CollectorRegistry()), WorkerMetrics(CollectorRegistry())
    values = [0.5, 0.75, 1.0, 2.5, 7.5, 900.0, 3600.0, 3600.5, 1e6]
    for value in values:
        one_by_one.freshness.observe(value)
    observe_many(bulk.freshness, values)
    assert _samples(bulk.freshness) | {"omnilog_freshness_seconds_created": 0} == _samples(
        one_by_one.freshness
    ) | {"omnilog_freshness_seconds_created": 0}


def test_a_batch_without_events_observes_nothing() -> None:
    metrics = WorkerMetrics(CollectorRegistry())
    observe_many(metrics.freshness, freshness_seconds(datetime.now(UTC), list[ValidEvent]()))
    assert _samples(metrics.freshness)["omnilog_freshness_seconds_count"] == 0
