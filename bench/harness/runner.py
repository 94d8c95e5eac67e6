"""One benchmark run: every scenario, in an order where each reference is measured in the run."""

from __future__ import annotations

import asyncio
import platform
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from bench.harness import ceilings, ingest, traffic
from bench.harness.aggregates_stage import extension_rate
from bench.harness.env import BenchEnv
from bench.harness.peer_faust import run_peer
from bench.harness.profile import summarize
from bench.harness.stats import ratio
from bench.harness.targets import targets

Log = Callable[[str], None]


@dataclass(frozen=True)
class Plan:
    """Sizes of one run. `quick` fits CI (about 2 minutes); `full` is what docs/performance.md cites."""

    mode: str
    drains: tuple[int, ...]  # one worker each, ascending; the 1 M one (else the largest) is the reference
    ceiling_events: int
    peer_events: int
    freshness_s: float
    scaling_backlog: int
    scaling_workers: tuple[int, ...]
    stage_events: int  # the aggregate stage alone, 1 and 3 writers
    variants_backlog: int  # 0: skip the cost-attribution variants
    # Every backlog arrives in time order (a gateway's stream that fell behind: traffic.py), and
    # one more drain of the reference size arrives in random order, labelled as the worst case.
    ordered: bool = True
    random_drain: bool = True

    @classmethod
    def quick(cls) -> Plan:
        # Quick: the 4-worker point is the 2-worker code path again, and each drain's start-up
        # (imports, group join) costs more than its events: 1 and 2 workers only.
        return cls("quick", (30_000,), 30_000, 5_000, 8.0, 30_000, (1, 2), 10_000, 0)

    @classmethod
    def full(cls) -> Plan:
        return cls("full", FULL_DRAINS, 200_000, 30_000, 30.0, 200_000, (1, 2, 4), 200_000, 200_000)

    def with_drains(self, sizes: tuple[int, ...]) -> Plan:
        return replace(self, drains=tuple(sorted(set(sizes))))

    def without_random_drain(self) -> Plan:
        return replace(self, random_drain=False)

    def with_arrival(self, ordered: bool) -> Plan:
        """Random arrival everywhere leaves no ordered drain to compare a worst case with."""
        return replace(self, ordered=ordered, random_drain=self.random_drain and ordered)

    @property
    def arrival(self) -> str:
        return traffic.arrival(self.ordered)

    def one_worker_drains(self) -> list[tuple[str, ingest.Scenario]]:
        """(result key, scenario) of the 1-worker drains, smallest first, then the worst case:
        the reference size again in random order."""
        drains = [(drain_key(size), self._scenario(drain_key(size), 1, size, 1)) for size in self.drains]
        if self.random_drain:
            worst = drain_key(self.reference_drain, traffic.RANDOM)
            drains.append((worst, replace(self._scenario(worst, 1, self.reference_drain, 1), ordered=False)))
        return drains

    def scaling_scenarios(self) -> dict[int, ingest.Scenario]:
        """Workers -> scenario on the scaling backlog (same seed as the drains: the same events)."""
        return {n: self._scenario(f"scale-{n}", n, self.scaling_backlog, 1) for n in self.scaling_workers}

    def variant_scenarios(self) -> list[tuple[str, ingest.Scenario]]:
        """(result key, scenario) of the cost-attribution variants; none when variants_backlog is 0."""
        if not self.variants_backlog:
            return []
        return [
            (f"variant_{v.replace('-', '_')}", self._scenario(f"variant-{v}", 1, self.variants_backlog, 3, v))
            for v in ("index-only", "no-merger")
        ]

    def _scenario(
        self, key: str, workers: int, size: int, seed: int, variant: str = "full"
    ) -> ingest.Scenario:
        label = key.replace("_", "-")
        return ingest.Scenario(label, workers, size, seed=seed, variant=variant, ordered=self.ordered)

    @property
    def reference_drain(self) -> int:
        """The drain the throughput, CPU and ceiling comparisons use: 1 M events if chosen."""
        return REFERENCE_DRAIN if REFERENCE_DRAIN in self.drains else max(self.drains)


FULL_DRAINS = (200_000, 1_000_000, 5_000_000)
REFERENCE_DRAIN = 1_000_000

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
    "scaling_workers",
)


