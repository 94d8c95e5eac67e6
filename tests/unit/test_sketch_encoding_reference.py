"""`QuantileSketch.to_bytes` against a reference encoder written from the format's description
(docs/aggregates.md): LEB128 varints everywhere, the smaller of the dense and sparse bucket
sections (sparse on a tie). The encoder's shortcuts (one-byte counts and gaps written as their own
values, pure Python for small stores) must give exactly these bytes."""

from __future__ import annotations

import struct
import zlib
from itertools import pairwise

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.sketch import (
    DEFAULT_ALPHA,
    ENCODING_VERSION,
    INTEGER_SAFE_ALPHA,
    MAX_BINS,
    LogMapping,
    QuantileSketch,
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def zigzag(value: int) -> int:
    return 2 * value if value >= 0 else -2 * value - 1


def reference_bytes(sketch: QuantileSketch) -> bytes:
    keys, counts = (a.tolist() for a in sketch.bins())
    layout, nbins, body = 0, 0, b""
    if keys:
        dense = [0] * (keys[-1] - keys[0] + 1)
        for key, count in zip(keys, counts, strict=True):
            dense[key - keys[0]] = count
        dense_body = b"".join(map(varint, dense))
        sparse_body = b"".join(map(varint, [b - a - 1 for a, b in pairwise(keys)] + counts))
        if len(dense_body) < len(sparse_body):
            layout, nbins, body = 1, len(dense), dense_body
        else:
            layout, nbins, body = 0, len(counts), sparse_body
    head = struct.pack("<BBdddd", ENCODING_VERSION, layout, sketch.alpha, sketch.sum, sketch.min, sketch.max)
    scalars = varint(sketch.zero_count) + varint(nbins) + (varint(zigzag(keys[0])) if keys else b"")
    payload = head + scalars + body
    return payload + struct.pack("<I", zlib.crc32(payload))


# Buckets at gaps of 0 to a few hundred keys (ties between the layouts come from small gaps), each
# repeated around the one-byte limit of a count (127, 128), with zeros; from 1 to 120 buckets (the
# pure-Python and the numpy paths).
buckets = st.lists(
    st.tuples(
        st.one_of(st.integers(0, 3), st.integers(0, 300)),
        st.sampled_from((1, 2, 3, 127, 128, 129, 300, 17_000)),
    ),
    min_size=0,
    max_size=120,
)


@SETTINGS
@given(buckets, st.sampled_from((0, 1, 200)), st.sampled_from((DEFAULT_ALPHA, INTEGER_SAFE_ALPHA, 0.05)))
def test_to_bytes_equals_the_reference_encoding(
    gaps_and_counts: list[tuple[int, int]], zeros: int, alpha: float
) -> None:
    mapping = LogMapping(alpha)
    values = [0.0] * zeros
    key, kept = 100, 0
    for gap, times in gaps_and_counts:
        key += gap + 1
        if key - 101 >= MAX_BINS:  # a wider store folds its lowest buckets: not this test's subject
            break
        values += [mapping.value(key)] * times  # the value bucket `key` answers with lies in it
        kept += 1
    sketch = QuantileSketch.from_values(values, alpha)
    assert sketch.num_bins == kept
    encoded = sketch.to_bytes()
    assert encoded == reference_bytes(sketch)
    assert QuantileSketch.from_bytes(encoded) == sketch


def _every_other_key(buckets: int) -> QuantileSketch:
    """Buckets one key apart: both layouts take 2 * buckets - 1 bytes (a tie, written sparse)."""
    mapping = LogMapping(DEFAULT_ALPHA)
    return QuantileSketch.from_values([mapping.value(100 + 2 * i) for i in range(buckets)], DEFAULT_ALPHA)


def test_the_reference_sees_both_layouts_ties_and_multi_byte_varints() -> None:
    """Cases the generated ones may miss: a tie on each path, and counts of two bytes."""
    dense = QuantileSketch.from_values([100] * 128 + [103] * 3, DEFAULT_ALPHA)  # adjacent buckets
    sparse = QuantileSketch.from_values([1, 10**6] + [3] * 200, DEFAULT_ALPHA)
    small_tie, wide_tie = _every_other_key(10), _every_other_key(100)  # pure Python, numpy
    for sketch, layout in ((dense, 1), (sparse, 0), (small_tie, 0), (wide_tie, 0)):
        assert reference_bytes(sketch)[_LAYOUT_AT] == layout
        assert sketch.to_bytes() == reference_bytes(sketch)


_LAYOUT_AT = 1  # the layout byte follows the version byte
