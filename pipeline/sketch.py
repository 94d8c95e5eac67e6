"""Mergeable quantile sketch: a DDSketch-style log-bucketed histogram over values >= 0.

A positive value ``x`` above `ZERO_THRESHOLD` goes to bucket ``k = ceil(log(x) / log(gamma))`` with
``gamma = (1 + alpha) / (1 - alpha)``; bucket ``k`` covers ``(gamma**(k-1), gamma**k]`` and answers
with ``2 * gamma**k / (gamma + 1)``, which is within relative ``alpha`` of every value in the bucket.
Values at or below `ZERO_THRESHOLD` are counted in a separate zero bucket that answers ``0``.
Count, sum, min and max are kept exactly next to the buckets.

Bucket counts are integers, so merging is exactly associative and commutative; the sum is a float
and is exact (hence also order-independent) while the values are integers and the running sum stays
below 2**53, which covers every quantity of the event contract (durations, bytes, tokens, cents).

At most `MAX_BINS` consecutive bucket keys are kept: when the span would exceed it, the lowest
buckets are folded into the lowest kept one (high quantiles keep their accuracy). The fold only
depends on the highest key seen, so it is order-independent too. With ``alpha = 0.01`` the kept
span is ``gamma**2047 ~ 6e17``: values from 1 ms to 1e7 ms use 807 buckets and never fold.

`quantile` answers the *lower* quantile, the value of rank ``floor(q * (n - 1))`` in the sorted
input, like ``numpy.quantile(x, q, method="lower")``; ranks 0 and n - 1 answer the exact min and
max, and every answer is clamped to ``[min, max]``.

See docs/aggregates.md for the error bound, the binary encoding and measured sizes and speed.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_ALPHA",
    "ENCODING_VERSION",
    "INTEGER_SAFE_ALPHA",
    "MAX_BINS",
    "ZERO_THRESHOLD",
    "LogMapping",
    "QuantileSketch",
    "SketchDecodeError",
    "grouped_sketches",
    "merge_all",
]

DEFAULT_ALPHA: Final = 0.01
# With this alpha, rounding an answer for integer-valued data (the seed's INTEGER p50/p95/p99
# columns) stays within max(1 %, 1 unit) of the exact value: for x >= 250 the error is at most
# 0.008 x + 0.5 <= 0.01 x, and below 250 it is checked exhaustively in the unit tests. At 0.01 it
# is not: 110 of the 807 buckets between 1 and 1e7 hold no integer that is within 1 % of all of
# theirs.
INTEGER_SAFE_ALPHA: Final = 0.008
MAX_BINS: Final = 2048
ZERO_THRESHOLD: Final = 1e-9
ENCODING_VERSION: Final = 1

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

_LAYOUT_SPARSE: Final = 0  # keys as first key + gaps, then one count per non-empty bucket
_LAYOUT_DENSE: Final = 1  # first key, then one count per key of the span (zeros included)
_HEADER = struct.Struct("<BBdddd")  # version, layout, alpha, sum, min, max
_CRC = struct.Struct("<I")
_MIN_ENCODED = _HEADER.size + 2 + _CRC.size  # two one-byte varints: zero count, bucket count
_MAX_TOTAL_COUNT: Final = 2**63 - 1
_EMPTY_KEYS: Final[IntArray] = np.zeros(0, dtype=np.int64)


class SketchDecodeError(ValueError):
    """The bytes are not a sketch this version can read: unknown version, corrupted or truncated."""


class LogMapping:
    """The value <-> bucket key mapping for one relative accuracy ``alpha``."""

    __slots__ = ("_inv_log_gamma", "_log_gamma", "_rep_factor", "alpha", "gamma", "max_key", "min_key")

    def __init__(self, alpha: float) -> None:
        if not (math.isfinite(alpha) and 0.0 < alpha < 1.0):
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        self.alpha = float(alpha)
        self.gamma = (1.0 + alpha) / (1.0 - alpha)
        self._log_gamma = math.log(self.gamma)
        self._inv_log_gamma = 1.0 / self._log_gamma
        self._rep_factor = 2.0 / (1.0 + self.gamma)
        # The keys a finite value above the zero threshold can take: decode rejects others.
        self.min_key = math.ceil(math.log(ZERO_THRESHOLD) * self._inv_log_gamma) - 1
        self.max_key = math.ceil(math.log(np.finfo(np.float64).max) * self._inv_log_gamma) + 1

    def keys(self, values: FloatArray) -> IntArray:
        """Bucket keys of values that are all > `ZERO_THRESHOLD`."""
        return np.ceil(np.log(values) * self._inv_log_gamma).astype(np.int64)

    def values(self, keys: IntArray) -> FloatArray:
        """The value each bucket answers with (within relative alpha of all its members)."""
        return np.exp(keys.astype(np.float64) * self._log_gamma) * self._rep_factor

    def value(self, key: int) -> float:
        return math.exp(key * self._log_gamma) * self._rep_factor


_MAPPINGS: dict[float, LogMapping] = {}


def _mapping(alpha: float) -> LogMapping:
    found = _MAPPINGS.get(alpha)
    if found is None:
        found = LogMapping(alpha)
        if len(_MAPPINGS) < 64:  # a handful of alphas in practice; never grow without bound
            _MAPPINGS[alpha] = found
    return found


class QuantileSketch:
    """Log-bucketed histogram with exact count/sum/min/max. Not thread-safe."""

    __slots__ = ("_count", "_counts", "_map", "_max", "_min", "_offset", "_sum", "_zero")

    def __init__(self, alpha: float = DEFAULT_ALPHA) -> None:
        self._map = _mapping(float(alpha))
        # Dense store: _counts[i] is the count of key _offset + i. Invariant: empty, or both ends > 0.
        self._offset = 0
        self._counts: IntArray = np.zeros(0, dtype=np.int64)
        self._zero = 0
        self._count = 0
        self._sum = 0.0
        self._min = math.inf
        self._max = -math.inf

    @classmethod
    def from_values(
        cls, values: npt.ArrayLike | Sequence[float], alpha: float = DEFAULT_ALPHA
    ) -> QuantileSketch:
        sketch = cls(alpha)
        sketch.add_many(values)
        return sketch

    # -- read-only state ---------------------------------------------------------------------

    @property
    def alpha(self) -> float:
        return self._map.alpha

    @property
    def count(self) -> int:
        return self._count

    @property
    def sum(self) -> float:
        return self._sum

    @property
    def min(self) -> float:
        """Smallest value added; ``inf`` while empty."""
        return self._min

    @property
    def max(self) -> float:
        """Largest value added; ``-inf`` while empty."""
        return self._max

    @property
    def mean(self) -> float:
        if self._count == 0:
            raise ValueError("mean of an empty sketch")
        return self._sum / self._count

    @property
    def zero_count(self) -> int:
        return self._zero

    @property
    def num_bins(self) -> int:
        """Non-empty buckets, the zero bucket excluded."""
        return int(np.count_nonzero(self._counts))

    def bins(self) -> tuple[IntArray, IntArray]:
        """Copies of the non-empty buckets' keys (ascending) and counts."""
        nonzero = self._counts.nonzero()[0]
        return (nonzero + self._offset).astype(np.int64), self._counts[nonzero].copy()

    def __len__(self) -> int:
        return self._count

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantileSketch):
            return NotImplemented
        return (
            self.alpha == other.alpha
            and self._count == other._count
            and self._zero == other._zero
            and self._sum == other._sum
            and self._min == other._min
            and self._max == other._max
            and self._offset == other._offset
            and np.array_equal(self._counts, other._counts)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return (
            f"QuantileSketch(alpha={self.alpha}, count={self._count}, zeros={self._zero}, "
            f"bins={self.num_bins}, min={self._min}, max={self._max}, sum={self._sum})"
        )

    # -- updates -----------------------------------------------------------------------------

    def add(self, value: float) -> None:
        self.add_many(np.array([value], dtype=np.float64))

    def add_many(self, values: npt.ArrayLike | Sequence[float]) -> None:
        """Add a whole batch; values must be finite and >= 0 (else ValueError, sketch unchanged)."""
        x = np.asarray(values, dtype=np.float64).ravel()
        if x.size == 0:
            return
        lo = float(x.min())  # NaN propagates into both min and max
        hi = float(x.max())
        if not (lo >= 0.0 and math.isfinite(hi)):
            raise ValueError("sketch values must be finite and >= 0")
        total = self._sum + float(x.sum())
        if not math.isfinite(total):
            raise ValueError("sketch sum overflows float64")
        positive = x[x > ZERO_THRESHOLD]
        if positive.size:
            keys = self._map.keys(positive)
            kmax = int(keys.max())
            if self._counts.size:
                kmax = max(kmax, self._offset + self._counts.size - 1)
            # Fold before counting so the histogram never spans more than MAX_BINS keys.
            keys = np.maximum(keys, kmax - (MAX_BINS - 1))
            kmin = int(keys.min())
            self._fold_in(kmin, np.bincount(keys - kmin))
        self._zero += int(x.size - positive.size)
        self._count += int(x.size)
        self._sum = total
        self._min = min(self._min, lo)
        self._max = max(self._max, hi)

    def merge(self, other: QuantileSketch) -> None:
        """Fold ``other`` into this sketch (in place). Both must have the same alpha."""
        if other.alpha != self.alpha:
            raise ValueError(f"cannot merge sketches of alpha {self.alpha} and {other.alpha}")
        total = self._sum + other._sum
        if not math.isfinite(total):
            raise ValueError("sketch sum overflows float64")
        if other._counts.size:
            self._fold_in(other._offset, other._counts)
        self._zero += other._zero
        self._count += other._count
        self._sum = total
        self._min = min(self._min, other._min)
        self._max = max(self._max, other._max)

    def merged(self, other: QuantileSketch) -> QuantileSketch:
        """A new sketch holding both; neither input changes."""
        result = self.copy()
        result.merge(other)
        return result

    def copy(self) -> QuantileSketch:
        clone = QuantileSketch.__new__(QuantileSketch)
        clone._map = self._map
        clone._offset = self._offset
        clone._counts = self._counts.copy()
        clone._zero = self._zero
        clone._count = self._count
        clone._sum = self._sum
        clone._min = self._min
        clone._max = self._max
        return clone

    @classmethod
    def _of_state(
        cls,
        mapping: LogMapping,
        offset: int,
        counts: IntArray,
        zero: int,
        count: int,
        total: float,
        lo: float,
        hi: float,
    ) -> QuantileSketch:
        """A sketch of a state known to be valid (decoded or built by `grouped_sketches`)."""
        sketch = cls.__new__(cls)
        sketch._map = mapping
        sketch._offset = offset
        sketch._counts = counts
        sketch._zero = zero
        sketch._count = count
        sketch._sum = total
        sketch._min = lo
        sketch._max = hi
        return sketch

    def _fold_in(self, offset: int, counts: IntArray) -> None:
        """Add a dense run of counts (both ends > 0) starting at key ``offset``."""
        mine = self._counts
        if mine.size == 0:
            hi = offset + counts.size - 1
            lo = max(offset, hi - (MAX_BINS - 1))
        else:
            hi = max(self._offset + mine.size - 1, offset + counts.size - 1)
            lo = max(min(self._offset, offset), hi - (MAX_BINS - 1))
        merged = np.zeros(hi - lo + 1, dtype=np.int64)
        _add_run(merged, lo, self._offset, mine)
        _add_run(merged, lo, offset, counts)
        self._offset = lo
        self._counts = merged

    # -- queries -----------------------------------------------------------------------------

    def quantile(self, q: float) -> float:
        """The lower q-quantile (rank ``floor(q * (n - 1))``), within relative alpha."""
        return self.quantiles((q,))[0]

    def quantiles(self, qs: Iterable[float]) -> list[float]:
        qs = list(qs)
        for q in qs:
            if not 0.0 <= q <= 1.0:
                raise ValueError(f"quantile must be in [0, 1], got {q!r}")
        if self._count == 0:
            raise ValueError("quantile of an empty sketch")
        n = self._count
        cumulative = self._counts.cumsum()
        answers: list[float] = []
        for q in qs:
            # Same float expression as numpy's "lower" method, so ranks agree exactly.
            rank = math.floor((n - 1) * q)
            if rank == 0:
                answers.append(self._min)
            elif rank == n - 1:
                answers.append(self._max)
            elif rank < self._zero:
                answers.append(min(max(0.0, self._min), self._max))
            else:
                index = int(cumulative.searchsorted(rank - self._zero, side="right"))
                estimate = self._map.value(self._offset + index)
                answers.append(min(max(estimate, self._min), self._max))
        return answers

    def quantile_rounded(self, q: float) -> int:
        """The lower quantile rounded to an integer, for integer columns.

        For integer-valued input and ``alpha <= INTEGER_SAFE_ALPHA`` the result is within
        ``max(1 %, 1)`` of the exact lower quantile (the contract's "1 % or 1 ms").
        """
        return round(self.quantile(q))

    # -- encoding ----------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Versioned compact encoding (see docs/aggregates.md); canonical for equal sketches."""
        counts = self._counts
        if counts.size <= _SMALL_SPAN:
            layout, nbins, body = _bucket_section_small(counts.tolist())
        else:
            # A wide span is mostly empty buckets in a small sketch: only the non-empty ones count.
            nonzero = counts.nonzero()[0]  # 1-D: np.flatnonzero without its dispatch overhead
            if nonzero.size <= _SMALL_SPAN:
                layout, nbins, body = _bucket_section_sparse(
                    counts.size, nonzero.tolist(), counts[nonzero].tolist()
                )
            else:
                layout, nbins, body = _bucket_section(counts.astype(np.uint64))
        head = _HEADER.pack(ENCODING_VERSION, layout, self.alpha, self._sum, self._min, self._max)
        # The first key is the store offset: the invariant keeps both ends of the store non-empty.
        scalars = _varint(self._zero) + _varint(nbins) + (_varint(_zigzag(self._offset)) if nbins else b"")
        payload = head + scalars + body
        return payload + _CRC.pack(zlib.crc32(payload))

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> QuantileSketch:
        """Decode `to_bytes` output; raises `SketchDecodeError` on anything else."""
        return _decode(bytes(data))


def merge_all(sketches: Iterable[QuantileSketch], alpha: float = DEFAULT_ALPHA) -> QuantileSketch:
    """Merge any number of sketches into a new one (empty input gives an empty sketch)."""
    result = QuantileSketch(alpha)
    for sketch in sketches:
        result.merge(sketch)
    return result


def grouped_sketches(
    values: npt.ArrayLike, starts: npt.ArrayLike, alpha: float = DEFAULT_ALPHA
) -> list[QuantileSketch]:
    """One sketch per run ``values[starts[g]:starts[g + 1]]`` (the last run ends at the end): each
    equal to `QuantileSketch.from_values` of its run, all built in one vectorised pass.

    A batch's deltas are thousands of sketches of one to a few values each: built one by one, the
    numpy calls per sketch cost ~15 us; here the whole batch costs a few numpy calls and ~1 us a
    sketch. `starts` must begin at 0 and strictly increase (no empty run); ValueError as `add_many`.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    first = np.asarray(starts, dtype=np.int64).ravel()
    groups = first.size
    if groups == 0:
        if x.size:
            raise ValueError("values without a run")
        return []
    sizes = np.diff(np.append(first, x.size))
    if first[0] != 0 or np.any(sizes <= 0):
        raise ValueError("runs must start at 0 and be non-empty")
    lows = np.minimum.reduceat(x, first)
    highs = np.maximum.reduceat(x, first)
    if not (float(lows.min()) >= 0.0 and math.isfinite(float(highs.max()))):  # NaN fails both
        raise ValueError("sketch values must be finite and >= 0")
    with np.errstate(over="ignore"):  # an overflow is the ValueError below, not a warning
        totals = np.add.reduceat(x, first)
    if not np.all(np.isfinite(totals)):
        raise ValueError("sketch sum overflows float64")
    mapping = _mapping(float(alpha))
    positive = x > ZERO_THRESHOLD
    zeros = sizes - np.add.reduceat(positive.astype(np.int64), first)
    # Positive values sorted by (run, key): each run's keys are then one ascending stretch.
    run_of = np.repeat(np.arange(groups, dtype=np.int64), sizes)[positive]
    keys = mapping.keys(x[positive])
    order = np.lexsort((keys, run_of))
    run_of, keys = run_of[order], keys[order]
    begin = np.searchsorted(run_of, np.arange(groups), side="left")
    end = np.searchsorted(run_of, np.arange(groups), side="right")
    filled = end > begin
    kmax = np.where(filled, keys[np.maximum(end - 1, 0)] if keys.size else 0, 0)
    # Fold keys below each run's kept span into its lowest kept key, as `add_many` does.
    keys = np.maximum(keys, (kmax - (MAX_BINS - 1))[run_of])
    kmin = np.where(filled, keys[np.minimum(begin, keys.size - 1)] if keys.size else 0, 0)
    spans = np.where(filled, kmax - kmin + 1, 0)
    bases = np.zeros(groups, dtype=np.int64)
    np.cumsum(spans[:-1], out=bases[1:])
    store = np.zeros(int(spans.sum()), dtype=np.int64)
    np.add.at(store, bases[run_of] + keys - kmin[run_of], 1)
    sketches: list[QuantileSketch] = []
    for base, span, offset, zero, size, total, lo, hi in zip(
        bases.tolist(),
        spans.tolist(),
        kmin.tolist(),
        zeros.tolist(),
        sizes.tolist(),
        totals.tolist(),
        lows.tolist(),
        highs.tolist(),
        strict=True,
    ):
        counts = store[base : base + span] if span else _EMPTY_KEYS
        sketches.append(QuantileSketch._of_state(mapping, offset, counts, zero, size, total, lo, hi))
    return sketches


def _add_run(target: IntArray, target_offset: int, offset: int, run: IntArray) -> None:
    if run.size == 0:
        return
    cut = target_offset - offset
    if cut > 0:
        # Keys below the kept span collapse into its lowest bucket.
        target[0] += run[:cut].sum()
        run, offset = run[cut:], target_offset
    start = offset - target_offset
    target[start : start + run.size] += run


# -- bucket section encoding ------------------------------------------------------------------

# Stores spanning at most this many keys are encoded and decoded in pure Python: most sketches of a
# batch's deltas hold one to a few values, where numpy's per-call overhead (~1 us a call, ~25 calls
# an encoding) costs ten times the work. Both paths write the same bytes (tests/unit/test_sketch_paths.py).
_SMALL_SPAN: Final = 64
_SMALL_BODY: Final = 128  # bytes of bucket section decoded in pure Python


def _bucket_section(counts: npt.NDArray[np.uint64]) -> tuple[int, int, bytes]:
    """Layout, bucket count and bytes of the bucket section of a dense store (numpy path)."""
    if counts.size == 0:
        return _LAYOUT_SPARSE, 0, _EMPTY_BYTES
    # Both layouts are sized first; only the smaller one is written (sparse on a tie).
    nonzero = counts.nonzero()[0]
    gaps = (np.diff(nonzero) - 1).astype(np.uint64)
    if int(counts.max()) < 0x80 and (gaps.size == 0 or int(gaps.max()) < 0x80):
        # Every count and gap is one byte, its own value: no varint table to build.
        if counts.size < gaps.size + nonzero.size:
            return _LAYOUT_DENSE, counts.size, counts.astype(np.uint8).tobytes()
        return (
            _LAYOUT_SPARSE,
            nonzero.size,
            np.concatenate((gaps, counts[nonzero])).astype(np.uint8).tobytes(),
        )
    count_lengths = _varint_lengths(counts)
    gap_lengths = _varint_lengths(gaps)
    sparse_size = int(gap_lengths.sum()) + int(count_lengths[nonzero].sum())
    if int(count_lengths.sum()) < sparse_size:
        return _LAYOUT_DENSE, counts.size, _varints(counts, count_lengths)
    body = _varints(
        np.concatenate((gaps, counts[nonzero])),
        np.concatenate((gap_lengths, count_lengths[nonzero])),
    )
    return _LAYOUT_SPARSE, nonzero.size, body


def _varint_size(value: int) -> int:
    return (value.bit_length() + 6) // 7 or 1


def _bucket_section_small(counts: list[int]) -> tuple[int, int, bytes]:
    """`_bucket_section` of a small store given as a list, in pure Python (same bytes)."""
    if not counts:
        return _LAYOUT_SPARSE, 0, _EMPTY_BYTES
    if len(counts) == 1:  # the common case: one bucket; sparse wins the tie
        return _LAYOUT_SPARSE, 1, _varint(counts[0])
    nonzero = [i for i, c in enumerate(counts) if c]
    return _bucket_section_sparse(len(counts), nonzero, [counts[i] for i in nonzero])


def _bucket_section_sparse(span: int, nonzero: list[int], present: list[int]) -> tuple[int, int, bytes]:
    """`_bucket_section` of a store of `span` keys given by its non-empty buckets (positions and
    counts), in pure Python (same bytes): each empty bucket of the span costs one byte dense."""
    gaps = [b - a - 1 for a, b in pairwise(nonzero)]
    if max(present) < 0x80 and (not gaps or max(gaps) < 0x80):
        # The common case: every count and gap is one byte, its own value (no varint to build).
        if span < len(gaps) + len(present):  # dense: one byte per key of the span
            dense = [0] * span
            for i, c in zip(nonzero, present, strict=True):
                dense[i] = c
            return _LAYOUT_DENSE, span, bytes(dense)
        return _LAYOUT_SPARSE, len(present), bytes(gaps + present)
    present_size = sum(map(_varint_size, present))
    dense_size = span - len(present) + present_size
    sparse_size = sum(map(_varint_size, gaps)) + present_size
    if dense_size < sparse_size:
        dense = [0] * span
        for i, c in zip(nonzero, present, strict=True):
            dense[i] = c
        return _LAYOUT_DENSE, span, b"".join(map(_varint, dense))
    return _LAYOUT_SPARSE, len(present), b"".join(map(_varint, gaps + present))


# -- varints (unsigned LEB128), vectorised --------------------------------------------------

_EMPTY_BYTES: Final = b""
_SHIFTS: Final = np.arange(10, dtype=np.uint64) * np.uint64(7)
_POWERS: Final = np.uint64(1) << _SHIFTS
_MAX_VARINT_BYTES: Final = 9  # 63 bits: counts and gaps never need more
_ONE_BYTE: Final = tuple(bytes((i,)) for i in range(0x80))


def _zigzag(value: int) -> int:
    return (value << 1) ^ (value >> 63) if value < 0 else value << 1


def _unzigzag(value: int) -> int:
    return (value >> 1) ^ -(value & 1)


def _varint(value: int) -> bytes:
    if value < 0x80:
        return _ONE_BYTE[value]
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _varint_lengths(values: npt.NDArray[np.uint64]) -> IntArray:
    lengths = np.ones(values.size, dtype=np.int64)
    rest = values >> np.uint64(7)
    while rest.any():
        lengths += rest != 0
        rest >>= np.uint64(7)
    return lengths


def _varints(values: npt.NDArray[np.uint64], lengths: IntArray) -> bytes:
    """Values as LEB128, built column by column: byte j of every value at once."""
    if values.size == 0:
        return _EMPTY_BYTES
    width = int(lengths.max())
    columns = np.arange(width)
    table = ((values[:, None] >> _SHIFTS[:width]) & np.uint64(0x7F)).astype(np.uint8)
    table[columns < lengths[:, None] - 1] |= 0x80
    # Row-major order keeps each value's bytes together and in order.
    return table[columns < lengths[:, None]].tobytes()


def _read_varints(data: bytes, expected: int) -> npt.NDArray[np.uint64]:
    """Exactly ``expected`` canonical varints filling ``data``."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if expected == 0 or raw.size == 0:
        if expected or raw.size:
            raise SketchDecodeError("bucket section length does not match its bucket count")
        return np.zeros(0, dtype=np.uint64)
    ends = np.flatnonzero(raw < 0x80)
    if ends.size != expected or ends[-1] != raw.size - 1:
        raise SketchDecodeError("bucket section length does not match its bucket count")
    if ends.size == raw.size:  # every value fits one byte
        return raw.astype(np.uint64)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    width = int(lengths.max())
    if width > _MAX_VARINT_BYTES:
        raise SketchDecodeError("varint too long")
    if np.any((lengths > 1) & (raw[ends] == 0)):
        raise SketchDecodeError("non-canonical varint")
    columns = np.arange(width)
    inside = columns < lengths[:, None]
    table = np.where(inside, raw[np.minimum(starts[:, None] + columns, raw.size - 1)] & 0x7F, 0)
    # The 7-bit groups do not overlap, so a product with the powers of 128 assembles each value.
    values: npt.NDArray[np.uint64] = table.astype(np.uint64) @ _POWERS[:width]
    return values


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 63, 7):
        if pos >= len(data):
            raise SketchDecodeError("truncated sketch header")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if byte == 0 and shift:
                raise SketchDecodeError("non-canonical varint")
            return value, pos
    raise SketchDecodeError("varint too long")


