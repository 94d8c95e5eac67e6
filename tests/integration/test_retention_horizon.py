"""The retention horizon against a real PostgreSQL: a dropped day is never re-created, a batch's
share lock holds maintain's advance back until it commits (real locks, observed in pg_locks), the
horizon never moves backwards, and maintain refuses settings that could delete accepted data."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, date, datetime, timedelta

import asyncpg
import orjson
import pytest
from click.testing import CliRunner, Result

from consumers.ingest.factory import partition_ensurer
from pipeline.cli import cli
from pipeline.processing.offsets import HorizonMoved
from sinks.janitor import expire_objects
from sinks.migrate import migrate
from sinks.objects import s3_client
from sinks.partitions import (
    PARTITION_LOCK_CLASS,
    PartitionCache,
    PartitionExpired,
    drop_expired,
    ensure_day_partitions,
)
from sinks.retention import (
    HorizonBusy,
    RetentionError,
    advance_horizon,
    load_horizon,
    lock_horizon,
)
from tests.integration.cli_env import command_env

pytestmark = pytest.mark.integration

TODAY = datetime.now(UTC).date()
EXPIRED = TODAY - timedelta(days=100)  # past the default 90-day retention
DAY_TABLES = ("log_index", "usage_events", "mcp_usage")


@pytest.fixture
async def database(fresh_database_url: str) -> str:
    await migrate(fresh_database_url)
    return fresh_database_url


Connect = Callable[[], Awaitable[asyncpg.Connection]]


@pytest.fixture
async def connect(database: str) -> AsyncIterator[Connect]:
    """`await connect()`: a connection to the migrated database, closed after the test."""
    opened: list[asyncpg.Connection] = []

    async def open_one() -> asyncpg.Connection:
        conn = await asyncpg.connect(database)
        opened.append(conn)
        return conn

    yield open_one
    for conn in opened:
        await conn.close()


async def _exists(conn: asyncpg.Connection, table: str, day: date) -> bool:
    return bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{table}_p{day:%Y%m%d}"))


async def _wait_blocked_by(observer: asyncpg.Connection, waiter: int, blocker: int) -> None:
    """Return once backend `waiter` waits for a lock that `blocker` holds or queued for first.

    Polls the lock manager's own view; the timeout only bounds a failure."""
    async with asyncio.timeout(20):
        while blocker not in await observer.fetchval("SELECT pg_blocking_pids($1)", waiter):
            await asyncio.sleep(0.01)


async def test_a_dropped_day_is_never_recreated_cached_or_uncached(connect) -> None:
    worker, maintain = await connect(), await connect()
    cache = PartitionCache()
    assert await ensure_day_partitions(worker, "log_index", [EXPIRED, TODAY], cache) == [EXPIRED, TODAY]

    assert await drop_expired(maintain, 90, today=TODAY) == [EXPIRED]
    assert await load_horizon(maintain) == TODAY - timedelta(days=90)
    assert not await _exists(worker, "log_index", EXPIRED)

    # Uncached: refused, naming the day, nothing created.
    with pytest.raises(PartitionExpired, match=EXPIRED.isoformat()) as refused:
        await ensure_day_partitions(worker, "log_index", [EXPIRED])
    assert refused.value.days == [EXPIRED] and refused.value.horizon == TODAY - timedelta(days=90)
    # A cache that still lists the day creates nothing either (the batch transaction's locked
    # horizon decides whether a row may be written: sinks/retention.py).
    assert await ensure_day_partitions(worker, "log_index", [EXPIRED], cache) == []
    # Once a miss made it read the horizon, the cache refuses the day and forgets it.
    with pytest.raises(PartitionExpired):
        await ensure_day_partitions(worker, "log_index", [EXPIRED, TODAY + timedelta(days=1)], cache)
    assert EXPIRED not in cache.known["log_index"]
    with pytest.raises(PartitionExpired):
        await ensure_day_partitions(worker, "log_index", [EXPIRED], cache)
    assert not await _exists(worker, "log_index", EXPIRED)
    # The horizon day itself is still accepted.
    first_kept = TODAY - timedelta(days=90)
    assert await ensure_day_partitions(worker, "log_index", [first_kept], cache) == [first_kept]


