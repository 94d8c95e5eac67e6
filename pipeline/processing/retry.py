"""One retry policy for the whole worker: which errors are worth retrying, and how.

Every error a dependency call raises falls in one of three kinds, decided here and nowhere else:

- `RETRIABLE`: the dependency is unavailable for now (connection refused or lost, timeouts, S3 5xx
  and throttling, Kafka's retriable errors, PostgreSQL connection/resource/lock/serialization
  failures). Retried with jittered exponential backoff for as long as it lasts; each failed attempt
  is counted (`omnilog_retry_attempts_total{operation}`) and the start of the current run of
  failures is exported (`omnilog_retrying_since_timestamp_seconds`) so an alert fires when an
  operation has been retrying for minutes.
- `DATA`: a data error that one message may have caused (PostgreSQL data exceptions, constraint
  violations, program limits, or a value the client could not encode). Never retried as such: the
  caller isolates the message(s) at fault, or treats the error as fatal if no single message is.
- `FATAL`: anything else (authentication, missing tables, permissions, an S3 4xx such as a missing
  bucket, bugs). Retrying cannot help and looping would hide it: the worker stops with a non-zero
  exit and its readiness down.

Cancellation and the exceptions the caller asks to pass through (e.g. `Fenced`) are never retried.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import asyncpg
from aiokafka.errors import KafkaError, KafkaTimeoutError
from botocore.exceptions import BotoCoreError, ClientError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_random_exponential

from pipeline.metrics import WorkerMetrics

log = logging.getLogger("omnilog.retry")
T = TypeVar("T")


# Operations that are steps of a flush also count in omnilog_flush_failures_total{stage}, which
# dashboards and the OmnilogFlushFailing alert have read since before this policy existed.
_FLUSH_STAGE_OF = {
    "load_horizon": "postgres",
    "dlq": "dlq",
    "dlq_offload": "dlq",
    "upload": "upload",
    "postgres": "postgres",
    "postgres_isolate": "postgres",
}


class ErrorKind(enum.Enum):
    RETRIABLE = "retriable"
    DATA = "data"
    FATAL = "fatal"


# SQLSTATE classes (first two characters) and codes. https://www.postgresql.org/docs/15/errcodes-appendix.html
_PG_RETRIABLE_CLASSES = frozenset(
    {
        "08",  # connection exception
        "40",  # transaction rollback: serialization failure, deadlock
        "53",  # insufficient resources: too many connections, out of memory/disk
        "57",  # operator intervention: admin shutdown, cannot connect now, query canceled
        "58",  # system error (I/O)
    }
)
_PG_RETRIABLE_CODES = frozenset({"55P03", "55006"})  # lock not available, object in use
_PG_DATA_CLASSES = frozenset({"22", "23", "54"})  # data exception, integrity violation, program limit
_S3_RETRIABLE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
    }
)
# asyncpg raises InterfaceError both for a connection that went away and for API misuse (a bug);
# only the former is retriable.
_ASYNCPG_CONNECTION_LOST = ("connection is closed", "connection was closed", "pool is closing")


def classify(exc: BaseException) -> ErrorKind:
    """The kind of `exc` (see the module docstring). Unknown errors are FATAL: stop, don't loop."""
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        if state in _PG_RETRIABLE_CODES or state[:2] in _PG_RETRIABLE_CLASSES:
            return ErrorKind.RETRIABLE
        if state[:2] in _PG_DATA_CLASSES:
            return ErrorKind.DATA
        return ErrorKind.FATAL
    if isinstance(exc, asyncpg.InternalClientError):
        # A connection whose protocol state a dying server left half-way ("cannot switch to state
        # N; another operation is in progress", asyncpg #1069 / #784): seen when PostgreSQL stops
        # mid-query. Retried like a lost connection (visible in the retry metrics and alert if it
        # lasts); other internal errors are bugs, hence fatal.
        return ErrorKind.RETRIABLE if "another operation" in str(exc) else ErrorKind.FATAL
    if isinstance(exc, asyncpg.InterfaceError):
        if isinstance(exc, ValueError):  # asyncpg's client-side DataError: a value it cannot encode
            return ErrorKind.DATA
        message = str(exc)
        if any(text in message for text in _ASYNCPG_CONNECTION_LOST):
            return ErrorKind.RETRIABLE
        return ErrorKind.FATAL
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = exc.response.get("Error", {}).get("Code", "")
        if status >= 500 or status == 429 or code in _S3_RETRIABLE_CODES:
            return ErrorKind.RETRIABLE
        return ErrorKind.FATAL
    if isinstance(exc, BotoCoreError):
        # Connection, read/connect timeouts and HTTP client errors; credential and parameter
        # errors are configuration, hence fatal.
        name = type(exc).__name__
        if "Connect" in name or "Timeout" in name or "HTTPClient" in name or "Connection" in name:
            return ErrorKind.RETRIABLE
        return ErrorKind.FATAL
    if isinstance(exc, KafkaError):
        return ErrorKind.RETRIABLE if exc.retriable or isinstance(exc, KafkaTimeoutError) else ErrorKind.FATAL
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return ErrorKind.RETRIABLE
    if isinstance(exc, OSError):
        # Network-level failures (unreachable host, DNS) surface as plain OSError from asyncio.
        return ErrorKind.RETRIABLE
    if isinstance(exc, (UnicodeEncodeError, OverflowError)):
        return ErrorKind.DATA  # a value the database driver could not encode
    return ErrorKind.FATAL


