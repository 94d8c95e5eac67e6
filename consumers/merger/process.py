"""`omnilog merge`: the aggregates merger as a process of its own (docs/aggregates.md §3).

It runs the same `MergerLoop` a worker can run in-process, over the shards of its settings
(OMNILOG_MERGE_SHARDS, OMNILOG_MERGE_SHARD), with `/metrics`, `/healthz` and `/readyz` on the
metrics port like the worker. SIGTERM lets the round in progress finish (its passes commit or
roll back whole) and exits 0; a permanent error exits 1.
"""

from __future__ import annotations

import asyncio
import logging
import time

import asyncpg
from prometheus_client import CollectorRegistry

from consumers.ingest.health import HealthServer
from pipeline.metrics import WorkerMetrics
from pipeline.processing.retry import PermanentError
from pipeline.settings import Settings
from sinks.aggregates import build_merger_loop

log = logging.getLogger("omnilog.merger")

# A round over a large backlog is many passes; liveness is "a shard's passes finished lately".
LIVENESS_TIMEOUT_S = 300.0


class MergerProcess:
    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = WorkerMetrics(self.registry)
        self.loop = build_merger_loop(settings)
        self.health: HealthServer | None = None
        self._stop = asyncio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    def _readiness(self) -> tuple[bool, str]:
        if self.loop.rounds == 0:
            return False, "no merge round finished yet"
        return True, f"{self.loop.rounds} merge rounds"

    async def run(self) -> int:
        """Run until `request_stop`; returns the process exit code."""
        self.health = HealthServer(
            self.registry,
            self.settings.metrics_port,
            lambda: self.loop.last_progress,
            self._readiness,
            liveness_timeout_s=LIVENESS_TIMEOUT_S,
        )
        await self.health.start()
        shards = ", ".join(str(s) for s in self.loop.shards)
        log.info("merger starting", extra={"shards": shards, "metrics_port": self.health.bound_port})
        started = time.monotonic()
        try:
            # min_size 0: PostgreSQL down at start is a retriable error of the first round.
            pool = await asyncpg.create_pool(
                self.settings.database_url.get_secret_value(), min_size=0, max_size=1
            )
            assert pool is not None
            try:
                await self.loop(pool, self.metrics, self._stop)
            finally:
                await pool.close()
        except PermanentError as exc:
            log.exception("permanent error: stopping the merger", extra={"operation": exc.operation})
            return 1
        finally:
            await self.health.stop()
        log.info(
            "merger stopped", extra={"rounds": self.loop.rounds, "seconds": round(time.monotonic() - started)}
        )
        return 0
