"""The producer SDK against a real broker (the stack's Tansu; a private Tansu for the outage)."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import UnknownError
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

from pipeline.cli import cli
from pipeline.devtools.loadgen.generator import LoadConfig, generate
from pipeline.devtools.stack import StackInfo
from pipeline.devtools.stack.binaries import tansu_binary
from pipeline.kafka_admin import ensure_topics
from pipeline.sdk.event_builder import GatewayRequestEvent
from pipeline.sdk.producer import DeliveryFailure, EventProducer, ProducerClosedError
from pipeline.sdk.redaction import MARKER, RedactionConfig

pytestmark = pytest.mark.integration


@pytest.fixture
async def topic(stack_info: StackInfo) -> str:
    name = f"test.producer.{uuid.uuid4().hex[:10]}"
    await ensure_topics(stack_info.kafka_bootstrap_servers, {name: 3})
    return name


async def read_all(
    bootstrap: str, topic: str, expected: int, partitions: int = 3, timeout: float = 20.0
) -> list[tuple[bytes, bytes]]:
    """Every (key, value) in `topic`, waiting until `expected` messages are there (or timeout)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        assigned = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(assigned)
        await consumer.seek_to_beginning(*assigned)
        out: list[tuple[bytes, bytes]] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(out) < expected and loop.time() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                out.extend((r.key, r.value) for r in records)
        await asyncio.sleep(0.3)  # and nothing more arrives than expected
        for records in (await consumer.getmany(timeout_ms=300)).values():
            out.extend((r.key, r.value) for r in records)
        return out
    finally:
        await consumer.stop()


def event(org: str, i: int, **extra: object) -> GatewayRequestEvent:
    return GatewayRequestEvent(
        organization_id=org,
        server_id=str(uuid.UUID(int=i % 3 + 1)),
        started_at=datetime.now(UTC),
        duration_ms=i,
        rpc_method="tools/call",
        **extra,  # type: ignore[arg-type]
    )


async def test_close_flushes_every_event_with_redaction_and_keys(stack_info: StackInfo, topic: str) -> None:
    org = str(uuid.uuid4())
    registry = CollectorRegistry()
    bootstrap = stack_info.kafka_bootstrap_servers
    async with EventProducer(
        bootstrap, topic, linger_ms=50, redaction=RedactionConfig(version=4), registry=registry
    ) as producer:
        for i in range(1500):
            secrets = {
                "headers": {"Authorization": f"Bearer tok{i}"},
                "request": {"note": f"mail u{i}@example.com"},
            }
            if i % 2:
                await producer.emit(event(org, i, **secrets))
            else:
                assert producer.emit_nowait(event(org, i, **secrets))
        # close() (on exit) must deliver what is still lingering in the buffer.
        assert producer.stats.delivered < 1500
    assert producer.stats.delivered == 1500
    assert producer.stats.failed == producer.stats.in_flight == 0
    assert registry.get_sample_value("omnilog_producer_events_total", {"outcome": "delivered"}) == 1500

    messages = await read_all(bootstrap, topic, 1500)
    assert len(messages) == 1500
    durations = set()
    for key, value in messages:
        body = orjson.loads(value)
        durations.add(body["duration_ms"])
        assert key == f"{org}:{body['server_id']}".encode()
        assert body["headers"]["Authorization"] == MARKER
        assert body["request"]["note"] == f"mail {MARKER}"
        assert body["redaction_version"] == 4
        assert b"Bearer" not in value and b"@example.com" not in value
    assert durations == set(range(1500))


