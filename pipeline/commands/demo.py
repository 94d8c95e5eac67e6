"""`omnilog demo`: the main job in one command on the embedded stack."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click
from rich.console import Console


@click.command("demo")
@click.option("--count", type=click.IntRange(min=1000), default=200_000, show_default=True,
              help="Events to produce.")  # fmt: skip
@click.option("--workers", type=click.IntRange(1, 8), default=2, show_default=True)
@click.option("--root", type=click.Path(path_type=Path), help="Stack directory (default ./.omnilog).")
def command(count: int, workers: int, root: Path | None) -> None:
    """Stack up, migrate, produce, ingest with two workers, and show the results."""
    from pipeline.devtools.demo import default_options, run_demo

    sys.exit(asyncio.run(run_demo(default_options(root, count, workers), Console())))
