"""`omnilog ingest`: run one ingest worker until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import click

from pipeline.gc_tuning import tune_gc
from pipeline.log_format import configure_logging
from pipeline.settings import Settings, load_settings

log = logging.getLogger("omnilog.worker")

# Exit code of a worker that did not finish its shutdown in time and was ended by its watchdog.
EXIT_SHUTDOWN_OVERRAN = 3
# What a shutdown may take beyond OMNILOG_SHUTDOWN_GRACE_S: closing the Kafka clients and the pool
# (5 s each at most) and joining the merger thread.
_SHUTDOWN_MARGIN_S = 15.0


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
    tune_gc(settings.gc_gen0_threshold)
    loop = asyncio.get_running_loop()
    watchdog = _ShutdownWatchdog(settings.shutdown_grace_s + _SHUTDOWN_MARGIN_S)

    def stop() -> None:
        worker.request_stop()
        watchdog.arm()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    return await worker.run()


class _ShutdownWatchdog:
    """Ends the process if a requested shutdown overruns its budget.

    The worker's shutdown is bounded step by step, but a stop that never ends (a client call that
    hangs, a callback stuck in a group rebalance) would otherwise hold the pod until Kubernetes kills
    it, silently. Everything durable is already in PostgreSQL, so ending here is as safe as kill -9;
    the stacks of every thread are written to stderr first, so the hang can be found.
    """

    def __init__(self, budget_s: float) -> None:
        self._budget_s = budget_s
        self._timer: threading.Timer | None = None

    def arm(self) -> None:
        if self._timer is None:
            self._timer = threading.Timer(self._budget_s, self._fire)
            self._timer.daemon = True
            self._timer.start()

    def _fire(self) -> None:
        log.error(
            "shutdown overran its budget; ending the process (stacks on stderr)",
            extra={"budget_s": self._budget_s, "exit_code": EXIT_SHUTDOWN_OVERRAN},
        )
        faulthandler.dump_traceback(all_threads=True)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(EXIT_SHUTDOWN_OVERRAN)
