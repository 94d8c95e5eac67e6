"""One-worker drains alone, by arrival order: does the rate hold as the data grows?

A live stream that fell behind arrives roughly in time order: `traffic.produce_backlog(ordered=True)`
makes started_at and the UUIDv7 event ids grow with the position, give or take 2 s, as `omnilog
bench` now does for every backlog. `--arrival random` spreads them at random over the hour instead
(every insert lands at a random place in `log_index`'s primary key and time indexes: the worst
case, and what `omnilog bench` did before). The drains are `omnilog bench`'s (bench/harness/ingest.py:
1 worker + 1 `omnilog merge`, CPU per process, pg_stat_statements) without the rest of the run. It
starts its own embedded stack and removes it.

    .venv/bin/python bench/ordered_drains.py 200000 1000000 5000000 --out bench/results/ordered-drains.json

About 12 minutes for those three sizes at ~15 k events/s; the 5 M backlog holds ~4 GiB in the
broker's memory until drained. One JSON object per drain is printed as it ends and written to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

from bench.harness import ingest, traffic
from bench.harness.env import BenchEnv, own_stack

KEPT = ("events", "events_per_s", "aggregates_events_per_s", "fifths_events_per_s", "peak_rss_mib", "cpu")


async def run(sizes: list[int], out: Path, ordered: bool = True) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    logs = Path(tempfile.mkdtemp(prefix="omnilog-ordered-"))
    with own_stack(None) as info:
        env = BenchEnv(info)
        await env.ensure_bucket()
        try:
            for size in sizes:
                scenario = ingest.Scenario(
                    f"{traffic.arrival(ordered)}-{size}", 1, size, seed=11, ordered=ordered
                )
                label = scenario.label
                drained = await ingest.drain(env, scenario, logs)
                await env.drop_topic(env.name(label))
                top = drained["statements"].get("top", [])[:5]
                row = {"backlog": size, "arrival": scenario.arrival, **{k: drained[k] for k in KEPT}}
                row["top_statements"] = top
                results.append(row)
                print(json.dumps(row, default=str), flush=True)
                text = json.dumps(results, indent=1, default=str) + "\n"
                await asyncio.to_thread(out.write_text, text)
        finally:
            await env.cleanup()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sizes", nargs="+", type=int, help="backlog sizes, one drain each")
    parser.add_argument("--out", type=Path, default=Path("bench/results/ordered-drains.json"))
    parser.add_argument(
        "--arrival", choices=(traffic.ORDERED, traffic.RANDOM), default=traffic.ORDERED,
        help="started_at and event ids growing with the position (default) or spread at random",
    )  # fmt: skip
    args = parser.parse_args()
    asyncio.run(run(args.sizes, args.out, ordered=args.arrival == traffic.ORDERED))


if __name__ == "__main__":
    main()
