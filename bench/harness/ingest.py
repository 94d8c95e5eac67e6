"""End-to-end scenarios: `omnilog ingest` processes draining a backlog, or keeping up with a rate.

Drain time runs from the first consumed message (a worker's `omnilog_events_consumed_total`
leaves 0) to the moment the offsets stored in Postgres sum to the backlog size: worker start-up
and the group join are excluded, every commit (S3 + index + aggregates parts) is included.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench.harness import statements, traffic
from bench.harness.cpu import CpuMeter, Tracked, usage_between
from bench.harness.env import BenchEnv, connect
from bench.harness.procs import Profiler, WorkerGroup, metric_sum
from bench.harness.services import listening_pids, ports
from bench.harness.stats import count_at, fifth_rates, percentile, visibility_lags
from pipeline.metrics import FLUSH_STAGES
from sinks.merger import pending_deltas

_STALL_S = 60.0  # no offset progress for this long fails the scenario
_AGGREGATES_STALL_S = 120.0  # no merger progress for this long after the index caught up
_TAG = statements.HARNESS_TAG
_COMMITTED_SQL = (
    f"{_TAG} SELECT coalesce(sum(next_offset), 0) FROM ingest_offsets"
    " WHERE consumer_group = $1 AND topic = $2"
)
# Every event counts once in its organization's hourly row (server and method "all").
_ROLLED_UP_SQL = (
    f"{_TAG} SELECT coalesce(sum(total_requests), 0) FROM log_aggregates"
    " WHERE window_type = 'hourly' AND server_id IS NULL AND rpc_method IS NULL"
)


@dataclass(frozen=True)
class Scenario:
    label: str
    workers: int
    backlog: int
    seed: int
    partitions: int = 8
    variant: str = "full"
    settings: tuple[tuple[str, str], ...] = ()  # extra OMNILOG_* settings (tuning experiments)
    ordered: bool = False  # started_at and event ids in arrival order (traffic.produce_backlog)

    @property
    def arrival(self) -> str:
        """How the backlog's events arrive, as results and reports name it (traffic.arrival)."""
        return traffic.arrival(self.ordered)

    @property
    def merger(self) -> bool:
        """The product folds deltas in one `omnilog merge` process; the variants fold none."""
        return self.variant == "full"


async def stored_total(conn: asyncpg.Connection, group: str, topic: str) -> int:
    return int(await conn.fetchval(_COMMITTED_SQL, group, topic))


async def rolled_up_total(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval(_ROLLED_UP_SQL))


async def wait_offsets(
    conn: asyncpg.Connection,
    group: str,
    topic: str,
    total: int,
    processes: list[WorkerGroup],
    began: float | None = None,
) -> tuple[float, list[tuple[float, int]]]:
    """Poll (every 50 ms) until the stored offsets sum to `total`; returns that moment and the
    progress samples (seconds since `began`, events committed), starting with (0, 0)."""
    began = time.monotonic() if began is None else began
    samples: list[tuple[float, int]] = [(0.0, 0)]
    last, last_change = -1, time.monotonic()
    while True:
        done = await stored_total(conn, group, topic)
        now = time.monotonic()
        if done != samples[-1][1]:
            samples.append((now - began, done))
        if done >= total:
            return now, samples
        if done != last:
            last, last_change = done, now
        elif now - last_change > _STALL_S:
            logs = [p for g in processes for p in g.log_paths()]
            raise TimeoutError(f"{topic}: stuck at {done}/{total}; logs: {logs}")
        for g in processes:
            g.check_alive()
        await asyncio.sleep(0.05)


