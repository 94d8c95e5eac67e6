"""The sketch's pure-Python paths (small stores) and its batch builder agree with the numpy paths:
same bytes, same state, same errors."""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import sketch
from pipeline.sketch import (
    DEFAULT_ALPHA,
    INTEGER_SAFE_ALPHA,
    QuantileSketch,
    SketchDecodeError,
    grouped_sketches,
)

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
alphas = st.sampled_from((DEFAULT_ALPHA, INTEGER_SAFE_ALPHA, 0.05))
# Integer values as the contract's quantities, with zeros and far outliers (wide, mostly empty spans).
integers = st.lists(
    st.one_of(st.just(0), st.integers(1, 300), st.integers(0, 2**31 - 1)), min_size=1, max_size=120
)
floats = st.lists(
    st.one_of(st.just(0.0), st.floats(1e-6, 1e6), st.floats(1e-12, 1e-9)), min_size=1, max_size=80
)


def runs(draw: st.DrawFn, size: int) -> list[int]:
    cuts = draw(st.sets(st.integers(1, max(size - 1, 1)), max_size=size - 1)) if size > 1 else set()
    return [0, *sorted(c for c in cuts if c < size)]


@st.composite
def grouped_integers(draw: st.DrawFn) -> tuple[np.ndarray, list[int]]:
    values = np.array(draw(integers), dtype=np.float64)
    return values, runs(draw, values.size)


@st.composite
def grouped_floats(draw: st.DrawFn) -> tuple[np.ndarray, list[int]]:
    values = np.array(draw(floats), dtype=np.float64)
    return values, runs(draw, values.size)


def _runs_of(values: np.ndarray, starts: list[int]) -> list[np.ndarray]:
    bounds = [*starts, values.size]
    return [values[a:b] for a, b in pairwise(bounds)]


@FAST
@given(grouped_integers(), alphas)
def test_grouped_sketches_equal_one_by_one_on_integers(
    data: tuple[np.ndarray, list[int]], alpha: float
) -> None:
    values, starts = data
    built = grouped_sketches(values, starts, alpha)
    expected = [QuantileSketch.from_values(run, alpha) for run in _runs_of(values, starts)]
    assert built == expected
    assert [s.to_bytes() for s in built] == [s.to_bytes() for s in expected]
    for s, e in zip(built, expected, strict=True):
        assert s.quantiles((0.5, 0.95, 0.99)) == e.quantiles((0.5, 0.95, 0.99))


@FAST
@given(grouped_floats(), alphas)
def test_grouped_sketches_on_fractions_differ_at_most_in_the_sum_rounding(
    data: tuple[np.ndarray, list[int]], alpha: float
) -> None:
    # The runs are summed left to right, numpy's sum pairwise: both roundings of the exact sum.
    values, starts = data
    for s, run in zip(grouped_sketches(values, starts, alpha), _runs_of(values, starts), strict=True):
        e = QuantileSketch.from_values(run, alpha)
        assert math.isclose(s.sum, e.sum, rel_tol=1e-12, abs_tol=1e-300)
        assert (s.count, s.zero_count, s.min, s.max) == (e.count, e.zero_count, e.min, e.max)
        assert [a.tolist() for a in s.bins()] == [a.tolist() for a in e.bins()]


def test_grouped_sketches_fold_a_run_wider_than_max_bins_as_add_many() -> None:
    values = np.array([1e-6, 1e-3, 5.0, 1e12, 3.0, 1e15], dtype=np.float64)
    built = grouped_sketches(values, [0, 4], INTEGER_SAFE_ALPHA)
    assert built == [
        QuantileSketch.from_values(values[:4], INTEGER_SAFE_ALPHA),
        QuantileSketch.from_values(values[4:], INTEGER_SAFE_ALPHA),
    ]


@pytest.mark.parametrize(
    ("values", "starts", "message"),
    [
        ([1.0, -1.0], [0], "finite and >= 0"),
        ([1.0, math.nan], [0, 1], "finite and >= 0"),
        ([1e308, 1e308], [0], "overflows"),
        ([1.0, 2.0], [0, 0], "non-empty"),
        ([1.0, 2.0], [1], "start at 0"),
    ],
)
def test_grouped_sketches_refuse_what_add_many_refuses(
    values: list[float], starts: list[int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        grouped_sketches(values, starts)


def test_grouped_sketches_of_nothing() -> None:
    assert grouped_sketches([], []) == []


@st.composite
def stores(draw: st.DrawFn) -> np.ndarray:
    """Dense stores with both ends non-empty: short or wide spans, few or many buckets, counts
    of one to nine varint bytes."""
    span = draw(st.one_of(st.integers(1, 70), st.integers(60, 2048)))
    filled = draw(st.integers(0, min(span - 2, 80))) if span > 1 else 0
    counts = np.zeros(span, dtype=np.int64)
    positions = draw(st.lists(st.integers(0, span - 1), min_size=filled, max_size=filled))
    big = st.one_of(st.integers(1, 200), st.integers(1, 2**63 - 1))
    for position in [0, span - 1, *positions]:
        counts[position] = draw(big)
    return counts


@FAST
@given(stores())
def test_small_and_numpy_encodings_are_the_same_bytes(counts: np.ndarray) -> None:
    expected = sketch._bucket_section(counts.astype(np.uint64))
    nonzero = np.flatnonzero(counts)
    assert sketch._bucket_section_small(counts.tolist()) == expected
    assert sketch._bucket_section_sparse(counts.size, nonzero.tolist(), counts[nonzero].tolist()) == expected


@FAST
@given(stores())
def test_small_and_numpy_decodings_agree(counts: np.ndarray) -> None:
    layout, nbins, body = sketch._bucket_section(counts.astype(np.uint64))
    store, total = sketch._bucket_store_small(body, layout, nbins)
    assert store.tolist() == counts.tolist() == sketch._bucket_store(body, layout, nbins).tolist()
    assert total == sum(counts.tolist())


def _error(call: object) -> str | None:
    assert callable(call)
    try:
        call()
    except SketchDecodeError as exc:
        return str(exc)
    return None


@FAST
@given(st.binary(max_size=40), st.sampled_from((0, 1)), st.integers(0, 25))
def test_small_and_numpy_decodings_refuse_the_same_bytes(body: bytes, layout: int, nbins: int) -> None:
    small = _error(lambda: sketch._bucket_store_small(body, layout, nbins))
    vectorised = _error(lambda: sketch._bucket_store(body, layout, nbins))
    assert small == vectorised
    if small is None:
        assert (
            sketch._bucket_store_small(body, layout, nbins)[0].tolist()
            == sketch._bucket_store(body, layout, nbins).tolist()
        )


@FAST
@given(integers, alphas)
def test_bytes_round_trip_through_both_paths(values: list[int], alpha: float) -> None:
    original = QuantileSketch.from_values(values, alpha)
    decoded = QuantileSketch.from_bytes(original.to_bytes())
    assert decoded == original and decoded.to_bytes() == original.to_bytes()
