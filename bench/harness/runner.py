"""One benchmark run: every scenario, in an order where each reference is measured in the run."""

from __future__ import annotations

import asyncio
import platform
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from bench.harness import ceilings, ingest, traffic
from bench.harness.aggregates_stage import extension_rate
from bench.harness.env import BenchEnv
from bench.harness.peer_faust import run_peer
from bench.harness.profile import summarize

Log = Callable[[str], None]


@dataclass(frozen=True)
class Plan:
    """Sizes of one run. `quick` fits CI (under 2 minutes); `full` is what docs/performance.md cites."""

    mode: str
    backlog_1: int  # one worker; its peak RSS is the memory scenario (1 M in full mode)
    backlog_2: int
    ceiling_events: int
    peer_events: int
    freshness_s: float
    scaling_backlog: int
    variants_backlog: int  # 0: skip the cost-attribution variants

    @classmethod
    def quick(cls) -> Plan:
        return cls("quick", 30_000, 30_000, 30_000, 5_000, 8.0, 15_000, 0)

    @classmethod
    def full(cls) -> Plan:
        return cls("full", 1_000_000, 300_000, 200_000, 30_000, 30.0, 200_000, 200_000)


BIG_BATCHES = (
    ("OMNILOG_BATCH_MAX_EVENTS", "20000"),
    ("OMNILOG_BATCH_MAX_BYTES", str(64 * 2**20)),
    ("OMNILOG_MAX_INFLIGHT_BYTES", str(256 * 2**20)),
)

SCENARIOS = (
    "ceiling_kafka_aiokafka",
    "ceiling_kafka_confluent",
    "ceiling_copy",
    "ceiling_gzip",
    "ceiling_validate",
    "ceiling_index_transaction",
    "ingest_1_worker",
    "ingest_2_workers",
    "peer_faust",
    "freshness",
    "memory",
    "scaling_aggregates",
)


