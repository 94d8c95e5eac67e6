"""Property tests of pipeline.sketch against exact numpy quantiles."""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.sketch import (
    DEFAULT_ALPHA,
    ENCODING_VERSION,
    INTEGER_SAFE_ALPHA,
    MAX_BINS,
    ZERO_THRESHOLD,
    LogMapping,
    QuantileSketch,
    SketchDecodeError,
    merge_all,
)

QS = (0.0, 0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 1.0)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KINDS = (
    "constant",
    "bimodal",
    "pareto",
    "lognormal",
    "zeros",
    "huge",
    "single",
    "two",
    "durations",
    "wide",
)


def make_data(kind: str, seed: int, n: int) -> np.ndarray:
    """Adversarial distributions; all values finite and >= 0."""
    rng = np.random.default_rng(seed)
    if kind == "constant":
        return np.full(n, float(rng.choice([0.0, 1.0, 7.0, 123.456, 1e9, 3e15])))
    if kind == "bimodal":
        low = rng.normal(10, 1, n)
        high = rng.normal(5000, 100, n)
        return np.abs(np.where(rng.random(n) < rng.uniform(0.05, 0.95), low, high))
    if kind == "pareto":
        return (rng.pareto(rng.uniform(0.5, 3.0), n) + 1.0) * rng.uniform(0.1, 100)
    if kind == "lognormal":
        return rng.lognormal(rng.uniform(-2, 8), rng.uniform(0.1, 4.0), n)
    if kind == "zeros":
        positive = np.rint(rng.lognormal(2, 2, n))
        return np.where(rng.random(n) < rng.uniform(0.5, 0.999), 0.0, positive)
    if kind == "huge":
        scale = float(rng.choice([1.0, 1e6]))
        return 1e9 + rng.integers(0, 10**6, n).astype(np.float64) * scale
    if kind == "single":
        return np.array([float(rng.integers(0, 10**7))])
    if kind == "two":
        return rng.choice([0.0, 1.0, 2.0, 999.0, 1e9], 2).astype(np.float64)
    if kind == "durations":
        return np.rint(rng.lognormal(4, 1.5, n))
    # "wide": 13 decades (within the 1.7e14 unfolded span at alpha 0.008), plus zeros
    values = 10.0 ** rng.uniform(-5, 8, n)
    return np.where(rng.random(n) < 0.1, 0.0, values)


datasets = st.builds(make_data, st.sampled_from(KINDS), st.integers(0, 2**32 - 1), st.integers(1, 2500))
alphas = st.sampled_from((DEFAULT_ALPHA, INTEGER_SAFE_ALPHA, 0.05))
raw_values = st.lists(
    st.one_of(st.just(0.0), st.integers(0, 10**7).map(float), st.floats(1e-6, 1e18)),
    min_size=1,
    max_size=200,
).map(lambda xs: np.array(xs, dtype=np.float64))


def exact_lower(x: np.ndarray, q: float) -> float:
    return float(np.quantile(x, q, method="lower"))


def assert_within_alpha(sketch: QuantileSketch, x: np.ndarray) -> None:
    answers = sketch.quantiles(QS)
    for q, got in zip(QS, answers, strict=True):
        want = exact_lower(x, q)
        assert float(x.min()) <= got <= float(x.max())
        assert abs(got - want) <= sketch.alpha * want * (1 + 1e-9), (q, got, want)
        # The contract's wording: within 1 % or 1 ms.
        assert abs(got - want) <= max(0.01 * want, 1.0) or sketch.alpha > 0.01


def summary(sketch: QuantileSketch) -> tuple[object, ...]:
    keys, counts = sketch.bins()
    return (sketch.count, sketch.zero_count, sketch.min, sketch.max, keys.tolist(), counts.tolist())


# -- accuracy ----------------------------------------------------------------------------------


@FAST
@given(datasets, alphas)
def test_quantiles_within_relative_alpha(x: np.ndarray, alpha: float) -> None:
    assert_within_alpha(QuantileSketch.from_values(x, alpha), x)


