"""The worker's one retry policy: errors classified once, retriable ones retried and counted,
permanent ones raised at once; bisection finds the messages at fault."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import asyncpg
import pytest
from aiokafka.errors import KafkaConnectionError, KafkaTimeoutError, MessageSizeTooLargeError
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError
from prometheus_client import CollectorRegistry

from pipeline.metrics import WorkerMetrics
from pipeline.processing.isolate import find_culprits
from pipeline.processing.retry import ErrorKind, PermanentError, RetryPolicy, Stopped, classify


def _pg(sqlstate: str) -> asyncpg.PostgresError:
    cls = asyncpg.PostgresError.get_message_class_for_sqlstate(sqlstate)  # type: ignore[attr-defined]
    return cls(f"sqlstate {sqlstate}")


def _s3(status: int, code: str) -> ClientError:
    return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (ConnectionRefusedError(), ErrorKind.RETRIABLE),
        (TimeoutError(), ErrorKind.RETRIABLE),
        (OSError("no route to host"), ErrorKind.RETRIABLE),
        (_pg("08006"), ErrorKind.RETRIABLE),  # connection failure
        (_pg("40001"), ErrorKind.RETRIABLE),  # serialization failure
        (_pg("40P01"), ErrorKind.RETRIABLE),  # deadlock
        (_pg("55P03"), ErrorKind.RETRIABLE),  # lock not available
        (_pg("57P01"), ErrorKind.RETRIABLE),  # admin shutdown
        (_pg("53300"), ErrorKind.RETRIABLE),  # too many connections
        (_pg("22003"), ErrorKind.DATA),  # numeric value out of range
        (_pg("23505"), ErrorKind.DATA),  # unique violation
        (_pg("23514"), ErrorKind.DATA),  # check violation
        (_pg("54000"), ErrorKind.DATA),  # program limit (index row too large)
        (_pg("42P01"), ErrorKind.FATAL),  # undefined table
        (_pg("28P01"), ErrorKind.FATAL),  # wrong password
        (_pg("42501"), ErrorKind.FATAL),  # permission denied
        (asyncpg.InterfaceError("connection is closed"), ErrorKind.RETRIABLE),
        (asyncpg.InterfaceError("the server expects 2 arguments"), ErrorKind.FATAL),
        (
            asyncpg.InternalClientError("cannot switch to state 11; another operation (2) is in progress"),
            ErrorKind.RETRIABLE,
        ),
        (asyncpg.InternalClientError("_on_result: waiter is None"), ErrorKind.FATAL),
        (_s3(503, "SlowDown"), ErrorKind.RETRIABLE),
        (_s3(500, "InternalError"), ErrorKind.RETRIABLE),
        (_s3(404, "NoSuchBucket"), ErrorKind.FATAL),
        (_s3(403, "AccessDenied"), ErrorKind.FATAL),
        (EndpointConnectionError(endpoint_url="http://s3"), ErrorKind.RETRIABLE),
        (NoCredentialsError(), ErrorKind.FATAL),
        (KafkaConnectionError(), ErrorKind.RETRIABLE),
        (KafkaTimeoutError(), ErrorKind.RETRIABLE),
        (MessageSizeTooLargeError(), ErrorKind.FATAL),
        (UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogate"), ErrorKind.DATA),
        (KeyError("bug"), ErrorKind.FATAL),
        (AssertionError("bug"), ErrorKind.FATAL),
    ],
)
def test_classification(error: BaseException, kind: ErrorKind) -> None:
    assert classify(error) is kind


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def _policy(clock: _Clock) -> tuple[RetryPolicy, CollectorRegistry, list[tuple[str, bool]]]:
    registry = CollectorRegistry()
    seen: list[tuple[str, bool]] = []
    policy = RetryPolicy(
        WorkerMetrics(registry),
        5.0,
        on_dependency=lambda n, ok: seen.append((n, ok)),
        clock=clock.time,
        sleep=clock.sleep,
    )
    return policy, registry, seen


async def test_retriable_errors_are_retried_counted_and_cleared() -> None:
    clock = _Clock()
    policy, registry, seen = _policy(clock)
    failures = [ConnectionRefusedError(), _pg("40001"), TimeoutError()]
    since_while_failing: list[float | None] = []

    async def flaky() -> str:
        since_while_failing.append(
            registry.get_sample_value("omnilog_retrying_since_timestamp_seconds", {"operation": "upload"})
        )
        if failures:
            raise failures.pop(0)
        return "done"

    assert await policy.call("upload", "s3", flaky) == "done"
    assert registry.get_sample_value("omnilog_retry_attempts_total", {"operation": "upload"}) == 3
    assert registry.get_sample_value("omnilog_flush_failures_total", {"stage": "upload"}) == 3
    assert since_while_failing == [None, 1000.0, 1000.0, 1000.0]  # set at the first failure, kept
    assert registry.get_sample_value("omnilog_retrying_since_timestamp_seconds", {"operation": "upload"}) == 0
    assert len(clock.slept) == 3 and all(0 <= s <= 5.0 for s in clock.slept)
    assert seen[-1] == ("s3", True) and ("s3", False) in seen


@pytest.mark.parametrize(("error", "kind"), [(_pg("22003"), ErrorKind.DATA), (_pg("42P01"), ErrorKind.FATAL)])
async def test_permanent_errors_are_raised_at_once(error: Exception, kind: ErrorKind) -> None:
    clock = _Clock()
    policy, registry, _ = _policy(clock)
    calls = 0

    async def broken() -> None:
        nonlocal calls
        calls += 1
        raise error

    with pytest.raises(PermanentError) as raised:
        await policy.call("postgres", "postgres", broken)
    assert raised.value.kind is kind and raised.value.cause is error and raised.value.operation == "postgres"
    assert calls == 1 and clock.slept == []
    assert registry.get_sample_value("omnilog_retry_attempts_total", {"operation": "postgres"}) is None


async def test_passthrough_and_cancellation_are_not_retried() -> None:
    class Outcome(Exception):
        pass

    policy, _, _ = _policy(_Clock())

    async def fenced() -> None:
        raise Outcome

    with pytest.raises(Outcome):
        await policy.call("postgres", "postgres", fenced, passthrough=(Outcome,))

    async def cancelled() -> None:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await policy.call("postgres", "postgres", cancelled)


async def test_a_stop_request_ends_a_start_up_retry() -> None:
    clock = _Clock()
    policy, _, _ = _policy(clock)
    stop = asyncio.Event()

    async def unreachable() -> None:
        if len(clock.slept) == 2:
            stop.set()
        raise ConnectionRefusedError

    with pytest.raises(Stopped):
        await policy.call("connect_postgres", "postgres", unreachable, stop=stop)
    assert len(clock.slept) == 2


async def test_find_culprits_isolates_each_bad_item_with_few_tries() -> None:
    items = list(range(1000))
    bad = {3, 500, 501, 998}
    tries = 0

    async def fails(subset: Sequence[int]) -> bool:
        nonlocal tries
        tries += 1
        return any(i in bad for i in subset)

    assert await find_culprits(items, fails) == sorted(bad)
    assert tries < 4 * 2 * 11  # O(k log n)
    assert await find_culprits([], fails) == []


async def test_find_culprits_finds_nothing_when_no_single_item_fails() -> None:
    async def fails(subset: Sequence[int]) -> bool:
        return len(subset) > 3  # only together do they fail: no message is at fault

    assert await find_culprits(list(range(8)), fails) == []