def drain_key(events: int, arrival: str = traffic.ORDERED) -> str:
    """`drain_200k`, `drain_1m`, `drain_5m`, `drain_30k` ...; the worst case `drain_1m_random`."""
    if events % 1_000_000 == 0:
        key = f"drain_{events // 1_000_000}m"
    elif events % 1_000 == 0:
        key = f"drain_{events // 1_000}k"
    else:
        key = f"drain_{events}"
    return key if arrival == traffic.ORDERED else f"{key}_{arrival}"


def parse_sizes(text: str) -> tuple[int, ...]:
    """`200000,1M,5m,30k` -> (30000, 200000, 1000000, 5000000)."""
    sizes = []
    for part in text.split(","):
        token = part.strip().lower().replace("_", "")
        if not token:
            continue
        scale = {"k": 1_000, "m": 1_000_000}.get(token[-1], 1)
        number = token[:-1] if scale != 1 else token
        if not number.isdigit() or int(number) * scale <= 0:
            raise ValueError(f"not a drain size: {part!r} (e.g. 200000, 200k, 1m)")
        sizes.append(int(number) * scale)
    if not sizes:
        raise ValueError("no drain size given")
    return tuple(sorted(set(sizes)))


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

    # One worker on each backlog size, smallest first. The reference drain's topic is kept: the
    # Kafka ceilings read those very messages.
    reference = plan.reference_drain
    profile_dir = work_dir / "profile" if profile else None
    reference_key = drain_key(reference)
    for key, scenario in plan.one_worker_drains():
        is_ref = key == reference_key
        await step(
            key,
            lambda s=scenario, r=is_ref: ingest.drain(  # type: ignore[misc]
                env, s, logs, profile_dir if r else None, keep_topic=r
            ),
        )
    e2e_1 = results[reference_key]
    if plan.random_drain:
        worst = results[drain_key(reference, traffic.RANDOM)]
        worst["ratio_to_ordered"] = _ratio_to_ordered(worst, e2e_1)
    results["ingest_1_worker"] = e2e_1
    if profile_dir is not None and (profile_dir / "profile.txt").exists():
        e2e_1["profile"] = summarize(profile_dir / "profile.txt")
    topic_1 = env.name(reference_key.replace("_", "-"))
    bootstrap = env.info.kafka_bootstrap_servers
    await step("ceiling_kafka_aiokafka", lambda: ceilings.kafka_aiokafka(bootstrap, topic_1, reference))
    await step(
        "ceiling_kafka_confluent", lambda: ceilings.kafka_confluent_async(bootstrap, topic_1, reference)
    )
    await env.drop_topic(topic_1)

    # The first events of the same backlog, arriving as the drains' did.
    values = traffic.values(plan.ceiling_events, seed=1, ordered=plan.ordered)
    events = ceilings.validated(values)

    async def sync(call: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        return call()

    await step("ceiling_validate", lambda: sync(lambda: ceilings.validate(values)))
    await step("ceiling_gzip", lambda: sync(lambda: ceilings.gzip(values)))
    copy_db = await env.new_database("copy")
    await step("ceiling_copy", lambda: ceilings.copy(copy_db, events))
    tx_db = await env.new_database("tx")
    await step("ceiling_index_transaction", lambda: ceilings.index_transaction(tx_db, events))

    await step("scaling_workers", lambda: _scaling_workers(env, plan, logs, results))
    results["ingest_2_workers"] = results["scaling_workers"].get("workers_2", {})

    for key, scenario in plan.variant_scenarios():
        await step(key, lambda s=scenario: ingest.drain(env, s, logs))  # type: ignore[misc]

    await step("peer_faust", lambda: run_peer(env, plan.peer_events, seed=4, log_dir=logs))

    half = e2e_1["events_per_s"] / 2
    await step("freshness", lambda: ingest.freshness(env, half, plan.freshness_s, seed=5, log_dir=logs))

    drained = {key: max(results[key]["peak_rss_mib"]) for key in results if key.startswith("drain_")}
    results["memory"] = {
        "backlog_events": max(plan.drains),
        "peak_rss_mib": max(drained.values()),
        "peak_rss_mib_per_drain": drained,
        "measured_in": drain_key(max(plan.drains)),
    }
    await step("scaling_aggregates", lambda: _stage_scaling(env, plan.stage_events, events))

    for name in ("ingest_1_worker", "ingest_2_workers"):
        if "events_per_s" in results[name]:
            results[name]["ratio_to"] = _ratios(results[name]["events_per_s"], results)
    results["peer_faust"]["ours_over_peer"] = round(
        e2e_1["events_per_s"] / results["peer_faust"]["events_per_s"], 2
    )
    return {
        "version": 3,
        "mode": plan.mode,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - began, 1),
        "machine": _machine(),
        "git_commit": _git_commit(),
        "traffic": {
            "generator": "pipeline.devtools.loadgen",
            "span_hours": traffic.SPAN_HOURS,
            # Every drain and ceiling unless its own "arrival" says otherwise (drain_*_random).
            "arrival": plan.arrival,
            "order_jitter_ms": traffic.ORDER_JITTER_MS if plan.ordered else None,
            "valid_only": True,
            "mean_value_bytes": round(sum(map(len, values)) / len(values), 1),
        },
        "plan": {**plan.__dict__, "reference_drain": reference},
        "scenarios": results,
        "targets": targets(results),
    }


