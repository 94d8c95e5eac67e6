"""The FastAPI application: routes, authentication and the app's lifetime (pool, S3 client).

Every tenant route authenticates the bearer key first (before its parameters are validated, so
an anonymous caller learns nothing about them), then reads inside `tenant_transaction`. The
organization is the key's, always: no route takes one as a parameter. The WHERE clauses name it
too, which lets the planner use the organization indexes; row security is what guarantees it.

Not `from __future__ import annotations`: FastAPI reads the routes' annotations at run time, and
the page-size bound in them is a value of the settings, local to `_routes`.
"""

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import Depends, FastAPI, Path, Query, Request, Security
from fastapi.openapi.utils import get_openapi
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel
from starlette.responses import PlainTextResponse, Response

from pipeline.api import problems
from pipeline.api.limits import RateLimiter, retry_after_header
from pipeline.api.middleware import ApiMetrics, GuardMiddleware
from pipeline.api.models import AggregateRow, AggregatesPage, Level, LogRow, LogsPage, UsagePage, UsageRow
from pipeline.api.problems import ApiProblem, Problem
from pipeline.api.tenancy import check_role, create_pool, tenant_transaction, tenant_transaction_on
from pipeline.settings import Settings
from sinks.aggregates import AggregatesQuery, query_log_aggregates, query_usage
from sinks.api_keys import AuthenticatedKey, authenticate, record_use
from sinks.buckets import RoutedObjects, load_routes
from sinks.db import Connection
from sinks.objects import s3_client
from sinks.readpath import (
    BodyError,
    NotFound,
    QueryFilter,
    decode_cursor,
    fetch_bodies,
    find_pointer,
    query_index,
)

log = logging.getLogger(__name__)

API_VERSION = "1.0.0"
DEFAULT_SPAN = timedelta(hours=24)
# A key's last use is written at most this often per process (the database function also
# throttles, across replicas).
_TOUCH_EVERY_S = 60.0
# Printable text only: PostgreSQL text cannot hold NUL, and control characters are no method,
# user or cursor anyone stores.
_TEXT = r"^[^\x00-\x1f\x7f]*$"


@dataclass
class ApiState:
    settings: Settings
    pool: "asyncpg.Pool[Any]"
    objects: RoutedObjects
    limiter: RateLimiter
    touched: dict[str, float] = field(default_factory=dict)


def _state(request: Request) -> ApiState:
    state: ApiState = request.app.state.api
    return state


_bearer = HTTPBearer(auto_error=False, description="An organization API key: `omnilog keys create`.")


_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="omnilog"'}


async def _verified(state: ApiState, conn: Connection, presented: str) -> AuthenticatedKey:
    """The key, its use recorded (at most once a minute) and its rate checked; else 401 / 429."""
    key = await authenticate(conn, presented)
    if key is None:
        raise ApiProblem(401, "unauthenticated", "unknown or revoked API key", _CHALLENGE)
    now = time.monotonic()
    if now - state.touched.get(key.id, -_TOUCH_EVERY_S) >= _TOUCH_EVERY_S:
        state.touched[key.id] = now
        await record_use(conn, key)
    wait = state.limiter.acquire(key.id)
    if wait > 0:
        raise ApiProblem(
            429, "rate-limited", "too many requests for this key", {"Retry-After": retry_after_header(wait)}
        )
    return key


def _presented(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None:
        raise ApiProblem(401, "unauthenticated", "an API key is required (Authorization: Bearer)", _CHALLENGE)
    return credentials.credentials


Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]


async def authenticated(request: Request, credentials: Credentials) -> AuthenticatedKey:
    """The key alone, on a connection that goes back to the pool at once (for routes that read
    object storage after the database, which should not hold a connection meanwhile)."""
    presented = _presented(credentials)
    state = _state(request)
    async with state.pool.acquire() as conn:
        return await _verified(state, conn, presented)


@dataclass(frozen=True)
class Tenant:
    key: AuthenticatedKey
    conn: Connection  # in the request's read-only transaction, app.current_org set to key's