@FAST
@given(raw_values)
def test_quantiles_within_alpha_on_arbitrary_values(x: np.ndarray) -> None:
    # 1e-6 .. 1e18 spans ~2e24, past MAX_BINS buckets: the bound holds above the folded range.
    sketch = QuantileSketch.from_values(x)
    floor = sketch.max / LogMapping(sketch.alpha).gamma ** (MAX_BINS - 2)
    for q, got in zip(QS, sketch.quantiles(QS), strict=True):
        want = exact_lower(x, q)
        if want == 0.0 or want >= floor:
            assert abs(got - want) <= sketch.alpha * want * (1 + 1e-9), (q, got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_every_distribution_at_default_alpha(kind: str) -> None:
    # A fixed, larger example per distribution on top of the property tests.
    x = make_data(kind, seed=20260101, n=20_000)
    assert_within_alpha(QuantileSketch.from_values(x), x)


def test_lower_quantile_rank_matches_numpy() -> None:
    # q * (n - 1) that is an integer only up to rounding: the rank must agree with numpy's.
    x = np.arange(1, 102, dtype=np.float64)  # n = 101, values far apart relative to alpha
    sketch = QuantileSketch.from_values(x, alpha=0.001)
    for q in (0.29, 0.57, 0.58, 0.07, 0.14, 0.99):
        want = exact_lower(x, q)
        assert abs(sketch.quantile(q) - want) <= 0.001 * want


def test_min_and_max_are_exact() -> None:
    x = np.array([3.3, 1234.5678, 98765.4321])
    sketch = QuantileSketch.from_values(x)
    assert sketch.quantile(0) == 3.3
    assert sketch.quantile(1) == 98765.4321
    assert sketch.count == 3
    assert sketch.sum == pytest.approx(x.sum())
    assert sketch.mean == pytest.approx(x.mean())


def test_zero_bucket_is_exact_and_tiny_values_within_threshold() -> None:
    x = np.array([0.0] * 50 + [ZERO_THRESHOLD / 2] * 10 + [5.0] * 40)
    sketch = QuantileSketch.from_values(x)
    assert sketch.zero_count == 60
    assert sketch.quantile(0.3) == 0.0
    assert abs(sketch.quantile(0.55) - exact_lower(x, 0.55)) <= ZERO_THRESHOLD
    assert sketch.quantile(0.9) == pytest.approx(5.0, rel=DEFAULT_ALPHA)


def test_rounded_answers_meet_contract_for_all_integers_at_integer_safe_alpha() -> None:
    # Exhaustive over 0..1e6 (x >= 250 also follows from 0.008 x + 0.5 <= 0.01 x).
    mapping = LogMapping(INTEGER_SAFE_ALPHA)
    x = np.arange(1, 1_000_001, dtype=np.float64)
    rounded = np.rint(mapping.values(mapping.keys(x)))
    assert np.all(np.abs(rounded - x) <= np.maximum(0.01 * x, 1.0))


def test_rounding_at_one_percent_alpha_can_break_the_contract() -> None:
    # Why INTEGER_SAFE_ALPHA exists: at 0.01 some buckets round outside 1 % for some integer.
    mapping = LogMapping(DEFAULT_ALPHA)
    x = np.arange(1, 10_001, dtype=np.float64)
    rounded = np.rint(mapping.values(mapping.keys(x)))
    assert np.any(np.abs(rounded - x) > np.maximum(0.01 * x, 1.0))


@FAST
@given(st.sampled_from(("durations", "zeros", "bimodal", "two", "single")), st.integers(0, 2**32 - 1))
def test_quantile_rounded_meets_contract_on_integer_data(kind: str, seed: int) -> None:
    x = np.rint(make_data(kind, seed, 2000))
    sketch = QuantileSketch.from_values(x, alpha=INTEGER_SAFE_ALPHA)
    for q in QS:
        want = exact_lower(x, q)
        got = sketch.quantile_rounded(q)
        assert isinstance(got, int)
        assert abs(got - want) <= max(0.01 * want, 1.0), (q, got, want)


# -- bucket bound ------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [DEFAULT_ALPHA, INTEGER_SAFE_ALPHA])
def test_durations_up_to_1e7_ms_never_fold(alpha: float) -> None:
    mapping = LogMapping(alpha)
    x = np.concatenate(([0.0], np.geomspace(1, 1e7, 300_000)))  # hits every key from 1 to 1e7
    sketch = QuantileSketch.from_values(x, alpha)
    expected_bins = int(mapping.keys(np.array([1e7]))[0]) + 1  # keys 0 (x = 1) .. key(1e7)
    assert sketch.num_bins == expected_bins <= MAX_BINS
    keys, counts = sketch.bins()
    assert keys.tolist() == list(range(expected_bins))
    assert int(counts.sum()) + sketch.zero_count == x.size
    assert_within_alpha(sketch, x)


def test_wider_spans_fold_lowest_buckets_and_keep_high_quantiles() -> None:
    x = 10.0 ** np.linspace(-9, 300, 40_000)
    sketch = QuantileSketch.from_values(x)
    keys, _ = sketch.bins()
    assert int(keys[-1] - keys[0]) + 1 == MAX_BINS
    assert sketch.count == x.size
    assert sketch.quantile(0) == x.min()
    for q in (0.95, 0.99):
        want = exact_lower(x, q)
        assert abs(sketch.quantile(q) - want) <= DEFAULT_ALPHA * want * (1 + 1e-9)


# -- merge -------------------------------------------------------------------------------------


@st.composite
def split_data(draw: st.DrawFn) -> tuple[np.ndarray, list[np.ndarray]]:
    x = draw(datasets)
    if draw(st.booleans()):
        x = np.rint(x)
    cuts = sorted(draw(st.lists(st.integers(0, x.size), min_size=2, max_size=2)))
    return x, [x[: cuts[0]], x[cuts[0] : cuts[1]], x[cuts[1] :]]


@FAST
@given(split_data(), alphas)
def test_merge_is_associative_and_commutative(
    data: tuple[np.ndarray, list[np.ndarray]], alpha: float
) -> None:
    x, parts = data
    a, b, c = (QuantileSketch.from_values(p, alpha) for p in parts)
    orders = [
        a.merged(b).merged(c),
        a.merged(b.merged(c)),
        c.merged(a).merged(b),
        b.merged(c).merged(a),
        merge_all([c, b, a], alpha),
    ]
    whole = QuantileSketch.from_values(x, alpha)
    integer_valued = bool(np.all(x == np.rint(x))) and float(x.sum()) < 2**53
    for merged in orders:
        assert summary(merged) == summary(whole)
        assert merged.sum == pytest.approx(whole.sum, rel=1e-12)
        assert merged.quantiles(QS) == whole.quantiles(QS)
        if integer_valued:  # the float sum is exact too, so the encodings are identical
            assert merged.to_bytes() == whole.to_bytes()
    assert_within_alpha(orders[0], x)


@FAST
@given(st.lists(st.integers(0, 2**32 - 1), min_size=3, max_size=3))
def test_merge_is_exact_when_the_span_folds(seeds: list[int]) -> None:
    # Parts over wildly different magnitudes: folding must not depend on the merge order.
    parts = [
        np.rint(10.0 ** np.random.default_rng(seed).uniform(0, 17 + 10 * i, 300))
        for i, seed in enumerate(seeds)
    ]
    a, b, c = (QuantileSketch.from_values(p) for p in parts)
    left = a.merged(b).merged(c)
    right = c.merged(b.merged(a))
    whole = QuantileSketch.from_values(np.concatenate(parts))
    assert summary(left) == summary(right) == summary(whole)
    keys, _ = whole.bins()
    assert int(keys[-1] - keys[0]) + 1 == MAX_BINS  # 1 .. 1e37 folded


def test_pure_merge_leaves_inputs_unchanged_and_in_place_merge_updates() -> None:
    a = QuantileSketch.from_values([1, 2, 3])
    b = QuantileSketch.from_values([0, 1000])
    a_bytes, b_bytes = a.to_bytes(), b.to_bytes()
    both = a.merged(b)
    assert (a.to_bytes(), b.to_bytes()) == (a_bytes, b_bytes)
    a.merge(b)
    assert a == both
    assert a.count == 5 and a.zero_count == 1 and a.min == 0 and a.max == 1000


def test_merge_with_empty_and_of_nothing() -> None:
    a = QuantileSketch.from_values([5.0, 6.0])
    assert a.merged(QuantileSketch()) == a
    assert QuantileSketch().merged(a) == a
    assert merge_all([]) == QuantileSketch()


def test_merge_rejects_different_alpha() -> None:
    with pytest.raises(ValueError, match="alpha"):
        QuantileSketch(0.01).merge(QuantileSketch(0.02))


# -- input validation --------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, -math.inf])
def test_add_rejects_negative_and_non_finite_and_keeps_state(bad: float) -> None:
    sketch = QuantileSketch.from_values([1.0, 2.0])
    before = sketch.to_bytes()
    with pytest.raises(ValueError, match="finite and >= 0"):
        sketch.add_many([3.0, bad])
    assert sketch.to_bytes() == before


def test_sum_overflow_is_refused_so_every_sketch_stays_encodable() -> None:
    big = QuantileSketch.from_values([1e308])
    with pytest.raises(ValueError, match="overflows"):
        big.add_many([1e308])
    with pytest.raises(ValueError, match="overflows"):
        big.merge(QuantileSketch.from_values([1e308]))
    assert big.count == 1
    assert QuantileSketch.from_bytes(big.to_bytes()) == big


def test_add_accepts_lists_ints_and_single_values() -> None:
    sketch = QuantileSketch()
    sketch.add_many([])
    sketch.add_many(np.array([], dtype=np.int64))
    sketch.add_many([1, 2, 3])
    sketch.add_many(np.array([[4, 5]], dtype=np.int32))
    sketch.add(6)
    assert sketch.count == 6 and sketch.sum == 21.0 and len(sketch) == 6


def test_quantile_argument_checks() -> None:
    with pytest.raises(ValueError, match="empty"):
        QuantileSketch().quantile(0.5)
    with pytest.raises(ValueError, match="empty"):
        _ = QuantileSketch().mean
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        QuantileSketch.from_values([1]).quantile(1.5)
    with pytest.raises(ValueError, match="alpha"):
        QuantileSketch(alpha=1.0)


# -- encoding ----------------------------------------------------------------------------------


@FAST
@given(datasets, alphas)
def test_encoding_round_trips(x: np.ndarray, alpha: float) -> None:
    sketch = QuantileSketch.from_values(x, alpha)
    encoded = sketch.to_bytes()
    decoded = QuantileSketch.from_bytes(encoded)
    assert decoded == sketch
    assert decoded.to_bytes() == encoded
    assert decoded.quantiles(QS) == sketch.quantiles(QS)
    assert QuantileSketch.from_bytes(memoryview(bytearray(encoded))) == sketch


def test_empty_sketch_round_trips() -> None:
    encoded = QuantileSketch().to_bytes()
    assert encoded[0] == ENCODING_VERSION
    assert QuantileSketch.from_bytes(encoded) == QuantileSketch()


def test_encoding_picks_the_smaller_bucket_layout_and_stays_compact() -> None:
    spread = QuantileSketch.from_values([1.0, 1e3, 1e6])  # three buckets far apart: sparse
    full = QuantileSketch.from_values(np.rint(np.geomspace(1, 1e7, 5000)))  # every key: dense
    assert spread.to_bytes()[1] == 0
    assert full.to_bytes()[1] == 1
    header_and_crc = struct.calcsize("<BBdddd") + 4
    assert len(spread.to_bytes()) <= header_and_crc + 3 + 2 * 3 + 2
    # One byte per key of the span (most counts < 128) plus a few scalars.
    keys, _ = full.bins()
    assert len(full.to_bytes()) <= header_and_crc + int(keys[-1] - keys[0]) + 1 + 16


def test_encoding_is_canonical_for_equal_sketches() -> None:
    x = np.rint(np.random.default_rng(7).lognormal(4, 1, 3000))
    one = QuantileSketch.from_values(x)
    other = QuantileSketch()
    for chunk in np.array_split(x[::-1], 17):
        other.merge(QuantileSketch.from_values(chunk))
    assert one.to_bytes() == other.to_bytes()


SAMPLE = QuantileSketch.from_values(np.rint(np.random.default_rng(3).lognormal(4, 1.5, 500))).to_bytes()


@FAST
@given(st.integers(0, len(SAMPLE) - 1), st.integers(1, 255))
def test_any_corrupted_byte_is_rejected(index: int, mask: int) -> None:
    corrupted = bytearray(SAMPLE)
    corrupted[index] ^= mask
    with pytest.raises(SketchDecodeError):
        QuantileSketch.from_bytes(bytes(corrupted))


def test_every_truncation_and_extension_is_rejected() -> None:
    for length in range(len(SAMPLE)):
        with pytest.raises(SketchDecodeError):
            QuantileSketch.from_bytes(SAMPLE[:length])
    with pytest.raises(SketchDecodeError):
        QuantileSketch.from_bytes(SAMPLE + b"\x00")


def test_unknown_version_is_rejected_with_a_clear_message() -> None:
    future = bytes([ENCODING_VERSION + 1]) + SAMPLE[1:]
    with pytest.raises(
        SketchDecodeError, match=r"unsupported sketch encoding version 2 \(this build reads 1\)"
    ):
        QuantileSketch.from_bytes(future)
    with pytest.raises(SketchDecodeError, match="empty input"):
        QuantileSketch.from_bytes(b"")


def reseal(payload: bytes) -> bytes:
    """A payload with a valid checksum, to reach the semantic checks behind it."""
    return payload + struct.pack("<I", zlib.crc32(payload))


def header(
    layout: int = 0, alpha: float = 0.01, total: float = 5.0, lo: float = 5.0, hi: float = 5.0
) -> bytes:
    return struct.pack("<BBdddd", ENCODING_VERSION, layout, alpha, total, lo, hi)


def uv(*values: int) -> bytes:
    """Unsigned LEB128, written independently of the module's vectorised encoder."""
    out = bytearray()
    for value in values:
        rest = value
        while rest >= 0x80:
            out.append(rest & 0x7F | 0x80)
            rest >>= 7
        out.append(rest)
    return bytes(out)


KEY5 = 2 * int(LogMapping(0.01).keys(np.array([5.0]))[0])  # zigzag key of the value 5.0


def test_resealed_hand_written_payload_decodes() -> None:
    # Guards the helpers below: zero count 0, one bucket (5.0) holding one value.
    decoded = QuantileSketch.from_bytes(reseal(header() + uv(0, 1, KEY5, 1)))
    assert decoded == QuantileSketch.from_values([5.0])
    assert decoded.to_bytes() == QuantileSketch.from_values([5.0]).to_bytes()


@pytest.mark.parametrize("count", [127, 128, 300, 2**14, 2**40, 2**62])
def test_multi_byte_counts_round_trip_byte_for_byte(count: int) -> None:
    for layout in (0, 1):
        payload = reseal(header(layout=layout, total=5.0 * count) + uv(0, 1, KEY5, count))
        decoded = QuantileSketch.from_bytes(payload)
        assert decoded.count == count
        assert decoded.quantile(0.5) == 5.0
        assert decoded.to_bytes() == reseal(header(total=5.0 * count) + uv(0, 1, KEY5, count))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (header(layout=7) + uv(0, 1, KEY5, 1), "unknown bucket layout"),
        (header(alpha=1.5) + uv(0, 1, KEY5, 1), "bad alpha"),
        (header(alpha=math.nan) + uv(0, 1, KEY5, 1), "bad alpha"),
        (header() + uv(0, 1, KEY5, 0), "empty bucket"),
        (header() + uv(0, 1, KEY5, 1, 1), "does not match"),
        (header() + uv(0, 2, KEY5, 1), "does not match"),
        (header() + uv(0, 1, KEY5) + b"\x81\x00", "non-canonical"),
        (header() + uv(0, 1, KEY5) + b"\xff" * 9 + b"\x01", "too long"),
        (header() + uv(0, MAX_BINS + 1, KEY5), "exceed the limit"),
        (header() + uv(0, 2, KEY5, MAX_BINS - 1, 1, 1), "span exceeds"),
        (header(layout=1) + uv(0, 2, KEY5, 1, 0), "non-empty bucket"),
        (header() + uv(0, 1, 2 * 10**6, 1), "out of range"),
        (header(lo=9.0, hi=5.0) + uv(0, 1, KEY5, 1), "min/max/sum"),
        (header(total=-1.0) + uv(0, 1, KEY5, 1), "min/max/sum"),
        (header() + uv(1, 1, KEY5, 1), "zero bucket"),
        (header() + uv(0, 0), "empty sketch with non-empty summary"),
        (header()[:20], "truncated"),
    ],
)
def test_inconsistent_payloads_are_rejected(payload: bytes, message: str) -> None:
    with pytest.raises(SketchDecodeError, match=message):
        QuantileSketch.from_bytes(reseal(payload))