async def wait_aggregates(conn: asyncpg.Connection, total: int, merger: WorkerGroup) -> float:
    """Poll (every 100 ms) until the merger folded every delta: the hourly rollups count `total`
    events and no delta waits (server deltas held for unregistered servers aside, as the merger
    itself does). Returns that moment."""
    last, last_change = -1, time.monotonic()
    while True:
        rolled = await rolled_up_total(conn)
        now = time.monotonic()
        if rolled >= total and await pending_deltas(conn) == 0:
            return time.monotonic()
        if rolled != last:
            last, last_change = rolled, now
        elif now - last_change > _AGGREGATES_STALL_S:
            raise TimeoutError(f"aggregates stuck at {rolled}/{total}; merger log: {merger.log_paths()}")
        merger.check_alive()
        await asyncio.sleep(0.1)


def stage_seconds(scraped: list[dict[str, float]]) -> dict[str, float]:
    """Seconds spent per flush stage, summed over workers (from the stage histograms' sums)."""
    out = {}
    for stage in FLUSH_STAGES:
        key = f"omnilog_flush_stage_duration_seconds_sum{{stage={stage}}}"
        total = sum(m.get(key, 0.0) for m in scraped)
        if total:
            out[stage] = round(total, 3)
    return out


async def _finished_or_none(task: asyncio.Task[float | None]) -> float | None:
    """The task's moment if it already found one; otherwise it is cancelled: None."""
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None
    return task.result()


def _all_active(
    at: float | None, first: float, end: float, progress: list[tuple[float, int]], events: int
) -> dict[str, float | None]:
    """When every worker was consuming (seconds after the first consume) and the rate from then
    to the index caught up."""
    if at is None or at >= end:
        return {"after_s": None, "events_per_s": None}
    done = count_at(progress, at - first)
    return {"after_s": round(at - first, 3), "events_per_s": round((events - done) / (end - at), 1)}


def _tracked(workers: WorkerGroup, merger: WorkerGroup | None, services: dict[str, int]) -> list[Tracked]:
    tracked = [Tracked("worker", workers.pids)]
    if merger is not None:
        tracked.append(Tracked("merger", merger.pids))
    tracked += [Tracked(name, (pid,)) for name, pid in services.items()]
    return tracked


def process_env(
    env: BenchEnv, topic: str, url: str, group: str, scenario_settings: dict[str, str]
) -> dict[str, str]:
    # The merger is a process of its own (as deployed on Kubernetes), so its CPU is its own line.
    return {**env.worker_env(topic, url, group, 0), "OMNILOG_MERGER_IN_WORKER": "false", **scenario_settings}