async def tenant(request: Request, credentials: Credentials) -> AsyncIterator[Tenant]:
    """Authenticate and open the tenant transaction on one pooled connection (one acquisition
    per request); the transaction ends, and the connection returns, when the route returns."""
    presented = _presented(credentials)
    state = _state(request)
    async with state.pool.acquire() as conn:
        key = await _verified(state, conn, presented)
        async with tenant_transaction_on(conn, key):
            yield Tenant(key, conn)


Key = Annotated[AuthenticatedKey, Depends(authenticated)]
TenantScope = Annotated[Tenant, Depends(tenant, scope="function")]
Since = Annotated[datetime | None, Query(description="Start of the range (RFC 3339); default: until - 24 h.")]
Until = Annotated[datetime | None, Query(description="End of the range, exclusive (RFC 3339); default: now.")]
Window = Annotated[Literal["hourly", "daily"], Query()]


def _utc(value: datetime) -> datetime:
    """In UTC (naive means UTC); 400 for a time that leaves the representable range in UTC."""
    try:
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    except OverflowError:
        raise ApiProblem(400, "invalid-time", "time out of range") from None


def time_range(since: datetime | None, until: datetime | None, max_days: int) -> tuple[datetime, datetime]:
    """[since, until) with defaults, refused when reversed or longer than `max_days`."""
    end = _utc(until) if until is not None else datetime.now(UTC)
    try:
        start = _utc(since) if since is not None else end - DEFAULT_SPAN
    except OverflowError:
        start = datetime.min.replace(tzinfo=UTC)
    if start > end:
        raise ApiProblem(400, "invalid-range", "since is after until")
    if end - start > timedelta(days=max_days):
        raise ApiProblem(400, "range-too-long", f"a time range is limited to {max_days} days")
    return start, end


def _checked_cursor(cursor: str) -> str:
    """The cursor if it is one this API issued the shape of; 400 for anything else."""
    try:
        started, event_id = decode_cursor(cursor)
        uuid.UUID(event_id)
    except ValueError:
        raise ApiProblem(400, "invalid-cursor", "not a cursor returned by this API") from None
    if started.tzinfo is None:
        raise ApiProblem(400, "invalid-cursor", "not a cursor returned by this API")
    _utc(started)
    return cursor


def _log_row(row: dict[str, Any]) -> LogRow:
    def text(value: Any) -> str | None:
        return None if value is None else str(value)

    return LogRow(
        id=str(row["id"]),
        server_id=text(row["server_id"]),
        session_id=text(row["session_id"]),
        rpc_method=row["rpc_method"],
        level=row["level"],
        started_at=row["started_at"],
        duration_ms=row["duration_ms"],
        status_code=row["status_code"],
        error_flag=row["error_flag"],
        user_id=row["user_id"],
        remote_ip=text(row["remote_ip"]),
    )


def _json(page: BaseModel) -> Response:
    """The page serialised once, by pydantic-core (returning the model would have FastAPI
    validate it a second time against the route's response_model, which only documents it)."""
    return Response(page.model_dump_json(), media_type="application/json")


_PROBLEMS: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem, "description": description}
    for status, description in (
        (400, "A parameter is invalid"),
        (401, "No key, or an unknown or revoked key"),
        (413, "Request body too large"),
        (429, "Rate limit of the key exceeded"),
        (500, "Internal error"),
        (503, "The database is unavailable"),
        (504, "The request took too long"),
    )
}