async def test_the_workers_ensurer_reads_the_horizon_before_trusting_its_cache(connect) -> None:
    worker, maintain = await connect(), await connect()
    ensure = partition_ensurer(PartitionCache())
    await ensure(worker, {EXPIRED, TODAY})
    assert all([await _exists(worker, t, EXPIRED) for t in DAY_TABLES])

    await drop_expired(maintain, 90, today=TODAY)
    # The worker's ensurer turns the refusal into HorizonMoved: the flush dead-letters those events.
    with pytest.raises(HorizonMoved) as refused:
        await ensure(worker, {EXPIRED, TODAY})
    assert refused.value.horizon == TODAY - timedelta(days=90)
    assert isinstance(refused.value.__cause__, PartitionExpired) and refused.value.__cause__.days == [EXPIRED]
    assert not any([await _exists(worker, t, EXPIRED) for t in DAY_TABLES])
    await ensure(worker, {TODAY})  # the days still accepted are unaffected


async def test_a_creation_waiting_for_the_drop_lock_rechecks_the_horizon(connect) -> None:
    """The early check passed, then maintain advanced the horizon while the creator waited for
    the per-table lock: the check under the lock refuses."""
    creator, maintain, observer = await connect(), await connect(), await connect()
    await observer.execute("SELECT pg_advisory_lock($1, hashtext('log_index'))", PARTITION_LOCK_CLASS)
    creating = asyncio.create_task(ensure_day_partitions(creator, "log_index", [EXPIRED]))
    await _wait_blocked_by(observer, creator.get_server_pid(), observer.get_server_pid())
    await advance_horizon(maintain, EXPIRED + timedelta(days=1))
    await observer.execute("SELECT pg_advisory_unlock($1, hashtext('log_index'))", PARTITION_LOCK_CLASS)
    with pytest.raises(PartitionExpired, match=EXPIRED.isoformat()):
        await creating
    assert not await _exists(observer, "log_index", EXPIRED)


async def test_a_batch_lock_holds_the_advance_back_until_it_commits(connect) -> None:
    batch, maintain, later_batch, observer = [await connect() for _ in range(4)]
    old, new = TODAY - timedelta(days=95), TODAY - timedelta(days=90)
    await advance_horizon(maintain, old)

    in_flight = batch.transaction()
    await in_flight.start()
    assert await lock_horizon(batch) == old
    advancing = asyncio.create_task(advance_horizon(maintain, new, lock_timeout=timedelta(seconds=60)))
    await _wait_blocked_by(observer, maintain.get_server_pid(), batch.get_server_pid())

    # A batch starting now queues behind the advance rather than slipping past it...
    later = later_batch.transaction()
    await later.start()
    later_lock = asyncio.create_task(lock_horizon(later_batch))
    await _wait_blocked_by(observer, later_batch.get_server_pid(), maintain.get_server_pid())
    # ...while plain reads never wait.
    assert await load_horizon(observer) == old
    assert not advancing.done() and not later_lock.done()

    await in_flight.commit()
    assert await advancing == new
    assert await later_lock == new  # the later batch sees the new horizon
    await later.commit()


async def test_an_advance_gives_up_after_its_lock_timeout_and_changes_nothing(connect) -> None:
    batch, maintain = await connect(), await connect()
    await ensure_day_partitions(maintain, "log_index", [EXPIRED])
    async with batch.transaction():
        assert await lock_horizon(batch) is None
        with pytest.raises(HorizonBusy, match="nothing was dropped"):
            await drop_expired(maintain, 90, today=TODAY, lock_timeout=timedelta(milliseconds=200))
        assert await load_horizon(maintain) is None
        assert await _exists(maintain, "log_index", EXPIRED)
    # Once the batch committed, the same run goes through.
    assert await drop_expired(maintain, 90, today=TODAY) == [EXPIRED]