async def _awaiting(fn: Callable[[], Awaitable[T]]) -> T:
    # tenacity calls a plain callable (a lambda returning a coroutine) without awaiting its result.
    return await fn()


class Stopped(Exception):
    """The worker was told to stop while an operation was still retrying."""


class PermanentError(Exception):
    """An operation failed with an error that retrying cannot fix (kind DATA or FATAL)."""

    def __init__(self, operation: str, kind: ErrorKind, cause: BaseException) -> None:
        super().__init__(f"{operation}: {type(cause).__name__}: {cause}")
        self.operation = operation
        self.kind = kind
        self.cause = cause


@dataclass
class RetryPolicy:
    """Retries RETRIABLE errors of one operation until it succeeds (or `stop` is set); raises
    `PermanentError` for the others. `passthrough` exceptions propagate untouched."""

    metrics: WorkerMetrics
    max_backoff_s: float
    on_dependency: Callable[[str, bool], None] = lambda name, ok: None
    passthrough: tuple[type[BaseException], ...] = ()
    min_backoff_s: float = 0.2
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    _since: dict[str, float] = field(default_factory=dict)

    async def call(
        self,
        operation: str,
        dependency: str,
        fn: Callable[[], Awaitable[T]],
        *,
        stop: asyncio.Event | None = None,
        passthrough: tuple[type[BaseException], ...] = (),
    ) -> T:
        """`fn()`'s result. Raises `Stopped` when `stop` is set while retrying, `PermanentError`
        for a DATA or FATAL error, and the `passthrough` exceptions (the policy's and the call's)
        as they are: those are outcomes the caller handles, not failures."""
        passthrough = self.passthrough + passthrough

        def retriable(exc: BaseException) -> bool:
            if isinstance(exc, passthrough) or (stop is not None and stop.is_set()):
                return False
            return classify(exc) is ErrorKind.RETRIABLE

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            self._failed(operation, dependency, state.attempt_number, exc)

        retrying = AsyncRetrying(
            retry=retry_if_exception(retriable),
            wait=wait_random_exponential(multiplier=self.min_backoff_s, max=self.max_backoff_s),
            before_sleep=before_sleep,
            sleep=self.sleep,
            reraise=True,
        )
        try:
            result: T = await retrying(_awaiting, fn)
        except BaseException as exc:
            if isinstance(exc, (asyncio.CancelledError, *passthrough)):
                raise
            if stop is not None and stop.is_set() and classify(exc) is ErrorKind.RETRIABLE:
                raise Stopped(operation) from exc
            if not isinstance(exc, Exception):
                raise
            kind = classify(exc)
            self.on_dependency(dependency, False)
            raise PermanentError(operation, kind, exc) from exc
        self._succeeded(operation, dependency)
        return result

    def _failed(self, operation: str, dependency: str, attempt: int, exc: BaseException | None) -> None:
        self.metrics.retry_attempts.labels(operation).inc()
        stage = _FLUSH_STAGE_OF.get(operation)
        if stage is not None:
            self.metrics.flush_failures.labels(stage).inc()
        if operation not in self._since:
            self._since[operation] = self.clock()
            self.metrics.retrying_since.labels(operation).set(self._since[operation])
        self.on_dependency(dependency, False)
        log.warning(
            "operation failed, retrying",
            extra={
                "operation": operation,
                "attempt": attempt,
                "failing_for_s": round(self.clock() - self._since[operation], 1),
                "error": f"{type(exc).__name__}: {exc}" if exc is not None else "?",
            },
        )

    def _succeeded(self, operation: str, dependency: str) -> None:
        if self._since.pop(operation, None) is not None:
            self.metrics.retrying_since.labels(operation).set(0)
        self.on_dependency(dependency, True)