def _routes(app: FastAPI, settings: Settings) -> None:
    max_page = settings.api_max_page_size
    max_days = settings.api_max_range_days

    @app.get(
        "/v1/logs",
        response_model=LogsPage,
        responses=_PROBLEMS,
        summary="Indexed requests of the key's organization, newest first",
        tags=["logs"],
    )
    async def logs(
        scope: TenantScope,
        since: Since = None,
        until: Until = None,
        server_id: Annotated[uuid.UUID | None, Query()] = None,
        session_id: Annotated[uuid.UUID | None, Query()] = None,
        method: Annotated[str | None, Query(max_length=100, pattern=_TEXT)] = None,
        level: Annotated[Level | None, Query()] = None,
        status: Annotated[int | None, Query(ge=0, le=999, description="HTTP status code")] = None,
        errors: Annotated[bool, Query(description="Only requests flagged as errors")] = False,
        user_id: Annotated[str | None, Query(max_length=255, pattern=_TEXT)] = None,
        limit: Annotated[int, Query(ge=1, le=max_page)] = 100,
        cursor: Annotated[str | None, Query(max_length=512, pattern=_TEXT)] = None,
    ) -> Response:
        start, end = time_range(since, until, max_days)
        flt = QueryFilter(
            organization_id=scope.key.organization_id,
            server_id=str(server_id) if server_id else None,
            session_id=str(session_id) if session_id else None,
            rpc_method=method,
            level=level,
            user_id=user_id,
            status_code=status,
            errors_only=errors,
            since=start,
            until=end,
        )
        rows, next_cursor = await query_index(
            scope.conn, flt, limit, _checked_cursor(cursor) if cursor else None
        )
        return _json(LogsPage(items=[_log_row(row) for row in rows], next_cursor=next_cursor))

    @app.get(
        "/v1/events/{event_id}",
        responses={
            200: {
                "description": "The stored event, byte for byte as the worker wrote it",
                "content": {"application/json": {"schema": {"type": "object"}}},
            },
            404: {"model": Problem, "description": "No such event in the key's organization"},
            502: {"model": Problem, "description": "The stored object could not be read"},
            **_PROBLEMS,
        },
        response_class=Response,
        summary="One stored event: one ranged GET of the gzip member that holds it",
        tags=["logs"],
    )
    async def event(request: Request, key: Key, event_id: Annotated[uuid.UUID, Path()]) -> Response:
        state = _state(request)
        canonical = str(event_id)
        async with tenant_transaction(state.pool, key) as conn:
            try:
                pointer = await find_pointer(conn, canonical)
            except NotFound:
                raise ApiProblem(404, "not-found", "no such event") from None
            if not pointer["object_uri"].startswith(f"s3://{state.objects.bucket}/"):
                # A customer-owned bucket (docs/storage.md): how to reach it, as of now. Row
                # security shows the key's own organization's rows only.
                state.objects.learn(await load_routes(conn))
        pointer["id"] = canonical
        # The connection is back in the pool before object storage is read.
        found = (await fetch_bodies(state.objects, [pointer], concurrency=1))[canonical]
        if isinstance(found, BodyError):
            log.warning("event %s: %s", canonical, found.reason)
            raise ApiProblem(502, "unreadable-event", "the stored event could not be read")
        return Response(found, media_type="application/json")

    @app.get(
        "/v1/aggregates",
        response_model=AggregatesPage,
        responses=_PROBLEMS,
        summary="Hourly or daily request aggregates with latency percentiles",
        tags=["aggregates"],
    )
    async def aggregates(
        scope: TenantScope,
        window: Window = "hourly",
        level: Annotated[
            Literal["org", "server", "method"] | None,
            Query(description="Rows per organization, server or method; default: from the filters"),
        ] = None,
        since: Since = None,
        until: Until = None,
        server_id: Annotated[uuid.UUID | None, Query()] = None,
        method: Annotated[str | None, Query(max_length=100, pattern=_TEXT)] = None,
    ) -> Response:
        start, end = time_range(since, until, max_days)
        chosen = level or ("method" if method is not None else "server" if server_id is not None else "org")
        query = AggregatesQuery(
            organization_id=scope.key.organization_id,
            window=window,
            since=start,
            until=end,
            level=chosen,
            server_id=str(server_id) if server_id else None,
            rpc_method=method,
        )
        rows = await query_log_aggregates(scope.conn, query)
        return _json(AggregatesPage(items=[AggregateRow.model_validate(row) for row in rows]))

    @app.get(
        "/v1/usage",
        response_model=UsagePage,
        responses=_PROBLEMS,
        summary="Hourly or daily usage per project and model, with unique users",
        tags=["usage"],
    )
    async def usage(
        scope: TenantScope, window: Window = "hourly", since: Since = None, until: Until = None
    ) -> Response:
        start, end = time_range(since, until, max_days)
        rows = await query_usage(scope.conn, scope.key.organization_id, window, start, end)
        return _json(UsagePage(items=[UsageRow.model_validate(row) for row in rows]))

    @app.get("/healthz", response_class=PlainTextResponse, tags=["operations"], summary="Liveness")
    async def healthz() -> str:
        return "ok\n"

    @app.get(
        "/readyz",
        response_class=PlainTextResponse,
        responses={503: {"model": Problem, "description": "PostgreSQL does not answer"}},
        tags=["operations"],
        summary="Readiness: PostgreSQL answers",
    )
    async def readyz(request: Request) -> str:
        try:
            async with asyncio.timeout(2.0), _state(request).pool.acquire() as conn:
                await conn.fetchval("SELECT 1")
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            raise ApiProblem(503, "not-ready", "PostgreSQL does not answer") from None
        return "ok\n"


