"""Micro-benchmark of `pipeline.sketch.QuantileSketch` against the `ddsketch` PyPI package.

    .venv/bin/python bench/sketch_speed.py [--values 5000] [--parts 24] [--repeat 7]
        [--baseline OLD_SKETCH_PY]

Measures, on realistic integer durations (lognormal, median ~55 ms, 0 ms in 1 %):
- add: one batch of ``--values`` durations into a fresh sketch (numpy array and Python list input);
- merge + encode: decode ``--parts`` encoded sketches (each of ``--values`` durations), merge them,
  encode the result, as the aggregate merger does with parts read from Postgres;
- p50/p95/p99 of the merged sketch;
- encoded sizes for several shapes, with the bucket layouts the encoder chooses between and a
  fixed-width alternative, next to the ddsketch protobuf size;
- the largest relative error of the lower quantiles {0, .01, .25, .5, .9, .95, .99, 1} for both;
- small sketches, as a batch's deltas hold them (one value at the median): encode, decode and merge
  of 1-, 3- and 40-value sketches, and building one sketch per group of a batch one by one
  (`from_values`) or in one pass (`grouped_sketches`). With ``--baseline`` (a copy of an older
  pipeline/sketch.py, e.g. ``git show REV:pipeline/sketch.py > /tmp/old_sketch.py``) the same rows
  are timed for that version too, in the same process, alternating old and new every round.

``ddsketch`` (and ``protobuf`` for its encoding) are not project dependencies; install them into the
virtualenv to get the comparison columns (``.venv/bin/pip install ddsketch protobuf``). Prints the
best and the median of ``--repeat`` timed runs, in microseconds.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import itertools
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from bench.harness.sources import load_source
from pipeline import sketch as current
from pipeline.sketch import DEFAULT_ALPHA, MAX_BINS, QuantileSketch, grouped_sketches, merge_all

ALPHA = DEFAULT_ALPHA  # --alpha replaces it
QS = (0.0, 0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 1.0)


def _optional(module: str) -> Any:
    """The comparison package, or None when it is not installed (typed Any: it has no stubs)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


dd: Any = _optional("ddsketch")
dd_pb: Any = _optional("ddsketch.pb.ddsketch_pb2") if _optional("google.protobuf") else None
dd_proto: Any = _optional("ddsketch.pb.proto") if dd_pb else None


def durations(rng: np.random.Generator, n: int) -> np.ndarray:
    values = np.rint(rng.lognormal(4.0, 1.2, n))
    values[rng.random(n) < 0.01] = 0.0
    return values.astype(np.int64)


def timed(fn: Callable[[], object], repeat: int, number: int) -> tuple[float, float]:
    """Best and median microseconds per call."""
    fn()  # warm caches and lazy imports
    runs = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            start = time.perf_counter()
            for _ in range(number):
                fn()
            runs.append((time.perf_counter() - start) / number * 1e6)
    finally:
        if gc_was_enabled:
            gc.enable()
    return min(runs), statistics.median(runs)


def load_baseline(path: Path) -> ModuleType:
    """An older pipeline/sketch.py, imported under its own name next to the current one."""
    return load_source(path, "baseline_sketch")


def interleaved(fns: list[Callable[[], object]], repeat: int, number: int) -> list[float]:
    """Median µs per call of each function, timed in alternating order every round. CPU time of
    this process, not wall time: on a shared machine a wall clock also counts the time others ran."""
    runs: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for round_ in range(repeat):
            order = list(range(len(fns)))
            if round_ % 2:
                order.reverse()
            for i in order:
                start = time.process_time()
                for _ in range(number):
                    fns[i]()
                runs[i].append((time.process_time() - start) / number * 1e6)
    finally:
        if gc_was_enabled:
            gc.enable()
    return [statistics.median(r) for r in runs]