async def _scaling_workers(env: BenchEnv, plan: Plan, logs: Path, done: dict[str, Any]) -> dict[str, Any]:
    """1, 2, 4 ... workers (and the one merger) on the same backlog over 8 partitions. The
    1-worker point is the 1-worker drain of that size when the run has one (same seed: the same
    events), so it is not drained twice."""
    out: dict[str, Any] = {"backlog": plan.scaling_backlog, "partitions": 8}
    for workers, scenario in plan.scaling_scenarios().items():
        if workers == 1 and plan.scaling_backlog in plan.drains:
            out["workers_1"] = done[drain_key(plan.scaling_backlog)]
            continue
        out[f"workers_{workers}"] = await ingest.drain(env, scenario, logs)
    base = out.get("workers_1", {}).get("events_per_s")
    for workers in plan.scaling_workers:
        if workers != 1:
            out[f"speedup_{workers}_over_1"] = ratio(out[f"workers_{workers}"]["events_per_s"], base, 2)
    return out


async def _stage_scaling(env: BenchEnv, count: int, events: list[Any]) -> dict[str, Any]:
    """The aggregate stage alone (batch extensions, no worker) with 1 vs 3 writers."""
    out: dict[str, Any] = {"available": True}
    for writers in (1, 3):
        url = await env.new_database(f"agg{writers}")
        out[f"stage_{writers}"] = await extension_rate(url, events[:count], writers)
    out["stage_3_over_1"] = round(out["stage_3"]["events_per_s"] / out["stage_1"]["events_per_s"], 2)
    return out


def _ratio_to_ordered(worst: dict[str, Any], ordered: dict[str, Any]) -> dict[str, float | None]:
    """The random-arrival drain's rates over the same-size drain in arrival order."""
    return {
        key: ratio(worst.get(key), ordered.get(key)) for key in ("events_per_s", "aggregates_events_per_s")
    }


def _ratios(per_s: float, results: dict[str, Any]) -> dict[str, float]:
    refs = {
        "kafka_aiokafka": "ceiling_kafka_aiokafka",
        "copy": "ceiling_copy",
        "gzip": "ceiling_gzip",
        "index_transaction": "ceiling_index_transaction",
        "validate": "ceiling_validate",
    }
    return {short: round(per_s / results[name]["events_per_s"], 3) for short, name in refs.items()}


def _headline(result: dict[str, Any]) -> str:
    if result.get("aggregates_events_per_s"):
        return (
            f"{result['events_per_s']:,.0f} events/s to the index, "
            f"{result['aggregates_events_per_s']:,.0f} with the aggregates"
        )
    if "events_per_s" in result:
        return f"{result['events_per_s']:,.0f} events/s"
    if "p99_s" in result:
        return f"p50 {result['p50_s']} s, p99 {result['p99_s']} s"
    if "stage_3_over_1" in result:
        return f"stage 3/1 = {result['stage_3_over_1']}"
    speedups = [f"{k.split('_')[1]}/1 = {v}" for k, v in result.items() if k.startswith("speedup_")]
    if speedups:
        return ", ".join(speedups)
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