async def test_idempotence_falls_back_on_tansu_with_one_warning(
    stack_info: StackInfo, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    bootstrap = stack_info.kafka_bootstrap_servers
    with caplog.at_level(logging.WARNING):
        async with EventProducer(bootstrap, topic) as producer:
            assert producer.idempotent is False
            await producer.emit(event(str(uuid.uuid4()), 1))
    assert producer.stats.delivered == 1
    ours = [r for r in caplog.records if r.name == "pipeline.sdk.producer"]
    assert len(ours) == 1 and "WITHOUT idempotence" in ours[0].getMessage()
    assert not [r for r in caplog.records if "InitProducerIdRequest" in r.getMessage()]

    strict = EventProducer(bootstrap, topic, idempotence="on")
    with pytest.raises(UnknownError):
        await strict.start()


async def test_emit_waits_while_the_buffer_is_full(stack_info: StackInfo, topic: str) -> None:
    org = str(uuid.uuid4())
    # linger keeps accepted events in flight for ~0.6 s: the bound of 5 is reached at once.
    async with EventProducer(
        stack_info.kafka_bootstrap_servers, topic, linger_ms=600, max_in_flight_events=5
    ) as producer:
        for i in range(5):
            await asyncio.wait_for(producer.emit(event(org, i)), 0.1)  # room: returns at once
        blocked = asyncio.create_task(producer.emit(event(org, 5)))
        await asyncio.sleep(0.2)
        assert not blocked.done(), "emit must wait while 5 events are in flight"
        assert producer.stats.in_flight == 5 and producer.stats.accepted == 5
        await asyncio.wait_for(blocked, 10)  # returns once the broker acknowledged the first ones
        assert producer.stats.delivered >= 1
    assert producer.stats.delivered == 6 and producer.stats.dropped == 0


async def test_emit_nowait_drops_and_counts_when_full(stack_info: StackInfo, topic: str) -> None:
    org = str(uuid.uuid4())
    registry = CollectorRegistry()
    bootstrap = stack_info.kafka_bootstrap_servers
    async with EventProducer(
        bootstrap, topic, linger_ms=600, max_in_flight_events=5, registry=registry
    ) as producer:
        accepted = [producer.emit_nowait(event(org, i)) for i in range(20)]
    assert accepted == [True] * 5 + [False] * 15
    assert producer.stats.dropped == 15
    assert producer.stats.delivered == 5
    assert registry.get_sample_value("omnilog_producer_events_total", {"outcome": "dropped"}) == 15
    messages = await read_all(bootstrap, topic, 5, timeout=5)
    assert sorted(orjson.loads(v)["duration_ms"] for _, v in messages) == [0, 1, 2, 3, 4]


async def test_emit_nowait_respects_the_byte_bound(stack_info: StackInfo, topic: str) -> None:
    async with EventProducer(
        stack_info.kafka_bootstrap_servers, topic, linger_ms=600, max_in_flight_bytes=3000
    ) as producer:
        big = {"metadata": {"blob": "x" * 1000}}
        accepted = [producer.emit_nowait(event(str(uuid.uuid4()), i, **big)) for i in range(6)]
    assert accepted[:2] == [True, True] and not any(accepted[3:])
    assert producer.stats.in_flight == 0


# -- a broker that goes away: a private Tansu, so the shared stack is not disturbed ------------


@pytest.fixture
def private_broker() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
         "--storage-engine", "memory://tansu/"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield f"127.0.0.1:{port}", proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


async def _wait_listening(bootstrap: str) -> None:
    host, port = bootstrap.rsplit(":", 1)
    for _ in range(100):
        try:
            _, writer = await asyncio.open_connection(host, int(port))
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise AssertionError("private Tansu did not start")


async def test_broker_outage_reports_every_failure(
    private_broker: tuple[str, subprocess.Popen[bytes]],
) -> None:
    bootstrap, proc = private_broker
    await _wait_listening(bootstrap)
    await ensure_topics(bootstrap, {"outage": 2})
    failures: list[DeliveryFailure] = []
    org = str(uuid.uuid4())
    producer = EventProducer(
        bootstrap, "outage", idempotence="off", request_timeout_ms=1500, on_delivery_failure=failures.append
    )
    await producer.start()
    for i in range(10):
        await producer.emit(event(org, i))
    await producer.flush()
    assert producer.stats.delivered == 10

    proc.kill()
    proc.wait()
    for i in range(10, 40):
        await producer.emit(event(org, i))
    await asyncio.wait_for(producer.close(grace_s=30), 40)

    assert producer.stats.delivered == 10
    assert producer.stats.failed == 30
    assert producer.stats.in_flight == 0
    assert sorted(orjson.loads(f.value)["duration_ms"] for f in failures) == list(range(10, 40))
    assert all(f.key == f"{org}:{orjson.loads(f.value)['server_id']}".encode() for f in failures)
    with pytest.raises(ProducerClosedError):
        await producer.emit(event(org, 99))


# -- the CLI: omnilog topics and omnilog produce -------------------------------------------------


async def test_topics_and_produce_commands(stack_info: StackInfo, tmp_path: Path) -> None:
    suffix = uuid.uuid4().hex[:10]
    env = {
        "OMNILOG_KAFKA_BOOTSTRAP_SERVERS": stack_info.kafka_bootstrap_servers,
        "OMNILOG_TOPIC": f"test.cli.{suffix}",
        "OMNILOG_DLQ_TOPIC": f"test.cli.{suffix}.dlq",
    }
    runner = CliRunner()
    first = await asyncio.to_thread(runner.invoke, cli, ["topics", "--partitions", "4"], env=env)
    assert first.exit_code == 0, first.output
    assert f"test.cli.{suffix}: created, 4 partition(s)" in first.output
    assert f"test.cli.{suffix}.dlq: created, 1 partition(s)" in first.output
    again = await asyncio.to_thread(runner.invoke, cli, ["topics", "--partitions", "6"], env=env)
    assert again.exit_code == 0, again.output
    assert f"test.cli.{suffix}: exists, 4 partition(s) (asked for 6" in again.output

    summary_path = tmp_path / "summary.json"
    args = ["produce", "--count", "3000", "--seed", "11", "--base-time", "2026-03-10T12:00:00Z",
            "--orgs", "3", "--duplicate-fraction", "0.05", "--invalid-fraction", "0.05",
            "--late-fraction", "0.1", "--summary", str(summary_path), "--no-progress"]  # fmt: skip
    result = await asyncio.to_thread(runner.invoke, cli, args, env=env)
    assert result.exit_code == 0, result.output
    assert "delivered 3000, failed 0" in result.output

    config = LoadConfig(
        count=3000, seed=11, base_time=datetime(2026, 3, 10, 12, tzinfo=UTC), orgs=3,
        duplicate_fraction=0.05, invalid_fraction=0.05, late_fraction=0.1,
    )  # fmt: skip
    expected = list(generate(config))
    received = await read_all(stack_info.kafka_bootstrap_servers, f"test.cli.{suffix}", 3000, partitions=4)
    assert Counter(received) == Counter((m.key, m.value) for m in expected)
    summary = orjson.loads(summary_path.read_bytes())
    assert summary["messages"]["total"] == 3000
    assert summary["messages"]["duplicate"] == sum(m.kind == "duplicate" for m in expected)
    assert summary["messages"]["invalid"] == sum(m.kind == "invalid" for m in expected)
    assert summary["delivery"] == {"delivered": 3000, "failed": 0}
