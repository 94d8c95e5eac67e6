"""`omnilog produce`: the load generator (realistic gateway traffic, deterministic with --seed)."""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import aiokafka.errors as kafka_errors
import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.devtools.loadgen.generator import LoadConfig
from pipeline.devtools.loadgen.kafka import LoadResult, run_load
from pipeline.devtools.loadgen.summary import write_summary
from pipeline.settings import load_settings

_DEFAULT_COUNT = 10_000


def _parse_time(_ctx: click.Context, _param: click.Parameter, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"not an ISO 8601 time: {value!r}") from None
    if moment.tzinfo is None:
        raise click.BadParameter("give an offset, e.g. 2026-01-10T00:00:00Z")
    return moment.astimezone(UTC)


_fraction = click.FloatRange(0.0, 1.0)


@click.command("produce")
@click.option("--env-file", type=click.Path(path_type=Path), help="A .env-style file of settings.")
@click.option("--topic", help="Topic to produce to (default: OMNILOG_TOPIC).")
@click.option("--rate", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Messages per second; 0 = as fast as possible.")  # fmt: skip
@click.option("--count", type=click.IntRange(min=0), help=f"Messages to send (default {_DEFAULT_COUNT}).")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True),
              help="Seconds to run; with --rate and no --count, sends rate x duration messages.")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed + options = same bytes.")
@click.option("--base-time", callback=_parse_time,
              help="started_at of the newest events (ISO 8601 with offset; default: now).")  # fmt: skip
@click.option("--span-hours", type=click.FloatRange(min=0, min_open=True), default=24.0, show_default=True,
              help="Spread started_at over this many hours before --base-time.")  # fmt: skip
@click.option("--orgs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--servers-per-org", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--late-fraction", type=_fraction, default=0.0, show_default=True,
              help="Share of events started 1 h .. --late-max-hours before the span.")  # fmt: skip
@click.option("--late-max-hours", type=click.FloatRange(min=1), default=72.0, show_default=True)
@click.option("--duplicate-fraction", type=_fraction, default=0.0, show_default=True,
              help="Share of messages that re-send an earlier message byte for byte.")  # fmt: skip
@click.option("--invalid-fraction", type=_fraction, default=0.0, show_default=True,
              help="Share of invalid messages (not JSON, bad uuid, negative duration ...).")  # fmt: skip
@click.option("--compression", type=click.Choice(["none", "gzip"]), default="none", show_default=True)
@click.option("--summary", "summary_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Write the oracle (expected counts, aggregates, percentiles) here.")  # fmt: skip
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when on a terminal).")
def command(
    env_file: Path | None,
    topic: str | None,
    rate: float,
    count: int | None,
    duration: float | None,
    seed: int,
    base_time: datetime | None,
    span_hours: float,
    orgs: int,
    servers_per_org: int,
    late_fraction: float,
    late_max_hours: float,
    duplicate_fraction: float,
    invalid_fraction: float,
    compression: Literal["none", "gzip"],
    summary_path: Path | None,
    progress: bool | None,
) -> None:
    """Send synthetic gateway request events: Zipf-distributed tenants, a realistic method mix,
    log-normal latencies, errors, usage on model calls; optionally late, duplicate and invalid ones."""
    settings = load_settings(env_file)
    if count is None:
        if duration is None:
            count = _DEFAULT_COUNT
        elif rate > 0:
            count = int(rate * duration)
    if duplicate_fraction + invalid_fraction > 1:
        raise click.BadParameter("--duplicate-fraction + --invalid-fraction must be <= 1")
    config = LoadConfig(
        count=count,
        seed=seed,
        base_time=base_time or datetime.now(UTC),
        orgs=orgs,
        servers_per_org=servers_per_org,
        span_hours=span_hours,
        late_fraction=late_fraction,
        late_max_hours=late_max_hours,
        duplicate_fraction=duplicate_fraction,
        invalid_fraction=invalid_fraction,
    )
    target = topic or settings.topic
    show = sys.stderr.isatty() if progress is None else progress
    try:
        result = asyncio.run(
            _run(settings.kafka_bootstrap_servers, target, config, rate, duration, compression, show)
        )
    except (TimeoutError, kafka_errors.KafkaError, OSError) as exc:
        raise click.ClickException(
            f"kafka (OMNILOG_KAFKA_BOOTSTRAP_SERVERS={settings.kafka_bootstrap_servers}, topic {target}): "
            f"{type(exc).__name__}: {exc}"
        ) from None
    messages = result.summary["messages"]
    rate_done = result.sent / result.elapsed_s if result.elapsed_s > 0 else 0.0
    click.echo(
        f"sent {result.sent} messages to {target} in {result.elapsed_s:.1f} s ({rate_done:,.0f}/s, "
        f"{messages['value_bytes'] / 1e6:.1f} MB): {messages['valid']} valid, "
        f"{messages['duplicate']} duplicate, {messages['invalid']} invalid; "
        f"delivered {result.delivered}, failed {result.failed}"
    )
    if summary_path is not None:
        write_summary(
            summary_path,
            result.summary | {"delivery": {"delivered": result.delivered, "failed": result.failed}},
        )
        click.echo(f"summary: {summary_path}")
    if result.failed:
        raise click.ClickException(f"{result.failed} messages were not acknowledged by the broker")


async def _run(
    bootstrap: str,
    topic: str,
    config: LoadConfig,
    rate: float,
    duration: float | None,
    compression: Literal["none", "gzip"],
    show: bool,
) -> LoadResult:
    if not show:
        return await run_load(
            bootstrap, topic, config, rate=rate, duration_s=duration, compression=compression
        )
    columns = (TextColumn("producing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("produce", total=config.count)
        return await run_load(
            bootstrap,
            topic,
            config,
            rate=rate,
            duration_s=duration,
            compression=compression,
            progress=lambda sent: bar.update(task, completed=sent),
        )
