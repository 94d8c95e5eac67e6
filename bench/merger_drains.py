"""Ordered drains that measure (and optionally profile) the separate `omnilog merge` process.

The same drain as `omnilog bench` and bench/ordered_drains.py (bench/harness/ingest.py: 1 worker +
1 `omnilog merge`, CPU per process between the first consume and the aggregates caught up), with:

- `--profile DIR`: py-spy attached to the merger for its whole life (DIR/<label>/profile.txt,
  collapsed stacks that `bench/harness/profile.py`'s `summarize` reads, and profile.svg);
- `--base SRC`: an A/B against another source tree (e.g. `git archive <commit> | tar -x -C SRC`):
  the drains alternate between the merger of SRC and the merger of this checkout (the worker is
  always this checkout's), so both sides see the same machine load, round after round.

    .venv/bin/python bench/merger_drains.py 200000 --rounds 3 --base /tmp/merger-base

Prints one JSON object per drain (merger µs/event, merger CPU seconds, drain and aggregates rates)
and the medians per side at the end. It starts its own embedded stack and removes it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.harness import ingest, procs
from bench.harness.env import BenchEnv, own_stack
from bench.harness.profile import summarize

_STOCK_OMNILOG = procs._OMNILOG
_STOCK_START = procs.WorkerGroup.start.__func__  # type: ignore[attr-defined]


@contextmanager
def merger_from(
    source: Path | None, profile_dir: Path | None, extra_env: dict[str, str] | None = None
) -> Iterator[list[procs.Profiler]]:
    """While open, `omnilog merge` processes run the code of `source` (None: this checkout) with
    `extra_env` added to their environment, and get py-spy attached when `profile_dir` is set; the
    profilers started are in the yielded list."""
    profilers: list[procs.Profiler] = []

    def start(cls: type[procs.WorkerGroup], *args: Any, **kwargs: Any) -> procs.WorkerGroup:
        merging = kwargs.get("command") == "merge"
        if merging and extra_env:
            args = (args[0], {**args[1], **extra_env}, *args[2:])
        if merging and source is not None:
            # `-c` puts the working directory first on sys.path: the source tree goes before it.
            procs._OMNILOG = f"import sys; sys.path.insert(0, {str(source)!r}); {_STOCK_OMNILOG}"
        try:
            group: procs.WorkerGroup = _STOCK_START(cls, *args, **kwargs)
        finally:
            procs._OMNILOG = _STOCK_OMNILOG
        if merging and profile_dir is not None:
            profiler = procs.Profiler.attach(group.workers[0].pid, profile_dir)
            if profiler is not None:
                profilers.append(profiler)
        return group

    procs.WorkerGroup.start = classmethod(start)  # type: ignore[method-assign,assignment]
    try:
        yield profilers
    finally:
        procs.WorkerGroup.start = classmethod(_STOCK_START)  # type: ignore[method-assign,assignment]


def _merger_figures(drained: dict[str, Any]) -> dict[str, Any]:
    merger = drained["cpu"]["aggregates"]["processes"]["merger"]
    return {
        "merger_us_per_event": merger["us_per_event"],
        "merger_cpu_s": merger["cpu_s"],
        "events_per_s": drained["events_per_s"],
        "aggregates_events_per_s": drained["aggregates_events_per_s"],
        "aggregates_lag_s": drained["aggregates_lag_s"],
        "merger_peak_rss_mib": drained["merger_peak_rss_mib"],
    }


async def run(
    sizes: list[int], rounds: int, base: Path | None, profile: Path | None, extra_env: dict[str, str]
) -> list[dict[str, Any]]:
    sides: list[tuple[str, Path | None]] = [("new", None)]
    if base is not None:
        sides = [("base", base), *sides]
    results: list[dict[str, Any]] = []
    logs = Path(tempfile.mkdtemp(prefix="omnilog-merger-"))
    print(json.dumps({"logs": str(logs)}), flush=True)
    with own_stack(None) as info:
        env = BenchEnv(info)
        await env.ensure_bucket()
        try:
            for round_no in range(rounds):
                # Alternate which side goes first, so neither always gets the warmer machine.
                for side, source in sides if round_no % 2 == 0 else sides[::-1]:
                    for size in sizes:
                        label = f"merger-{side}-{size}-{round_no}"
                        profile_dir = None if profile is None else profile / label
                        with merger_from(source, profile_dir, extra_env) as profilers:
                            scenario = ingest.Scenario(label, 1, size, seed=11, ordered=True)
                            drained = await ingest.drain(env, scenario, logs)
                        for profiler in profilers:
                            await profiler.stop()
                        row = {"side": side, "backlog": size, "round": round_no, **_merger_figures(drained)}
                        if profile_dir is not None and (profile_dir / "profile.txt").exists():
                            row["profile"] = summarize(profile_dir / "profile.txt", top=20)
                        results.append(row)
                        print(json.dumps(row, default=str), flush=True)
        finally:
            await env.cleanup()
    for side, _ in sides:
        for size in sizes:
            mine = [r["merger_us_per_event"] for r in results if r["side"] == side and r["backlog"] == size]
            print(
                json.dumps(
                    {"side": side, "backlog": size, "median_merger_us_per_event": statistics.median(mine)}
                )
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sizes", nargs="+", type=int, help="backlog sizes, one drain each per round and side")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--base", type=Path, help="source tree of the merger to compare against")
    parser.add_argument("--profile", type=Path, help="py-spy the merger, stacks under this directory")
    parser.add_argument(
        "--merger-env", action="append", default=[], metavar="NAME=VALUE", help="a setting of the merger only"
    )
    args = parser.parse_args()
    extra_env = dict(item.split("=", 1) for item in args.merger_env)
    asyncio.run(run(args.sizes, args.rounds, args.base, args.profile, extra_env))


if __name__ == "__main__":
    main()