async def drain(
    env: BenchEnv,
    scenario: Scenario,
    log_dir: Path,
    profile_dir: Path | None = None,
    keep_topic: bool = False,
) -> dict[str, Any]:
    """Pre-produce the backlog, start the workers (and the merger), time the drain until the index
    and then the aggregates caught up, with per-process CPU and per-statement database time."""
    bootstrap = env.info.kafka_bootstrap_servers
    topic = await env.new_topic(scenario.label, scenario.partitions)
    db_name, url = await env.new_named_database(scenario.label.replace("-", "_"))
    produced = await traffic.produce_backlog(
        bootstrap, topic, scenario.backlog, scenario.seed, ordered=scenario.ordered
    )
    group_name = env.name(scenario.label)
    settings = process_env(env, topic, url, group_name, dict(scenario.settings))
    workers = WorkerGroup.start(scenario.workers, settings, log_dir, scenario.label, scenario.variant)
    merger = (
        WorkerGroup.start(1, settings, log_dir, scenario.label, command="merge") if scenario.merger else None
    )
    watched = [workers] + ([merger] if merger is not None else [])
    meter = CpuMeter(_tracked(workers, merger, listening_pids(ports(env.info))))
    events = produced.delivered
    profiler = None
    aggregates_end: float | None = None
    try:
        async with aiohttp.ClientSession() as session, connect(url) as conn:
            no_statements = await statements.prepare(conn)
            first = await workers.wait_first_consume(session, timeout_s=90)
            meter.mark("start")
            if no_statements is None:
                await statements.reset(conn)
            if profile_dir is not None:
                profiler = Profiler.attach(workers.workers[0].pid, profile_dir)
            # Several workers: also when the last one started consuming (a late joiner means the
            # first drained alone until the group rebalanced; the rate after it is the steady one).
            all_consumed = asyncio.create_task(workers.wait_all_consumed(session, timeout_s=600))
            end, progress = await wait_offsets(conn, group_name, topic, events, watched, began=first)
            meter.mark("index")
            all_at = await _finished_or_none(all_consumed)
            if profiler is not None:
                await profiler.stop()
            scraped = await workers.scrape(session)
            if merger is not None:
                aggregates_end = await wait_aggregates(conn, events, merger)
                meter.mark("aggregates")
            stats = (
                statements.unavailable(no_statements)
                if no_statements is not None
                else statements.summarize(await statements.read(conn), events)
            )
            indexed = int(await conn.fetchval(f"{_TAG} SELECT count(*) FROM log_index"))
            rolled = await rolled_up_total(conn) if merger is not None else None
    finally:
        await asyncio.gather(*(g.stop() for g in watched))
    if indexed != events:
        raise RuntimeError(f"{scenario.label}: {indexed} rows indexed for {events} events")
    if rolled is not None and rolled != events:
        raise RuntimeError(f"{scenario.label}: the hourly rollups count {rolled} events of {events}")
    if not keep_topic:
        await env.drop_topic(topic)
    await env.drop_named_database(db_name)  # a 5 M drain's tables are gigabytes
    seconds = end - first
    all_active = _all_active(all_at, first, end, progress, events) if scenario.workers > 1 else None
    marks = meter.marks
    cpu: dict[str, Any] = {"index": usage_between(marks["start"], marks["index"], events, meter.cpus)}
    if "aggregates" in marks:
        cpu["aggregates"] = usage_between(marks["start"], marks["aggregates"], events, meter.cpus)
    aggregates_s = None if aggregates_end is None else aggregates_end - first
    return {
        "workers": scenario.workers,
        "variant": scenario.variant,
        "arrival": scenario.arrival,
        "settings": dict(scenario.settings),
        "partitions": scenario.partitions,
        "events": events,
        "seconds": round(seconds, 3),
        "events_per_s": round(events / seconds, 1),
        "aggregates_seconds": None if aggregates_s is None else round(aggregates_s, 3),
        "aggregates_events_per_s": None if aggregates_s is None else round(events / aggregates_s, 1),
        "aggregates_lag_s": None if aggregates_s is None else round(aggregates_s - seconds, 3),
        "fifths_events_per_s": fifth_rates(progress, events),
        "all_workers_consuming": all_active,
        "produce_seconds": round(produced.seconds, 3),
        "produce_events_per_s": round(events / produced.seconds, 1),
        "peak_rss_mib": [round(w.peak_rss / 2**20, 1) for w in workers.workers],
        "merger_peak_rss_mib": None if merger is None else round(merger.workers[0].peak_rss / 2**20, 1),
        "cpu": cpu,
        "statements": stats,
        "stage_seconds": stage_seconds(scraped),
        "fenced_batches": sum(metric_sum(m, "omnilog_fenced_batches_total") for m in scraped),
        "flush_failures": sum(metric_sum(m, "omnilog_flush_failures_total") for m in scraped),
        "consumed_per_worker": [metric_sum(m, "omnilog_events_consumed_total") for m in scraped],
        "profiled": profile_dir is not None,
    }


_AGE = "extract(epoch FROM created_at - started_at)"
_FRESHNESS_SQL = (
    f"SELECT count(*) AS n, percentile_cont(0.5) WITHIN GROUP (ORDER BY {_AGE}) AS p50,"
    f" percentile_cont(0.99) WITHIN GROUP (ORDER BY {_AGE}) AS p99, max({_AGE}) AS worst FROM log_index"
)