def _problem_media_types(document: dict[str, Any]) -> dict[str, Any]:
    """Error responses are application/problem+json (FastAPI would say application/json), and
    invalid parameters are a 400 problem, not FastAPI's own 422 shape."""
    for path in document.get("paths", {}).values():
        for operation in path.values():
            responses = operation.get("responses", {})
            responses.pop("422", None)
            for status, response in responses.items():
                if status.isdigit() and int(status) >= 400:
                    response["content"] = {
                        problems.PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}
                    }
    schemas = document.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return document


def openapi_document(app: FastAPI) -> dict[str, Any]:
    document = get_openapi(
        title="Omnilog read API",
        version=API_VERSION,
        description=(
            "Logs, stored events, aggregates and usage of one organization: the one the API key "
            "belongs to. Errors are RFC 9457 problem details."
        ),
        routes=app.routes,
    )
    return _problem_media_types(document)


def _database_problems(app: FastAPI) -> None:
    """PostgreSQL cancelling a query (statement_timeout) is the request's timeout; PostgreSQL
    down or refusing connections is a 503 the client may retry. Neither says more than that."""

    async def cancelled(request: Request, exc: Exception) -> Response:
        return problems.problem_response(
            504, "the request took too long", slug="timeout", instance=request.url.path
        )

    async def unavailable(request: Request, exc: Exception) -> Response:
        log.warning("PostgreSQL unavailable: %s: %s", type(exc).__name__, exc)
        return problems.problem_response(
            503, "the database is unavailable", slug="unavailable", instance=request.url.path
        )

    app.add_exception_handler(asyncpg.QueryCanceledError, cancelled)
    for kind in (
        OSError,
        asyncpg.PostgresConnectionError,
        asyncpg.CannotConnectNowError,
        asyncpg.TooManyConnectionsError,
    ):
        app.add_exception_handler(kind, unavailable)


def create_app(settings: Settings, registry: CollectorRegistry | None = None) -> FastAPI:
    metrics = ApiMetrics(registry if registry is not None else CollectorRegistry())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            pool = await create_pool(
                settings.api_database_url.get_secret_value(),
                settings.api_pool_size,
                settings.api_request_timeout_s,
            )
            stack.push_async_callback(pool.close)
            async with pool.acquire() as conn:
                role = await check_role(conn)
            s3 = await stack.enter_async_context(s3_client(settings))
            objects = RoutedObjects(s3, settings.s3_bucket, settings.multipart_threshold_bytes)
            stack.push_async_callback(objects.aclose)  # the customer buckets' clients
            app.state.api = ApiState(
                settings=settings,
                pool=pool,
                objects=objects,
                limiter=RateLimiter(settings.api_rate_per_s, settings.api_rate_burst),
            )
            log.info("API ready as database role %s", role)
            yield

    app = FastAPI(
        lifespan=lifespan,
        openapi_url="/openapi.json",
        docs_url=None,
        redoc_url=None,
        title="Omnilog read API",
    )
    problems.install(app)
    _database_problems(app)
    _routes(app, settings)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    document: dict[str, Any] | None = None

    def cached_openapi() -> dict[str, Any]:
        nonlocal document
        if document is None:
            document = openapi_document(app)
        return document

    app.openapi = cached_openapi  # type: ignore[method-assign]
    app.add_middleware(
        GuardMiddleware,
        metrics=metrics,
        timeout_s=settings.api_request_timeout_s,
        max_body_bytes=settings.api_max_body_bytes,
    )
    return app
