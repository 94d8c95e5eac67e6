"""`/metrics`, `/healthz` and `/readyz` on the metrics port (docs/contract.md §7).

Liveness means the poll loop is making progress (a stuck loop gets the pod restarted);
readiness means the worker is consuming and its dependencies answered on their last call.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


class HealthServer:
    def __init__(
        self,
        registry: CollectorRegistry,
        port: int,
        last_loop_progress: Callable[[], float],
        ready: Callable[[], tuple[bool, str]],
        liveness_timeout_s: float = 60.0,
        host: str = "0.0.0.0",
    ) -> None:
        self._registry = registry
        self._port = port
        self._host = host
        self._last_loop_progress = last_loop_progress
        self._ready = ready
        self._liveness_timeout_s = liveness_timeout_s
        self._runner: web.AppRunner | None = None
        self.bound_port: int | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        server = site._server  # aiohttp exposes no public accessor for the bound port
        sockets = getattr(server, "sockets", None) or []
        self.bound_port = sockets[0].getsockname()[1] if sockets else self._port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        age = time.monotonic() - self._last_loop_progress()
        if age > self._liveness_timeout_s:
            return web.Response(status=503, text=f"poll loop stalled for {age:.0f}s\n")
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        ok, why = self._ready()
        return web.Response(status=200 if ok else 503, text=why + "\n")