def histogram_quantile(scraped: list[dict[str, float]], name: str, q: float) -> float | None:
    """Prometheus-style quantile (linear within a bucket) of a histogram summed over workers."""
    buckets: dict[float, float] = {}
    prefix = f"{name}_bucket{{le="
    for m in scraped:
        for key, value in m.items():
            if key.startswith(prefix):
                le = key[len(prefix) : -1]
                bound = float("inf") if le in ("+Inf", "inf") else float(le)
                buckets[bound] = buckets.get(bound, 0.0) + value
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total == 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-9)
        lower, below = bound, count
    return lower


async def _sample_visibility(
    url: str,
    group: str,
    topic: str,
    began: float,
    index: list[tuple[float, int]],
    rollups: list[tuple[float, int]],
    every_s: float = 0.5,
) -> None:
    """Every `every_s`: the events committed to the index and the events the hourly rollups count."""
    async with connect(url) as conn:
        while True:
            committed = await stored_total(conn, group, topic)
            t_index = time.monotonic() - began
            rolled = await rolled_up_total(conn)
            t_rollups = time.monotonic() - began
            index.append((t_index, committed))
            rollups.append((t_rollups, rolled))
            await asyncio.sleep(every_s)


async def freshness(
    env: BenchEnv, rate: float, duration_s: float, seed: int, log_dir: Path, partitions: int = 8
) -> dict[str, Any]:
    """One worker and the merger, input at `rate` events/s with started_at = send time:
    commit − started_at, and how long after their commit the rollups count the events."""
    label = "freshness"
    bootstrap = env.info.kafka_bootstrap_servers
    topic = await env.new_topic(label, partitions)
    url = await env.new_database(label)
    group_name = env.name(label)
    settings = process_env(env, topic, url, group_name, {})
    workers = WorkerGroup.start(1, settings, log_dir, label)
    merger = WorkerGroup.start(1, settings, log_dir, label, command="merge")
    index: list[tuple[float, int]] = []
    rollups: list[tuple[float, int]] = []
    sampler: asyncio.Task[None] | None = None
    try:
        async with aiohttp.ClientSession() as session, connect(url) as conn:
            await workers.wait_ready(session, timeout_s=90)
            sampler = asyncio.create_task(
                _sample_visibility(url, group_name, topic, time.monotonic(), index, rollups)
            )
            produced = await traffic.produce_at_rate(bootstrap, topic, rate, duration_s, seed)
            await wait_offsets(conn, group_name, topic, produced.delivered, [workers, merger])
            scraped = await workers.scrape(session)
            await wait_aggregates(conn, produced.delivered, merger)
            await asyncio.sleep(0.6)  # one more sample after the rollups caught up
    finally:
        if sampler is not None:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        await asyncio.gather(workers.stop(), merger.stop())
    async with connect(url) as conn:
        row = await conn.fetchrow(_FRESHNESS_SQL)
    assert row is not None
    name = "omnilog_freshness_seconds"
    lags = visibility_lags(index, rollups)
    return {
        "rate": round(rate, 1),
        "achieved_rate": round(produced.delivered / produced.seconds, 1),
        "duration_s": duration_s,
        "events": int(row["n"]),
        # created_at is the batch transaction's start: commit time minus the transaction's length.
        "p50_s": round(float(row["p50"]), 3),
        "p99_s": round(float(row["p99"]), 3),
        "max_s": round(float(row["worst"]), 3),
        # The worker's own histogram (clock_timestamp() at commit), bucketed: interpolated.
        "metric_p50_s": _round(histogram_quantile(scraped, name, 0.5)),
        "metric_p99_s": _round(histogram_quantile(scraped, name, 0.99)),
        # Rollups counting an event minus its commit to the index, sampled every 0.5 s.
        "aggregates_visible": {
            "samples": len(lags),
            "sample_every_s": 0.5,
            "p50_s": _round(percentile(lags, 0.5)),
            "p99_s": _round(percentile(lags, 0.99)),
            "max_s": _round(max(lags) if lags else None),
        },
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
