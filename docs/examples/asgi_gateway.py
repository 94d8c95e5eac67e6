"""A minimal MCP gateway (Starlette) that emits one Omnilog event per request.

Run it against the local stack:

    omnilog stack up && source .omnilog/stack.env && omnilog topics
    uvicorn --app-dir docs/examples asgi_gateway:app --port 8080
    curl -s localhost:8080/mcp/6f1d3c52-7a4e-4b8e-9a57-2f3f0e2a9c11 \
         -H 'x-organization-id: 0b8216fa-818e-4022-9db5-2062a5693267' \
         -H 'authorization: Bearer secret-token' \
         -d '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_docs"}}'

`OmnilogMiddleware` is plain ASGI, so it wraps any ASGI app (Starlette, FastAPI, Django ...). It
measures the request, captures a bounded prefix of both bodies, and emits with `emit_nowait`: the
request path never waits on Kafka — when the producer's buffer is full the event is dropped and
counted (`omnilog_producer_events_total{outcome="dropped"}`) instead. Secrets in headers and bodies are
redacted by the producer before anything leaves the process.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from pipeline.sdk.event_builder import GatewayRequestEvent
from pipeline.sdk.producer import EventProducer
from pipeline.settings import load_settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

BODY_CAPTURE_BYTES = 16 * 1024  # logged prefix of each body; bytes_in/out count everything
log = logging.getLogger(__name__)

LOGGED_HEADERS = ("user-agent", "authorization", "content-type", "mcp-protocol-version")


class OmnilogMiddleware:
    """Emit one gateway request event per HTTP request through `app.state.producer`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started_at = datetime.now(UTC)
        began = time.perf_counter()
        request_body = bytearray()
        response_body = bytearray()
        sizes = {"in": 0, "out": 0}
        status = {"code": 500}  # what the client sees if the app raises before responding

        async def receive_and_capture() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                sizes["in"] += len(chunk)
                request_body.extend(chunk[: BODY_CAPTURE_BYTES - len(request_body)])
            return message

        async def send_and_capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                sizes["out"] += len(chunk)
                response_body.extend(chunk[: BODY_CAPTURE_BYTES - len(response_body)])
            await send(message)

        try:
            await self.app(scope, receive_and_capture, send_and_capture)
        finally:
            duration_ms = int((time.perf_counter() - began) * 1000)
            producer: EventProducer | None = getattr(scope["app"].state, "producer", None)
            try:
                event = _event(
                    scope,
                    started_at,
                    duration_ms,
                    status["code"],
                    sizes,
                    bytes(request_body),
                    bytes(response_body),
                )
            except (ValueError, TypeError):
                # A request the event contract cannot describe must not fail the request itself.
                log.exception("cannot build the Omnilog event of %s %s", scope["method"], scope["path"])
                event = None
            if event is not None and producer is not None:
                producer.emit_nowait(event)


def _event(
    scope: Scope,
    started_at: datetime,
    duration_ms: int,
    status_code: int,
    sizes: dict[str, int],
    request_body: bytes,
    response_body: bytes,
) -> GatewayRequestEvent | None:
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
    organization_id = _uuid_or_none(headers.get("x-organization-id"))
    if organization_id is None:
        return None  # unauthenticated traffic is not a tenant's event (log it elsewhere)
    request = _json_or_text(request_body)
    rpc_method = request.get("method") if isinstance(request, dict) else None
    tool_name = None
    if rpc_method == "tools/call" and isinstance(request.get("params"), dict):
        tool_name = request["params"].get("name")
    server_id = scope.get("path_params", {}).get("server_id")
    client = scope.get("client")
    return GatewayRequestEvent(
        organization_id=organization_id,
        started_at=started_at,
        duration_ms=duration_ms,
        server_id=str(server_id) if server_id is not None else None,
        session_id=_uuid_or_none(headers.get("mcp-session-id")),
        rpc_method=rpc_method[:100] if isinstance(rpc_method, str) else None,
        status_code=status_code,
        bytes_in=sizes["in"],
        bytes_out=sizes["out"],
        user_id=headers.get("x-user-id", "")[:255] or None,
        remote_ip=client[0] if client else None,
        event_type="mcp_tool" if tool_name else None,
        mcp_tool_name=tool_name[:255] if isinstance(tool_name, str) else None,
        headers={name: headers[name] for name in LOGGED_HEADERS if name in headers},
        request=request,
        response=_json_or_text(response_body),
    )


def _uuid_or_none(value: str | None) -> str | None:
    if not value:
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def _json_or_text(body: bytes) -> Any:
    if not body:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")  # a truncated or non-JSON body, stored as text


# -- the gateway itself: a stand-in MCP endpoint ---------------------------------------------------


async def mcp_endpoint(request: Request) -> JSONResponse:
    try:
        call = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        return JSONResponse({"jsonrpc": "2.0", "error": {"code": -32700, "message": "parse error"}}, 400)
    method = call.get("method")
    if method == "tools/call":
        name = call.get("params", {}).get("name", "?")
        result: dict[str, Any] = {"content": [{"type": "text", "text": f"ran {name}"}]}
    elif method == "tools/list":
        result = {"tools": [{"name": "search_docs"}, {"name": "read_file"}]}
    else:
        error = {"code": -32601, "message": f"method not found: {method}"}
        return JSONResponse({"jsonrpc": "2.0", "id": call.get("id"), "error": error}, 404)
    return JSONResponse({"jsonrpc": "2.0", "id": call.get("id"), "result": result})


def create_app(bootstrap_servers: str | None = None, topic: str | None = None) -> Starlette:
    """The gateway app; Kafka settings default to OMNILOG_* (read at start-up, not import)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        settings = load_settings() if bootstrap_servers is None or topic is None else None
        bootstrap = bootstrap_servers or (settings.kafka_bootstrap_servers if settings else "")
        async with EventProducer(bootstrap, topic or (settings.topic if settings else "")) as producer:
            app.state.producer = producer
            yield
        # leaving the block closed the producer: every accepted event was delivered (or reported)

    app = Starlette(
        routes=[Route("/mcp/{server_id:uuid}", mcp_endpoint, methods=["POST"])], lifespan=lifespan
    )
    app.add_middleware(OmnilogMiddleware)
    return app


app = create_app()
