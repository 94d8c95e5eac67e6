"""`omnilog demo`: the whole job on the embedded stack, in one command.

Stack up, migrate, create topics, produce a realistic backlog, drain it with two ingest worker
processes, then show what an operator would look at: throughput, freshness of live traffic, an
index query, one event fetched from object storage, and the hourly aggregates.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import asyncpg
import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline.devtools.loadgen.generator import LoadConfig
from pipeline.devtools.loadgen.kafka import run_load
from pipeline.devtools.stack import Stack
from pipeline.kafka_admin import ensure_topics
from pipeline.settings import Settings, load_settings
from sinks.merger import merge_pass
from sinks.migrate import migrate
from sinks.objects import ObjectWriter, s3_client
from sinks.readpath import QueryFilter, get_event, query_index


@dataclass(frozen=True)
class DemoOptions:
    root: Path
    count: int = 200_000
    workers: int = 2
    seed: int = 42
    partitions: int = 8
    drain_timeout_s: float = 150.0


def _omnilog_executable() -> list[str]:
    found = shutil.which("omnilog") or str(Path(sys.executable).parent / "omnilog")
    return [found]


async def _indexed_count(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        count: int = await conn.fetchval("SELECT count(*) FROM log_index")
        return count
    finally:
        await conn.close()


class _Workers:
    """`omnilog ingest` subprocesses with their logs under the stack's log directory."""

    def __init__(self, count: int, env: dict[str, str], log_dir: Path) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []
        for n in range(count):
            log = (log_dir / f"demo-worker-{n}.log").open("ab")
            self._logs.append(log)
            self._procs.append(
                subprocess.Popen(
                    [*_omnilog_executable(), "ingest"],
                    env={**env, "OMNILOG_METRICS_PORT": "0"},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )

    def alive(self) -> bool:
        return all(p.poll() is None for p in self._procs)

    def stop(self, grace_s: float = 30.0) -> list[int]:
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = []
        for proc in self._procs:
            try:
                codes.append(proc.wait(timeout=grace_s))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
        for log in self._logs:
            log.close()
        return codes


async def run_demo(options: DemoOptions, console: Console) -> int:
    started = time.monotonic()
    console.rule("[bold]omnilog demo")
    console.print(f"1/6 starting the embedded stack in {options.root} …")
    info = Stack(options.root).up()
    env = {**os.environ, **info.env()}
    os.environ.update(info.env())
    settings = load_settings()
    database_url = settings.database_url.get_secret_value()

    console.print("2/6 migrating the database and creating topics …")
    await migrate(database_url)
    await ensure_topics(
        settings.kafka_bootstrap_servers, {settings.topic: options.partitions, settings.dlq_topic: 1}
    )
    before = await _indexed_count(database_url)

    console.print(
        f"3/6 producing {options.count:,} gateway events "
        "(8 orgs, 6 h of traffic, late/duplicate/invalid mix) …"
    )
    config = LoadConfig(
        count=options.count, seed=options.seed, orgs=8, servers_per_org=4, span_hours=6.0,
        late_fraction=0.01, late_max_hours=30.0, duplicate_fraction=0.01, invalid_fraction=0.005,
    )  # fmt: skip
    with Progress(TextColumn("   produce"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:  # fmt: skip
        task = progress.add_task("produce", total=options.count)
        load = await run_load(
            settings.kafka_bootstrap_servers, settings.topic, config,
            progress=lambda n: progress.update(task, completed=n),
        )  # fmt: skip
    messages = load.summary["messages"]
    expected = messages["valid"]
    console.print(
        f"   sent {load.sent:,} messages in {load.elapsed_s:.1f} s: {expected:,} valid, "
        f"{messages['duplicate']:,} re-sent duplicates, {messages['invalid']:,} invalid"
    )

    console.print(f"4/6 draining the backlog with {options.workers} ingest workers …")
    workers = _Workers(options.workers, env, info.root / "logs")
    try:
        drain_s = await _wait_indexed(
            database_url, before + expected, options.drain_timeout_s, workers, console
        )
        freshness = await _live_freshness(settings, database_url, console)
    finally:
        codes = workers.stop()
    console.print(f"   workers stopped (exit codes {codes})")

    console.print("5/6 results")
    _print_results(console, expected, drain_s, freshness)
    await _show_read_path(settings, database_url, console)
    busiest = await _show_aggregates(database_url, console)
    console.rule(f"done in {time.monotonic() - started:.0f} s")
    console.print(
        "The stack is still running. Try:\n"
        f"  source {info.root / 'stack.env'}\n"
        "  omnilog logs query --errors --limit 5\n"
        f"  omnilog aggregates show --org {busiest or '<org_id>'} --window hourly\n"
        "Stop it with: omnilog stack down   (add --purge to delete its data)"
    )
    return 0 if all(code == 0 for code in codes) else 1


async def _wait_indexed(
    database_url: str, target: int, timeout_s: float, workers: _Workers, console: Console
) -> float:
    began = time.monotonic()
    with Progress(TextColumn("   indexed"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:  # fmt: skip
        task = progress.add_task("index", total=target)
        while True:
            count = await _indexed_count(database_url)
            progress.update(task, completed=count)
            if count >= target:
                return time.monotonic() - began
            if not workers.alive():
                raise RuntimeError("an ingest worker exited early; see .omnilog/logs/demo-worker-*.log")
            if time.monotonic() - began > timeout_s:
                raise RuntimeError(f"backlog not drained after {timeout_s:.0f} s ({count:,}/{target:,})")
            await asyncio.sleep(0.25)


async def _live_freshness(
    settings: Settings, database_url: str, console: Console
) -> tuple[float, float, int]:
    """Send live traffic (started_at = now) for a few seconds; freshness = index time − started_at."""
    console.print("   measuring freshness with 5 s of live traffic at 2,000 events/s …")
    began = datetime.now(UTC)
    for second in range(5):
        config = LoadConfig(count=2000, seed=1000 + second, base_time=datetime.now(UTC), span_hours=1 / 3600)
        await run_load(settings.kafka_bootstrap_servers, settings.topic, config, rate=2000)
    await asyncio.sleep(settings.batch_max_age_s + 3)
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY s) AS p50,"
            "       percentile_cont(0.99) WITHIN GROUP (ORDER BY s) AS p99, count(*) AS n"
            "  FROM (SELECT extract(epoch FROM created_at - started_at) AS s FROM log_index"
            "         WHERE started_at >= $1::timestamptz - interval '2 seconds') AS t",
            began,
        )
    finally:
        await conn.close()
    assert row is not None
    return float(row["p50"] or 0.0), float(row["p99"] or 0.0), int(row["n"])


def _print_results(
    console: Console, indexed: int, drain_s: float, freshness: tuple[float, float, int]
) -> None:
    table = Table(title="ingest", show_header=False)
    table.add_row("events indexed", f"{indexed:,}")
    table.add_row("drain time", f"{drain_s:.1f} s")
    table.add_row("throughput", f"{indexed / drain_s:,.0f} events/s")
    p50, p99, n = freshness
    table.add_row("freshness (live traffic)", f"p50 {p50:.2f} s, p99 {p99:.2f} s over {n:,} events")
    console.print(table)


async def _show_read_path(settings: Settings, database_url: str, console: Console) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        rows, _ = await query_index(conn, QueryFilter(errors_only=True), limit=5)
        table = Table(title="omnilog logs query --errors --limit 5")
        for column in ("started_at", "org", "method", "status", "ms", "event_id"):
            table.add_column(column)
        for r in rows:
            table.add_row(
                r["started_at"].isoformat(timespec="seconds"), str(r["organization_id"])[:8],
                r["rpc_method"] or "-", str(r["status_code"]), str(r["duration_ms"]), str(r["id"]),
            )  # fmt: skip
        console.print(table)
        if rows:
            event_id = str(rows[0]["id"])
            async with s3_client(settings) as s3:
                line = await get_event(conn, ObjectWriter(s3, settings.s3_bucket, 1 << 30), event_id)
            event: dict[str, Any] = orjson.loads(line)
            shown = {k: v for k, v in event.items() if k not in ("request", "response", "headers")}
            console.print(f"[bold]omnilog logs get {event_id}[/bold] (bodies elided here):")
            console.print_json(orjson.dumps(shown).decode())
    finally:
        await conn.close()


async def _show_aggregates(database_url: str, console: Console) -> str | None:
    """Print the busiest organization's hourly rows; return its id."""
    conn = await asyncpg.connect(database_url)
    try:
        # The workers' merger runs every few seconds and stopped with them: fold the last parts.
        await merge_pass(conn)
        rows = await conn.fetch(
            "SELECT organization_id::text AS org, window_start, total_requests, error_requests,"
            "       p50_duration_ms, p95_duration_ms, p99_duration_ms, total_bytes_out"
            "  FROM log_aggregates"
            " WHERE window_type = 'hourly' AND server_id IS NULL AND rpc_method IS NULL"
            "   AND organization_id = (SELECT organization_id FROM log_aggregates"
            "                           GROUP BY 1 ORDER BY sum(total_requests) DESC LIMIT 1)"
            " ORDER BY window_start DESC LIMIT 8"
        )
    finally:
        await conn.close()
    if not rows:
        console.print("[yellow]hourly aggregates: none yet (the merger runs every OMNILOG_MERGE_INTERVAL_S)")
        return None
    table = Table(title="hourly log_aggregates, busiest organization (all servers, all methods)")
    for column in ("hour", "requests", "errors", "p50 ms", "p95 ms", "p99 ms", "bytes out"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            r["window_start"].strftime("%m-%d %H:00"), f"{r['total_requests']:,}", f"{r['error_requests']:,}",
            str(r["p50_duration_ms"]), str(r["p95_duration_ms"]), str(r["p99_duration_ms"]),
            f"{r['total_bytes_out']:,}",
        )  # fmt: skip
    console.print(table)
    org: str = rows[0]["org"]
    return org


def default_options(root: Path | None, count: int, workers: int) -> DemoOptions:
    from pipeline.devtools.stack.launcher import default_root

    return DemoOptions(root=root or default_root(), count=count, workers=workers)
