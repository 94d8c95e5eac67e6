"""`omnilog merge`: run the aggregates merger as a process of its own until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import click

from pipeline.gc_tuning import tune_gc
from pipeline.log_format import configure_logging
from pipeline.settings import Settings, load_settings


@click.command("merge")
@click.option("--env-file", type=click.Path(path_type=Path), help="A .env-style file of settings.")
@click.option(
    "--shards", type=click.IntRange(1, 64), default=None, help="Shard count [default: OMNILOG_MERGE_SHARDS]."
)
@click.option(
    "--shard",
    type=click.IntRange(0, 63),
    default=None,
    help="Work on this shard only [default: OMNILOG_MERGE_SHARD, else every shard in turn].",
)
def command(env_file: Path | None, shards: int | None, shard: int | None) -> None:
    """Fold aggregate deltas into the rollups until SIGTERM/SIGINT (several may run at once)."""
    overrides: dict[str, object] = {}
    if shards is not None:
        overrides["OMNILOG_MERGE_SHARDS"] = shards
    if shard is not None:
        overrides["OMNILOG_MERGE_SHARD"] = shard
    settings = load_settings(env_file, **overrides)
    count = settings.merge_shards
    if settings.merge_shard is not None and settings.merge_shard >= count:
        raise click.UsageError(f"--shard / OMNILOG_MERGE_SHARD must be below the shard count ({count})")
    configure_logging(settings.log_level)
    sys.exit(asyncio.run(_run(settings)))


async def _run(settings: Settings) -> int:
    from consumers.merger.process import MergerProcess

    process = MergerProcess(settings)
    tune_gc(settings.gc_gen0_threshold)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, process.request_stop)
    return await process.run()
