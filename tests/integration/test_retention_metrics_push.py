"""`omnilog maintain` pushes its run's metrics to a real Prometheus Pushgateway (the Debian package
.ci/bootstrap installs), read back from the gateway's own /metrics as Prometheus would scrape it: a
success replaces the group, a failed run reports the failure and keeps the previous success's
timestamp (what OmnilogMaintenanceStale reads), and the next success clears it."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import orjson
import pytest
from click.testing import CliRunner, Result
from prometheus_client.parser import text_string_to_metric_families

from pipeline.cli import cli
from pipeline.commands.maintain import PUSH_JOB
from pipeline.devtools.stack.ports import free_ports
from pipeline.processing.layout import object_key, object_uri, parse_object_uri
from pipeline.settings import Settings
from sinks.migrate import migrate
from sinks.objects import s3_client
from sinks.partitions import ensure_day_partitions
from tests.deploy.support import tool
from tests.integration.cli_env import command_env

pytestmark = pytest.mark.integration

FREE = str(uuid.UUID(int=0xF1))  # on the free plan: 7 days


@pytest.fixture
def pushgateway(tmp_path: Path) -> Iterator[str]:
    (port,) = free_ports(1)
    address = f"127.0.0.1:{port}"
    with (tmp_path / "pushgateway.log").open("wb") as log:
        proc = subprocess.Popen(
            [tool("prometheus-pushgateway"), f"--web.listen-address={address}"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://{address}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"pushgateway did not start: {(tmp_path / 'pushgateway.log').read_text()}")
            time.sleep(0.1)
        yield f"http://{address}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def _maintain(settings: Settings, gateway: str) -> Result:
    return await asyncio.to_thread(
        CliRunner().invoke,
        cli,
        ["maintain", "--orphan-grace-hours", "0"],
        env=command_env(settings, OMNILOG_MAINTAIN_PUSHGATEWAY_URL=gateway),
    )


def _pushed(gateway: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples the gateway exposes for maintain's group: (name, other labels) -> value."""
    text = httpx.get(f"{gateway}/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("job") == PUSH_JOB and s.name.startswith("omnilog_maintain_"):
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("job", "instance")))
                samples[(s.name, labels)] = s.value
    return samples


def _value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_maintain_pushes_success_failure_and_recovery_to_a_real_pushgateway(
    fresh_database_url: str, make_settings: Callable[..., Settings], pushgateway: str
) -> None:
    await migrate(fresh_database_url)
    settings = make_settings(database_url=fresh_database_url)
    conn = await asyncpg.connect(fresh_database_url)
    try:
        await conn.execute(
            "INSERT INTO organizations (id, name, slug, plan_type) VALUES ($1::uuid, 'f', 'f', 'free')", FREE
        )
        before_first = time.time()
        first = await _maintain(settings, pushgateway)
        assert first.exit_code == 0, first.output
        pushed = _pushed(pushgateway)
        first_success = _value(pushed, "omnilog_maintain_last_success_timestamp_seconds")
        assert first_success >= int(before_first)
        assert _value(pushed, "omnilog_maintain_last_run_failed") == 0
        assert _value(pushed, "omnilog_maintain_last_run_duration_seconds") > 0

        # An expired row whose object lives in a bucket that does not exist: its delete fails.
        at = datetime.now(UTC) - timedelta(days=29)
        other = f"{settings.s3_bucket}-gone"
        uri = object_uri(other, object_key(FREE, at.date(), None, "push"))
        await ensure_day_partitions(conn, "log_index", [at.date()])
        await conn.execute(
            "INSERT INTO ingest_objects (object_uri, organization_id, log_date, event_count, byte_size)"
            " VALUES ($1, $2::uuid, $3, 1, 10)",
            uri, FREE, at.date(),
        )  # fmt: skip
        await conn.execute(
            "INSERT INTO log_index (id, organization_id, started_at, storage_provider, object_uri,"
            " byte_offset, byte_length) VALUES (gen_random_uuid(), $1::uuid, $2, 's3', $3, 0, 5)",
            FREE, at, uri,
        )  # fmt: skip
        failed = await _maintain(settings, pushgateway)
        assert failed.exit_code == 1, failed.output
        pushed = _pushed(pushgateway)
        assert _value(pushed, "omnilog_maintain_last_run_failed") == 1
        assert _value(pushed, "omnilog_maintain_failed_objects") == 1
        assert _value(pushed, "omnilog_maintain_last_run_deleted_rows", kind="log_index") == 1
        # The failed run left the previous success in place.
        assert _value(pushed, "omnilog_maintain_last_success_timestamp_seconds") == first_success

        make_settings(OMNILOG_S3_BUCKET=other)  # creates the bucket
        async with s3_client(settings) as s3:
            await s3.put_object(Bucket=other, Key=parse_object_uri(uri)[1], Body=b"0123456789")
        before_third = time.time()
        third = await _maintain(settings, pushgateway)
        assert third.exit_code == 0, third.output
        summary = orjson.loads(third.output.splitlines()[-1])
        pushed = _pushed(pushgateway)
        assert _value(pushed, "omnilog_maintain_last_success_timestamp_seconds") >= int(before_third)
        assert _value(pushed, "omnilog_maintain_last_run_failed") == 0
        assert _value(pushed, "omnilog_maintain_failed_objects") == 0
        assert (
            _value(pushed, "omnilog_maintain_last_run_deleted_objects") == summary["deleted"]["objects"] == 1
        )
        assert _value(pushed, "omnilog_maintain_last_run_deleted_bytes") == summary["deleted"]["bytes"] == 10
        # The retried object's index row went in the failed run: this one deleted none.
        assert _value(pushed, "omnilog_maintain_last_run_deleted_rows", kind="log_index") == 0
    finally:
        await conn.close()


def test_an_unreachable_gateway_warns_and_keeps_the_runs_exit_code(
    fresh_database_url: str, make_settings: Callable[..., Settings]
) -> None:
    asyncio.run(migrate(fresh_database_url))
    settings = make_settings(database_url=fresh_database_url)
    (port,) = free_ports(1)  # nothing listens there
    result = CliRunner().invoke(
        cli,
        ["maintain", "--orphan-grace-hours", "0"],
        env=command_env(settings, OMNILOG_MAINTAIN_PUSHGATEWAY_URL=f"http://127.0.0.1:{port}"),
    )
    assert result.exit_code == 0, result.output
    assert "could not push metrics to OMNILOG_MAINTAIN_PUSHGATEWAY_URL" in result.stderr
    assert orjson.loads(result.stdout.splitlines()[-1])["failures"] == 0
