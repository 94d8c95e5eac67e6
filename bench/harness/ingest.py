"""End-to-end scenarios: `omnilog ingest` processes draining a backlog, or keeping up with a rate.

Drain time runs from the first consumed message (a worker's `omnilog_events_consumed_total`
leaves 0) to the moment the offsets stored in Postgres sum to the backlog size: worker start-up
and the group join are excluded, every commit (S3 + index + aggregates parts) is included.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench.harness import traffic
from bench.harness.env import BenchEnv, connect
from bench.harness.procs import Profiler, WorkerGroup, metric_sum
from pipeline.metrics import FLUSH_STAGES

_STALL_S = 60.0  # no offset progress for this long fails the scenario


@dataclass(frozen=True)
class Scenario:
    label: str
    workers: int
    backlog: int
    seed: int
    partitions: int = 8
    variant: str = "full"
    settings: tuple[tuple[str, str], ...] = ()  # extra OMNILOG_* settings (tuning experiments)


async def stored_total(conn: asyncpg.Connection, group: str, topic: str) -> int:
    value = await conn.fetchval(
        "SELECT coalesce(sum(next_offset), 0) FROM ingest_offsets WHERE consumer_group = $1 AND topic = $2",
        group,
        topic,
    )
    return int(value)


async def wait_offsets(url: str, group: str, topic: str, total: int, workers: WorkerGroup) -> float:
    """Poll (every 50 ms) until the stored offsets sum to `total`; returns that moment."""
    async with connect(url) as conn:
        last, last_change = -1, time.monotonic()
        while True:
            done = await stored_total(conn, group, topic)
            now = time.monotonic()
            if done >= total:
                return now
            if done != last:
                last, last_change = done, now
            elif now - last_change > _STALL_S:
                raise TimeoutError(f"{topic}: stuck at {done}/{total}; logs: {workers.log_paths()}")
            workers.check_alive()
            await asyncio.sleep(0.05)


def stage_seconds(scraped: list[dict[str, float]]) -> dict[str, float]:
    """Seconds spent per flush stage, summed over workers (from the stage histograms' sums)."""
    out = {}
    for stage in FLUSH_STAGES:
        key = f"omnilog_flush_stage_duration_seconds_sum{{stage={stage}}}"
        total = sum(m.get(key, 0.0) for m in scraped)
        if total:
            out[stage] = round(total, 3)
    return out


async def drain(
    env: BenchEnv, scenario: Scenario, log_dir: Path, profile_dir: Path | None = None
) -> dict[str, Any]:
    """Pre-produce the backlog, start the workers, time the drain."""
    bootstrap = env.info.kafka_bootstrap_servers
    topic = await env.new_topic(scenario.label, scenario.partitions)
    url = await env.new_database(scenario.label.replace("-", "_"))
    produced = await traffic.produce_backlog(bootstrap, topic, scenario.backlog, scenario.seed)
    group_name = env.name(scenario.label)
    workers = WorkerGroup.start(
        scenario.workers,
        {**env.worker_env(topic, url, group_name, 0), **dict(scenario.settings)},
        log_dir,
        scenario.label,
        scenario.variant,
    )
    profiler = None
    try:
        async with aiohttp.ClientSession() as session:
            first = await workers.wait_first_consume(session, timeout_s=90)
            if profile_dir is not None:
                profiler = Profiler.attach(workers.workers[0].pid, profile_dir)
            end = await wait_offsets(url, group_name, topic, produced.delivered, workers)
            if profiler is not None:
                await profiler.stop()
            scraped = await workers.scrape(session)
    finally:
        await workers.stop()
    async with connect(url) as conn:
        indexed = int(await conn.fetchval("SELECT count(*) FROM log_index"))
    if indexed != produced.delivered:
        raise RuntimeError(f"{scenario.label}: {indexed} rows indexed for {produced.delivered} events")
    seconds = end - first
    return {
        "workers": scenario.workers,
        "variant": scenario.variant,
        "settings": dict(scenario.settings),
        "events": produced.delivered,
        "seconds": round(seconds, 3),
        "events_per_s": round(produced.delivered / seconds, 1),
        "produce_seconds": round(produced.seconds, 3),
        "peak_rss_mib": [round(w.peak_rss / 2**20, 1) for w in workers.workers],
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


async def freshness(
    env: BenchEnv, rate: float, duration_s: float, seed: int, log_dir: Path, partitions: int = 8
) -> dict[str, Any]:
    """One worker, input at `rate` events/s with started_at = send time; commit − started_at."""
    label = "freshness"
    bootstrap = env.info.kafka_bootstrap_servers
    topic = await env.new_topic(label, partitions)
    url = await env.new_database(label)
    group_name = env.name(label)
    workers = WorkerGroup.start(1, env.worker_env(topic, url, group_name, 0), log_dir, label)
    try:
        async with aiohttp.ClientSession() as session:
            await workers.wait_ready(session, timeout_s=90)
            produced = await traffic.produce_at_rate(bootstrap, topic, rate, duration_s, seed)
            await wait_offsets(url, group_name, topic, produced.delivered, workers)
            scraped = await workers.scrape(session)
    finally:
        await workers.stop()
    async with connect(url) as conn:
        row = await conn.fetchrow(_FRESHNESS_SQL)
    assert row is not None
    name = "omnilog_freshness_seconds"
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
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
