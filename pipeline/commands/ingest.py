"""`omnilog ingest`: run one ingest worker until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import click

from pipeline.log_format import configure_logging
from pipeline.settings import Settings, load_settings


@click.command("ingest")
@click.option("--env-file", type=click.Path(path_type=Path), help="A .env-style file of settings.")
def command(env_file: Path | None) -> None:
    """Run one ingest worker (a consumer-group member) until SIGTERM/SIGINT."""
    settings = load_settings(env_file)
    configure_logging(settings.log_level)
    sys.exit(asyncio.run(_run(settings)))


async def _run(settings: Settings) -> int:
    from consumers.ingest.factory import build_worker

    worker = build_worker(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.request_stop)
    return await worker.run()