async def run(env: BenchEnv, plan: Plan, work_dir: Path, log: Log, profile: bool = False) -> dict[str, Any]:
    began = time.monotonic()
    logs = work_dir / "logs"
    results: dict[str, Any] = {}

    async def step(name: str, call: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        log(f"{name} ...")
        t0 = time.monotonic()
        result = await call()
        results[name] = result
        log(f"{name}: {_headline(result)} ({time.monotonic() - t0:.0f}s)")
        return result

    await env.ensure_bucket()

    # The 1-worker backlog doubles as the Kafka ceilings' input: the very same messages.
    one = ingest.Scenario("ingest-1", 1, plan.backlog_1, seed=1)
    profile_dir = work_dir / "profile" if profile else None
    e2e_1 = await step("ingest_1_worker", lambda: ingest.drain(env, one, logs, profile_dir))
    if profile_dir is not None and (profile_dir / "profile.txt").exists():
        e2e_1["profile"] = summarize(profile_dir / "profile.txt")
    topic_1 = env.name("ingest-1")
    bootstrap = env.info.kafka_bootstrap_servers
    await step("ceiling_kafka_aiokafka", lambda: ceilings.kafka_aiokafka(bootstrap, topic_1, plan.backlog_1))
    await step(
        "ceiling_kafka_confluent", lambda: ceilings.kafka_confluent_async(bootstrap, topic_1, plan.backlog_1)
    )
    await env.drop_topic(topic_1)

    values = traffic.values(plan.ceiling_events, seed=1)  # a prefix of the same backlog
    events = ceilings.validated(values)

    async def sync(call: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        return call()

    await step("ceiling_validate", lambda: sync(lambda: ceilings.validate(values)))
    await step("ceiling_gzip", lambda: sync(lambda: ceilings.gzip(values)))
    copy_db = await env.new_database("copy")
    await step("ceiling_copy", lambda: ceilings.copy(copy_db, events))
    tx_db = await env.new_database("tx")
    await step("ceiling_index_transaction", lambda: ceilings.index_transaction(tx_db, events))

    two = ingest.Scenario("ingest-2", 2, plan.backlog_2, seed=2)
    await step("ingest_2_workers", lambda: ingest.drain(env, two, logs))

    for variant in ("index-only", "no-merger") if plan.variants_backlog else ():
        await step(
            f"variant_{variant.replace('-', '_')}", _variant(env, variant, plan.variants_backlog, logs)
        )

    if plan.variants_backlog:
        # Tuning data point, not the default: 4x larger batches amortise the per-batch costs
        # (objects, the transaction, aggregate parts are per key, not per event).
        big = ingest.Scenario("batch-20k", 1, plan.variants_backlog, seed=3, settings=BIG_BATCHES)
        await step("tuning_batch_20k", lambda: ingest.drain(env, big, logs))

    await step("peer_faust", lambda: run_peer(env, plan.peer_events, seed=4, log_dir=logs))

    half = e2e_1["events_per_s"] / 2
    await step("freshness", lambda: ingest.freshness(env, half, plan.freshness_s, seed=5, log_dir=logs))

    results["memory"] = {
        "backlog_events": plan.backlog_1,
        "peak_rss_mib": max(e2e_1["peak_rss_mib"]),
        "measured_in": "ingest_1_worker",
    }
    await step("scaling_aggregates", lambda: _scaling(env, plan, logs, events))

    for name in ("ingest_1_worker", "ingest_2_workers"):
        results[name]["ratio_to"] = _ratios(results[name]["events_per_s"], results)
    results["peer_faust"]["ours_over_peer"] = round(
        e2e_1["events_per_s"] / results["peer_faust"]["events_per_s"], 2
    )
    return {
        "version": 1,
        "mode": plan.mode,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - began, 1),
        "machine": _machine(),
        "git_commit": _git_commit(),
        "traffic": {
            "generator": "pipeline.devtools.loadgen",
            "span_hours": traffic.SPAN_HOURS,
            "valid_only": True,
            "mean_value_bytes": round(sum(map(len, values)) / len(values), 1),
        },
        "plan": plan.__dict__,
        "scenarios": results,
        "targets": targets(results, plan),
    }


def _variant(
    env: BenchEnv, variant: str, backlog: int, logs: Path
) -> Callable[[], Awaitable[dict[str, Any]]]:
    scenario = ingest.Scenario(f"variant-{variant}", 1, backlog, seed=3, variant=variant)
    return lambda: ingest.drain(env, scenario, logs)


async def _scaling(env: BenchEnv, plan: Plan, logs: Path, events: list[Any]) -> dict[str, Any]:
    """Aggregate stage with 1 vs 3 writers, alone and inside whole workers."""
    out: dict[str, Any] = {"available": True}
    for writers in (1, 3):
        url = await env.new_database(f"agg{writers}")
        out[f"stage_{writers}"] = await extension_rate(url, events, writers)
    for workers in (1, 3):
        scenario = ingest.Scenario(f"scale-{workers}", workers, plan.scaling_backlog, seed=6)
        drained = await ingest.drain(env, scenario, logs)
        out[f"ingest_{workers}"] = {
            k: drained[k] for k in ("events", "seconds", "events_per_s", "flush_failures")
        }
    out["stage_3_over_1"] = round(out["stage_3"]["events_per_s"] / out["stage_1"]["events_per_s"], 2)
    out["ingest_3_over_1"] = round(out["ingest_3"]["events_per_s"] / out["ingest_1"]["events_per_s"], 2)
    return out


def _ratios(per_s: float, results: dict[str, Any]) -> dict[str, float]:
    refs = {
        "kafka_aiokafka": "ceiling_kafka_aiokafka",
        "copy": "ceiling_copy",
        "gzip": "ceiling_gzip",
        "index_transaction": "ceiling_index_transaction",
        "validate": "ceiling_validate",
    }
    return {short: round(per_s / results[name]["events_per_s"], 3) for short, name in refs.items()}


def targets(results: dict[str, Any], plan: Plan) -> list[dict[str, Any]]:
    e2e = results["ingest_1_worker"]
    rows = [
        ("end-to-end, 1 worker (events/s)", ">= 30000", e2e["events_per_s"], e2e["events_per_s"] >= 30_000),
        ("end-to-end / COPY ceiling", ">= 0.7", e2e["ratio_to"]["copy"], e2e["ratio_to"]["copy"] >= 0.7),
        ("end-to-end / faust peer", ">= 5", results["peer_faust"]["ours_over_peer"],
         results["peer_faust"]["ours_over_peer"] >= 5),
        ("freshness p99 at half rate (s)", "<= 5", results["freshness"]["p99_s"],
         results["freshness"]["p99_s"] <= 5),
        (f"worker peak RSS, {plan.backlog_1:,} backlog (MiB)", "<= 300", results["memory"]["peak_rss_mib"],
         results["memory"]["peak_rss_mib"] <= 300),
    ]  # fmt: skip
    return [{"target": t, "goal": g, "value": v, "met": bool(m)} for t, g, v, m in rows]


def _headline(result: dict[str, Any]) -> str:
    if "events_per_s" in result:
        return f"{result['events_per_s']:,.0f} events/s"
    if "p99_s" in result:
        return f"p50 {result['p50_s']} s, p99 {result['p99_s']} s"
    if "stage_3_over_1" in result:
        return f"stage 3/1 = {result['stage_3_over_1']}, ingest 3/1 = {result['ingest_3_over_1']}"
    return ""


def _machine() -> dict[str, Any]:
    return {
        "cpus": psutil.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_end": [round(x, 2) for x in psutil.getloadavg()],
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


__all__ = ["SCENARIOS", "Plan", "run"]
_ = asyncio  # scenarios are coroutines; the caller owns the loop
