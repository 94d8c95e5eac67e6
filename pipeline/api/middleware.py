"""One ASGI middleware around the whole app: request timeout, body-size limit and metrics.

Pure ASGI (not Starlette's BaseHTTPMiddleware) so the event body is not buffered twice and the
route template is read after routing, from the scope FastAPI fills in.
"""

from __future__ import annotations

import asyncio
import time

import orjson
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.api.problems import PROBLEM_MEDIA_TYPE, Problem

# Latency buckets for an index page or one ranged GET: 1 ms .. 30 s.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ApiMetrics:
    """The API's metrics, registered in `registry`; `route` is the path template, never the path."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "omnilog_api_requests_total",
            "API requests answered, by route template, method and status code",
            ["route", "method", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "omnilog_api_request_duration_seconds",
            "API request latency (until the last byte is sent), by route template and method",
            ["route", "method"],
            buckets=_BUCKETS,
            registry=registry,
        )


class _BodyTooLarge(Exception):
    pass


def _problem(status: int, slug: str, detail: str) -> bytes:
    from http import HTTPStatus

    return orjson.dumps(
        Problem(
            type=f"urn:omnilog:problem:{slug}", title=HTTPStatus(status).phrase, status=status, detail=detail
        ).model_dump(exclude_none=True)
    )


class GuardMiddleware:
    def __init__(self, app: ASGIApp, metrics: ApiMetrics, timeout_s: float, max_body_bytes: int) -> None:
        self._app = app
        self._metrics = metrics
        self._timeout_s = timeout_s
        self._max_body = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 500
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = int(message["status"])
                started = True
            await send(message)

        async def reply(code: int, slug: str, detail: str) -> None:
            body = _problem(code, slug, detail)
            await send_tracking(
                {
                    "type": "http.response.start",
                    "status": code,
                    "headers": [
                        (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send_tracking({"type": "http.response.body", "body": body})

        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self._max_body:
                    raise _BodyTooLarge
            return message

        try:
            if _declared_length(scope) > self._max_body:
                await reply(413, "body-too-large", f"request bodies are limited to {self._max_body} bytes")
                return
            async with asyncio.timeout(self._timeout_s):
                await self._app(scope, receive_limited, send_tracking)
        except _BodyTooLarge:
            if not started:
                await reply(413, "body-too-large", f"request bodies are limited to {self._max_body} bytes")
        except TimeoutError:
            if not started:
                await reply(504, "timeout", f"the request took longer than {self._timeout_s:g} s")
        finally:
            route = _route_template(scope)
            method = str(scope.get("method", ""))
            self._metrics.requests.labels(route, method, str(status)).inc()
            self._metrics.latency.labels(route, method).observe(time.perf_counter() - began)


def _declared_length(scope: Scope) -> int:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 1 << 62  # unparseable: treated as too large
    return 0


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"