def _bucket_store(body: bytes, layout: int, nbins: int) -> npt.NDArray[np.uint64]:
    """The dense store a bucket section describes (numpy path), validated."""
    if layout == _LAYOUT_SPARSE:
        fields = _read_varints(body, 2 * nbins - 1 if nbins else 0)
        gaps, bucket_counts = fields[: max(nbins - 1, 0)], fields[max(nbins - 1, 0) :]
        if np.any(bucket_counts == 0):
            raise SketchDecodeError("empty bucket in sparse layout")
        if gaps.size and int(gaps.max()) >= MAX_BINS:
            raise SketchDecodeError(f"bucket span exceeds {MAX_BINS} keys")
        relative = np.concatenate(([0], np.cumsum(gaps.astype(np.int64) + 1))) if nbins else _EMPTY_KEYS
        if relative.size and int(relative[-1]) >= MAX_BINS:
            raise SketchDecodeError(f"bucket span exceeds {MAX_BINS} keys")
        dense = np.zeros(int(relative[-1]) + 1 if nbins else 0, dtype=np.uint64)
        dense[relative] = bucket_counts
        return dense
    dense = _read_varints(body, nbins)
    if nbins and (dense[0] == 0 or dense[-1] == 0):
        raise SketchDecodeError("dense layout must start and end with a non-empty bucket")
    return dense