def small_sketches(rng: np.random.Generator, values: int, repeat: int, baseline: ModuleType | None) -> None:
    """The sketches of a batch's deltas: tiny, built per group, encoded once, decoded by the merger."""
    modules = [current] if baseline is None else [baseline, current]
    names = ["current"] if baseline is None else ["baseline", "current"]
    print(f"\nsmall sketches (CPU µs per operation, median of {repeat} interleaved rounds)")
    print("| operation | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for size in (1, 3, 40):
        data = durations(rng, size).astype(np.float64)
        other = durations(rng, 3).astype(np.float64)
        sketches = [m.QuantileSketch.from_values(data, ALPHA) for m in modules]
        others = [m.QuantileSketch.from_values(other, ALPHA) for m in modules]
        blobs = [s.to_bytes() for s in sketches]
        if len(set(blobs)) != 1:
            raise SystemExit("the two versions encode differently")
        cases: list[tuple[str, list[Callable[[], object]]]] = [
            (f"encode, {size} value(s)", [s.to_bytes for s in sketches]),
            (
                f"decode, {size} value(s)",
                [partial(m.QuantileSketch.from_bytes, b) for m, b in zip(modules, blobs, strict=True)],
            ),
            (
                f"merge 3 values into {size}",
                [partial(s.merged, o) for s, o in zip(sketches, others, strict=True)],
            ),
        ]
        for label, fns in cases:
            medians = interleaved(fns, repeat, 2000)
            print(f"| {label} | " + " | ".join(f"{m:.2f}" for m in medians) + " |")
    # A batch's groups: most hold one value (geometric sizes, mean 2).
    sizes = rng.geometric(0.5, values)
    sizes = sizes[: int(np.searchsorted(np.cumsum(sizes), values)) + 1]
    batch = durations(rng, int(sizes.sum())).astype(np.float64)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    bounds = [*starts.tolist(), batch.size]
    runs = [batch[a:b] for a, b in itertools.pairwise(bounds)]
    one_by_one = [lambda m=m: [m.QuantileSketch.from_values(r, ALPHA) for r in runs] for m in modules]
    per_group = interleaved([*one_by_one, lambda: grouped_sketches(batch, starts, ALPHA)], repeat, 3)
    row_values = [f"{t / len(runs):.2f}" for t in per_group[: len(modules)]]
    print(f"| build {len(runs)} group sketches one by one, per sketch | " + " | ".join(row_values) + " |")
    padding = "| " * (len(modules) - 1)
    one_pass = per_group[-1] / len(runs)
    print(f"| build them in one pass (grouped_sketches), per sketch | {padding}{one_pass:.2f} |")


def varint_size(values: np.ndarray) -> int:
    return sum(max(1, (int(v).bit_length() + 6) // 7) for v in values)


def layout_sizes(sketch: QuantileSketch) -> dict[str, int]:
    """Bytes of the bucket section under each candidate layout (header and CRC excluded)."""
    keys, counts = sketch.bins()
    if keys.size == 0:
        return {"sparse": 0, "dense": 0, "fixed": 0}
    dense = np.zeros(int(keys[-1] - keys[0]) + 1, dtype=np.int64)
    dense[keys - keys[0]] = counts
    return {
        "sparse": varint_size(np.diff(keys) - 1) + varint_size(counts),
        "dense": varint_size(dense),
        "fixed": keys.size * (4 + 8),  # int32 keys + uint64 counts
    }


def dd_add(values: list[int], collapsing: bool) -> Any:
    sketch = dd.LogCollapsingLowestDenseDDSketch(ALPHA, MAX_BINS) if collapsing else dd.DDSketch(ALPHA)
    for value in values:
        sketch.add(value)
    return sketch


def dd_encode(sketch: Any) -> bytes:
    return bytes(dd_proto.DDSketchProto.to_proto(sketch).SerializeToString())


def dd_merge_encode(blobs: list[bytes]) -> bytes:
    merged = dd.DDSketch(ALPHA)
    for blob in blobs:
        merged.merge(dd_proto.DDSketchProto.from_proto(dd_pb.DDSketch.FromString(blob)))
    return dd_encode(merged)


def max_rel_error(answers: list[float], x: np.ndarray) -> float:
    worst = 0.0
    for q, got in zip(QS, answers, strict=True):
        want = float(np.quantile(x, q, method="lower"))
        if want:
            worst = max(worst, abs(got - want) / want)
        elif got:
            return float("inf")
    return worst


def row(name: str, ours: tuple[float, float], theirs: tuple[float, float] | None) -> str:
    cells = [name, f"{ours[0]:,.0f} / {ours[1]:,.0f}"]
    if theirs is None:
        cells += ["n/a", "n/a"]
    else:
        cells += [f"{theirs[0]:,.0f} / {theirs[1]:,.0f}", f"{theirs[0] / ours[0]:,.1f}x"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--values", type=int, default=5000, help="durations per batch / per part")
    parser.add_argument("--parts", type=int, default=24, help="encoded parts merged per fold")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--seed", type=int, default=20261123)
    parser.add_argument("--baseline", type=Path, help="an older pipeline/sketch.py to compare with")
    parser.add_argument("--small-only", action="store_true", help="only the small-sketch rows")
    parser.add_argument(
        "--alpha", type=float, default=DEFAULT_ALPHA, help="relative accuracy of both sketches"
    )
    args = parser.parse_args()
    global ALPHA
    ALPHA = args.alpha
    rng = np.random.default_rng(args.seed)
    batch = durations(rng, args.values)
    batch_list = batch.tolist()
    parts = [durations(rng, args.values) for _ in range(args.parts)]
    blobs = [QuantileSketch.from_values(p, ALPHA).to_bytes() for p in parts]
    everything = np.concatenate(parts)
    have_dd = dd is not None
    have_pb = dd_proto is not None
    print(f"python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}")
    baseline = load_baseline(args.baseline) if args.baseline else None
    small_sketches(np.random.default_rng(args.seed), args.values, args.repeat, baseline)
    if args.small_only:
        return
    print(f"\nalpha {ALPHA}, {args.values} values per batch, {args.parts} parts; µs best / median\n")

    print("| operation | pipeline.sketch | ddsketch | ratio |")
    print("|---|---|---|---|")
    n_add = max(1, 50_000 // args.values)
    print(
        row(
            f"add {args.values} (ndarray; ddsketch: list)",
            timed(lambda: QuantileSketch(ALPHA).add_many(batch), args.repeat, n_add),
            timed(lambda: dd_add(batch_list, False), args.repeat, 1) if have_dd else None,
        )
    )
    print(
        row(
            f"add {args.values} (list; ddsketch collapsing store)",
            timed(lambda: QuantileSketch(ALPHA).add_many(batch_list), args.repeat, n_add),
            timed(lambda: dd_add(batch_list, True), args.repeat, 1) if have_dd else None,
        )
    )
    dd_blobs = [dd_encode(dd_add(p.tolist(), False)) for p in parts] if have_pb else []
    print(
        row(
            f"decode + merge + encode {args.parts} parts",
            timed(
                lambda: merge_all((QuantileSketch.from_bytes(b) for b in blobs), ALPHA).to_bytes(),
                args.repeat,
                20,
            ),
            timed(lambda: dd_merge_encode(dd_blobs), args.repeat, 5) if have_pb else None,
        )
    )
    ours_sketches = [QuantileSketch.from_values(p, ALPHA) for p in parts]
    dd_sketches = [dd_add(p.tolist(), False) for p in parts] if have_dd else []

    def dd_merge_only() -> None:
        merged = dd.DDSketch(ALPHA)
        for sketch in dd_sketches:
            merged.merge(sketch)

    print(
        row(
            f"merge {args.parts} in-memory sketches",
            timed(lambda: merge_all(ours_sketches, ALPHA), args.repeat, 20),
            timed(dd_merge_only, args.repeat, 5) if have_dd else None,
        )
    )
    merged = merge_all(ours_sketches, ALPHA)
    dd_merged: Any = dd.DDSketch(ALPHA) if have_dd else None  # ddsketch is optional
    for sketch in dd_sketches:
        dd_merged.merge(sketch)
    print(
        row(
            "p50 + p95 + p99",
            timed(lambda: merged.quantiles((0.5, 0.95, 0.99)), args.repeat, 200),
            timed(lambda: [dd_merged.get_quantile_value(q) for q in (0.5, 0.95, 0.99)], args.repeat, 200)
            if have_dd
            else None,
        )
    )
    print(
        row(
            "encode one merged sketch",
            timed(merged.to_bytes, args.repeat, 200),
            timed(lambda: dd_encode(dd_merged), args.repeat, 50) if have_pb else None,
        )
    )
    encoded = merged.to_bytes()
    dd_blob = dd_encode(dd_merged) if have_pb else b""
    print(
        row(
            "decode one merged sketch",
            timed(lambda: QuantileSketch.from_bytes(encoded), args.repeat, 200),
            timed(
                lambda: dd_proto.DDSketchProto.from_proto(dd_pb.DDSketch.FromString(dd_blob)), args.repeat, 50
            )
            if have_pb
            else None,
        )
    )

    print("\nmax relative error over the lower quantiles", QS)
    print(f"  pipeline.sketch: {max_rel_error(merged.quantiles(QS), everything):.5f}")
    if have_dd:
        answers = [float(dd_merged.get_quantile_value(q)) for q in QS]
        print(f"  ddsketch:        {max_rel_error(answers, everything):.5f}")

    print("\nencoded bytes (ours chooses the smaller of sparse/dense; ddsketch proto has no min/max/sum)")
    print("| data | values | buckets | ours | sparse | dense | fixed int32+uint64 | ddsketch proto |")
    print("|---|---|---|---|---|---|---|---|")
    five_k = durations(rng, 5000)
    shapes: list[tuple[str, np.ndarray]] = [
        ("1 duration", five_k[:1]),
        ("10 durations", five_k[:10]),
        ("100 durations", five_k[:100]),
        ("5000 durations", five_k),
        (f"{args.parts} x {args.values} durations merged", everything),
        ("90 % zeros, 5000", np.where(rng.random(5000) < 0.9, 0, five_k)),
        (
            "bimodal 5 ms / 3 s, 5000",
            np.rint(np.where(rng.random(5000) < 0.5, 5, 3000) * rng.lognormal(0, 0.1, 5000)),
        ),
        ("every ms 0..1e7 (geometric 100k)", np.rint(np.geomspace(1, 1e7, 100_000))),
    ]
    for name, values in shapes:
        sketch = QuantileSketch.from_values(values, ALPHA)
        sizes = layout_sizes(sketch)
        dd_size = len(dd_encode(dd_add(values.tolist(), False))) if have_pb else None
        print(
            f"| {name} | {values.size:,} | {sketch.num_bins} | {len(sketch.to_bytes())} | "
            f"{sizes['sparse']} | {sizes['dense']} | {sizes['fixed']} | {dd_size if dd_size else 'n/a'} |"
        )


if __name__ == "__main__":
    main()