async def test_the_horizon_never_moves_backwards(connect) -> None:
    conn = await connect()
    assert await load_horizon(conn) is None
    later = TODAY - timedelta(days=30)
    assert await advance_horizon(conn, later) == later
    assert await advance_horizon(conn, later - timedelta(days=5)) == later
    assert await load_horizon(conn) == later
    # A longer retention afterwards drops from the later horizon still in force.
    between = TODAY - timedelta(days=40)
    await ensure_day_partitions(conn, "log_index", [later, TODAY])
    assert await drop_expired(conn, 90, today=TODAY) == []
    assert await load_horizon(conn) == later
    with pytest.raises(PartitionExpired):
        await ensure_day_partitions(conn, "log_index", [between])
    assert await _exists(conn, "log_index", later)


async def test_misuse_is_refused(connect) -> None:
    conn = await connect()
    with pytest.raises(RetentionError, match="inside the batch transaction"):
        await lock_horizon(conn)
    async with conn.transaction():
        with pytest.raises(RetentionError, match="outside a transaction"):
            await advance_horizon(conn, TODAY)
    assert await load_horizon(conn) is None


async def test_objects_are_expired_only_before_the_horizon(database, connect, make_settings) -> None:
    settings = make_settings(database_url=database)
    conn = await connect()
    async with s3_client(settings) as s3:
        with pytest.raises(RetentionError, match="not set"):
            await expire_objects(conn, s3, before=EXPIRED)
        await advance_horizon(conn, EXPIRED)
        with pytest.raises(RetentionError, match=f"horizon is {EXPIRED.isoformat()}"):
            await expire_objects(conn, s3, before=EXPIRED + timedelta(days=1))
        assert await expire_objects(conn, s3, before=EXPIRED) == 0


async def _maintain(env: dict[str, str], *args: str) -> Result:
    # The command runs its own event loop: invoke it off this test's loop.
    return await asyncio.to_thread(CliRunner().invoke, cli, ["maintain", *args], env=env)


@pytest.mark.parametrize(
    ("args", "extra_env", "named"),
    [
        (["--retention-days", "30"], {}, ["--retention-days 30", "OMNILOG_MAX_EVENT_AGE_DAYS (90)"]),
        (
            ["--retention-days", "90"],
            {"OMNILOG_MAX_EVENT_AGE_DAYS": "120"},
            ["--retention-days 90", "OMNILOG_MAX_EVENT_AGE_DAYS (120)"],
        ),
        (["--orphan-grace-hours", "1"], {}, ["--orphan-grace-hours 1 ", "REUPLOAD_AFTER_S"]),
        (["--orphan-grace-hours", "0.25"], {}, ["--orphan-grace-hours 0.25 ", "REUPLOAD_AFTER_S"]),
    ],
)
async def test_maintain_refuses_unsafe_settings_and_deletes_nothing(
    database, connect, make_settings, args: list[str], extra_env: dict[str, str], named: list[str]
) -> None:
    conn = await connect()
    await ensure_day_partitions(conn, "log_index", [EXPIRED])
    result = await _maintain(command_env(make_settings(database_url=database), **extra_env), *args)
    assert result.exit_code == 1
    message = result.output.strip()
    assert message.startswith("Error: ") and "\n" not in message, message
    for text in named:
        assert text in message
    assert await _exists(conn, "log_index", EXPIRED)
    assert await load_horizon(conn) is None


async def test_maintain_advances_the_horizon_and_accepts_a_grace_beyond_the_reupload_age(
    database, connect, make_settings
) -> None:
    conn = await connect()
    # The partition-drop line follows the longest organization retention (the seed's default
    # organization keeps 365 days): bring it to 90 so the 90-day horizon is what is tested here.
    await conn.execute("UPDATE organizations SET log_retention_days = 90")
    await ensure_day_partitions(conn, "log_index", [EXPIRED])
    result = await _maintain(command_env(make_settings(database_url=database)), "--orphan-grace-hours", "1.5")
    assert result.exit_code == 0, result.output
    summary = orjson.loads(result.output.splitlines()[-1])
    assert summary["retention_horizon"] == (TODAY - timedelta(days=90)).isoformat()
    assert summary["dropped_days"] == [EXPIRED.isoformat()]
    assert await load_horizon(conn) == TODAY - timedelta(days=90)
    with pytest.raises(PartitionExpired):
        await ensure_day_partitions(conn, "log_index", [EXPIRED])