def _read_varints_small(data: bytes, expected: int) -> list[int]:
    """`_read_varints` in pure Python, for short sections: same checks, same errors."""
    ends = sum(1 for byte in data if byte < 0x80)
    if ends != expected or (data and data[-1] >= 0x80):
        raise SketchDecodeError("bucket section length does not match its bucket count")
    values: list[int] = []
    value = shift = length = 0
    too_long = non_canonical = False
    for byte in data:
        value |= (byte & 0x7F) << shift
        shift += 7
        length += 1
        if byte < 0x80:
            too_long |= length > _MAX_VARINT_BYTES
            non_canonical |= length > 1 and byte == 0
            values.append(value)
            value = shift = length = 0
    if too_long:  # the numpy path's order of checks: length first, then canonical form
        raise SketchDecodeError("varint too long")
    if non_canonical:
        raise SketchDecodeError("non-canonical varint")
    return values


def _bucket_store_small(body: bytes, layout: int, nbins: int) -> tuple[IntArray, int]:
    """`_bucket_store` in pure Python, for short sections: same checks, same errors. Returns the
    dense store and the sum of its counts."""
    if layout == _LAYOUT_SPARSE:
        fields = _read_varints_small(body, 2 * nbins - 1 if nbins else 0)
        gaps, bucket_counts = fields[: max(nbins - 1, 0)], fields[max(nbins - 1, 0) :]
        if 0 in bucket_counts:
            raise SketchDecodeError("empty bucket in sparse layout")
        if gaps and max(gaps) >= MAX_BINS:
            raise SketchDecodeError(f"bucket span exceeds {MAX_BINS} keys")
        if not nbins:
            return _EMPTY_KEYS, 0
        positions = [0]
        for gap in gaps:
            positions.append(positions[-1] + gap + 1)
        if positions[-1] >= MAX_BINS:
            raise SketchDecodeError(f"bucket span exceeds {MAX_BINS} keys")
        if nbins == 1:
            return np.array(bucket_counts, dtype=np.int64), bucket_counts[0]
        store = np.zeros(positions[-1] + 1, dtype=np.int64)
        store[positions] = bucket_counts
        return store, sum(bucket_counts)
    dense = _read_varints_small(body, nbins)
    if nbins and (dense[0] == 0 or dense[-1] == 0):
        raise SketchDecodeError("dense layout must start and end with a non-empty bucket")
    return np.array(dense, dtype=np.int64), sum(dense)


def _decode(data: bytes) -> QuantileSketch:
    if len(data) < 1:
        raise SketchDecodeError("empty input is not a sketch")
    if data[0] != ENCODING_VERSION:
        raise SketchDecodeError(
            f"unsupported sketch encoding version {data[0]} (this build reads {ENCODING_VERSION})"
        )
    if len(data) < _MIN_ENCODED:
        raise SketchDecodeError(f"truncated sketch: {len(data)} bytes")
    payload, (crc,) = data[: -_CRC.size], _CRC.unpack(data[-_CRC.size :])
    if zlib.crc32(payload) != crc:
        raise SketchDecodeError("sketch checksum mismatch: corrupted or truncated bytes")
    _, layout, alpha, total, lo, hi = _HEADER.unpack_from(payload)
    if layout not in (_LAYOUT_SPARSE, _LAYOUT_DENSE):
        raise SketchDecodeError(f"unknown bucket layout {layout}")
    try:
        mapping = _mapping(alpha)
    except ValueError as exc:
        raise SketchDecodeError(f"bad alpha {alpha!r}") from exc
    zero, pos = _read_varint(payload, _HEADER.size)
    nbins, pos = _read_varint(payload, pos)
    if nbins > MAX_BINS:
        raise SketchDecodeError(f"{nbins} buckets exceed the limit of {MAX_BINS}")
    offset = 0
    if nbins:
        zigzag, pos = _read_varint(payload, pos)
        offset = _unzigzag(zigzag)
    body = payload[pos:]
    if len(body) <= _SMALL_BODY:
        store, in_buckets = _bucket_store_small(body, layout, nbins)
    else:
        dense = _bucket_store(body, layout, nbins)
        store, in_buckets = dense.astype(np.int64), sum(dense.tolist())
    size = store.size
    if nbins and not (mapping.min_key <= offset and offset + size - 1 <= mapping.max_key):
        raise SketchDecodeError("bucket key out of range")
    count = zero + in_buckets
    if count > _MAX_TOTAL_COUNT:
        raise SketchDecodeError("total count overflows")
    if count == 0:
        if not (total == 0.0 and lo == math.inf and hi == -math.inf):
            raise SketchDecodeError("empty sketch with non-empty summary")
    elif not (0.0 <= lo <= hi < math.inf and 0.0 <= total < math.inf):
        raise SketchDecodeError("inconsistent min/max/sum")
    elif (zero > 0) != (lo <= ZERO_THRESHOLD) or (size > 0) != (hi > ZERO_THRESHOLD):
        raise SketchDecodeError("min/max disagree with the zero bucket and the buckets")
    return QuantileSketch._of_state(mapping, offset, store, zero, count, total, lo, hi)
