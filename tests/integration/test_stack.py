"""The embedded stack, with real processes: the `omnilog stack` CLI and the shared fixtures."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import boto3  # type: ignore[import-untyped]
import psutil
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from botocore.config import Config
from click.testing import CliRunner, Result

from pipeline.cli import cli
from pipeline.devtools.stack import Stack, StackInfo
from pipeline.devtools.stack import state as state_file
from pipeline.devtools.stack.postgres import INGEST_SETTINGS
from pipeline.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def root(scratch_stack_root: Path) -> Path:
    return scratch_stack_root


def omnilog(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.startswith("export "):
            name, _, value = line.removeprefix("export ").partition("=")
            env[name] = value.strip("'")
    return env


def recorded_pids(root: Path) -> dict[str, int | None]:
    state = json.loads((root / "state.json").read_text())
    return {name: svc["pid"] for name, svc in state["services"].items()}


async def kafka_brokers(bootstrap: str) -> list[tuple[str, int]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    await admin.start()
    try:
        cluster = await admin.describe_cluster()
    finally:
        await admin.close()
    return [(b["host"], b["port"]) for b in cluster["brokers"]]


def s3_for(env: dict[str, str]) -> Any:
    """A plain boto3 client configured only from the stack's environment variables."""
    return boto3.client(
        "s3",
        endpoint_url=env["OMNILOG_S3_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_REGION"],
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


def holds_listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


async def test_cli_up_up_status_down_down_and_restart_on_the_same_data(root: Path) -> None:
    try:
        first = omnilog("stack", "up", "--root", str(root), "--bucket", "cli-bucket")
        assert first.exit_code == 0, first.output
        assert "started postgres, kafka, s3" in first.output

        env = read_env_file(root / "stack.env")
        assert set(env) == {
            "OMNILOG_KAFKA_BOOTSTRAP_SERVERS",
            "OMNILOG_DATABASE_URL",
            "OMNILOG_S3_ENDPOINT_URL",
            "OMNILOG_S3_BUCKET",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_REGION",
        }
        assert env["OMNILOG_S3_BUCKET"] == "cli-bucket"
        assert stat.S_IMODE((root / "stack.env").stat().st_mode) == 0o600
        # The variables really reach the three services.
        conn = await asyncpg.connect(env["OMNILOG_DATABASE_URL"])
        await conn.execute("create table kept (v int); insert into kept values (42)")
        assert await conn.fetchval("show max_connections") == "200"
        assert await conn.fetchval("show listen_addresses") == "127.0.0.1"
        # Statement statistics are preloaded, so the extension can be created and read.
        await conn.execute("create extension if not exists pg_stat_statements")
        assert await conn.fetchval("select count(*) from pg_stat_statements") > 0
        assert await conn.fetchval("show track_io_timing") == "on"
        # The ingest settings reach the server, as PostgreSQL reports them back.
        shown = {key: await conn.fetchval(f"show {key}") for key in INGEST_SETTINGS}
        assert shown == INGEST_SETTINGS
        await conn.close()
        host, port = env["OMNILOG_KAFKA_BOOTSTRAP_SERVERS"].split(":")
        assert await kafka_brokers(env["OMNILOG_KAFKA_BOOTSTRAP_SERVERS"]) == [(host, int(port))]
        s3 = s3_for(env)
        s3.head_bucket(Bucket="cli-bucket")
        s3.put_object(Bucket="cli-bucket", Key="k", Body=b"kept")
        pids = recorded_pids(root)
        assert all(pid is not None and psutil.pid_exists(pid) for pid in pids.values())

        second = omnilog("stack", "up", "--root", str(root), "--bucket", "cli-bucket")
        assert second.exit_code == 0, second.output
        assert "nothing changed" in second.output
        assert recorded_pids(root) == pids
        assert read_env_file(root / "stack.env") == env

        status = omnilog("stack", "status", "--root", str(root))
        assert status.exit_code == 0, status.output
        for name in ("postgres", "kafka", "s3"):
            line = next(line for line in status.output.splitlines() if line.startswith(name))
            assert str(pids[name]) in line
            assert line.endswith("healthy")

        down = omnilog("stack", "down", "--root", str(root))
        assert down.exit_code == 0, down.output
        assert "stopped postgres, kafka, s3" in down.output
        assert not any(psutil.pid_exists(pid) for pid in pids.values() if pid is not None)
        assert (root / "pg" / "PG_VERSION").exists()  # data kept without --purge

        again = omnilog("stack", "down", "--root", str(root))
        assert again.exit_code == 0, again.output
        assert "nothing to stop" in again.output

        stopped = omnilog("stack", "status", "--root", str(root))
        assert stopped.exit_code == 1
        assert "stopped" in stopped.output

        # Up again: same ports (stack.env stays valid), Postgres and S3 data survive.
        restart = omnilog("stack", "up", "--root", str(root), "--bucket", "cli-bucket")
        assert restart.exit_code == 0, restart.output
        assert read_env_file(root / "stack.env") == env
        conn = await asyncpg.connect(env["OMNILOG_DATABASE_URL"])
        assert await conn.fetchval("select v from kept") == 42
        await conn.close()
        assert s3_for(env).get_object(Bucket="cli-bucket", Key="k")["Body"].read() == b"kept"
    finally:
        purge = omnilog("stack", "down", "--root", str(root), "--purge")
    assert purge.exit_code == 0, purge.output
    assert not root.exists()


def test_explicit_port_already_taken_is_a_clear_error(root: Path) -> None:
    with holds_listener() as taken:
        port = taken.getsockname()[1]
        result = omnilog("stack", "up", "--root", str(root), "--kafka-port", str(port))
    assert result.exit_code != 0
    assert f"kafka: port {port} on 127.0.0.1 is already in use" in result.output
    state = root / "state.json"
    assert not state.exists() or not any(recorded_pids(root).values())


def test_missing_postgres_binaries_are_named(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("OMNILOG_PG_BINDIR", str(empty))
    result = omnilog("stack", "up", "--root", str(root))
    assert result.exit_code != 0
    assert "PostgreSQL server binaries (initdb, postgres) not found" in result.output
    assert str(empty) in result.output
    # Fails before launching anything: nothing is left running.
    assert not (root / "state.json").exists() or not any(recorded_pids(root).values())


def test_a_service_that_dies_on_start_fails_up_with_its_log_tail(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "tansu"
    fake.write_text("#!/bin/sh\necho 'tansu: cannot open storage engine (simulated)'\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("OMNILOG_TANSU_BIN", str(fake))
    try:
        result = omnilog("stack", "up", "--root", str(root))
        assert result.exit_code != 0
        assert "kafka exited (code 3) before becoming healthy" in result.output
        assert "cannot open storage engine (simulated)" in result.output
        assert str(root / "logs" / "kafka.log") in result.output
        assert recorded_pids(root)["kafka"] is None
    finally:
        down = omnilog("stack", "down", "--root", str(root), "--purge")
    assert down.exit_code == 0


async def test_make_settings_gives_each_call_its_own_topic_group_and_bucket(
    make_settings: Callable[..., Settings], stack_info: StackInfo
) -> None:
    first: Settings = make_settings(batch_max_events=7)
    second: Settings = make_settings(OMNILOG_BATCH_MAX_AGE_S=0.25)
    assert first.batch_max_events == 7
    assert second.batch_max_age_s == 0.25
    assert len({first.topic, second.topic, first.dlq_topic, second.dlq_topic}) == 4
    assert first.consumer_group != second.consumer_group
    assert first.s3_bucket != second.s3_bucket
    assert first.kafka_bootstrap_servers == stack_info.kafka_bootstrap_servers
    assert first.database_url.get_secret_value() == stack_info.database_url
    env = stack_info.env()
    for settings in (first, second):
        s3_for(env).head_bucket(Bucket=settings.s3_bucket)


async def test_fresh_databases_are_empty_and_distinct(fresh_database_url: str, stack_info: StackInfo) -> None:
    assert fresh_database_url != stack_info.database_url
    conn = await asyncpg.connect(fresh_database_url)
    try:
        tables = await conn.fetchval("select count(*) from pg_tables where schemaname = 'public'")
        assert tables == 0
        await conn.execute("create table mine (v int)")
    finally:
        await conn.close()
    main = await asyncpg.connect(stack_info.database_url)
    try:
        assert await main.fetchval("select to_regclass('public.mine')") is None
    finally:
        await main.close()


async def test_stop_and_start_service_keep_ports_and_data(stack: Stack, fresh_database_url: str) -> None:
    info = stack.info()
    conn = await asyncpg.connect(fresh_database_url)
    await conn.execute("create table survives (v int); insert into survives values (1)")
    await conn.close()
    s3 = s3_for(info.env())
    s3.put_object(Bucket=info.s3_bucket, Key="outage/probe", Body=b"x")

    stack.stop_service("postgres")
    stack.stop_service("s3")
    with pytest.raises(OSError):
        await asyncpg.connect(fresh_database_url, timeout=2)
    assert {s.name: s.healthy for s in stack.status()} == {"postgres": False, "kafka": True, "s3": False}

    # Called from inside a running event loop, as the chaos tests do.
    await asyncio.sleep(0)
    stack.start_service("postgres")
    stack.start_service("s3")
    assert stack.info() == info
    conn = await asyncpg.connect(fresh_database_url)
    assert await conn.fetchval("select v from survives") == 1
    await conn.close()
    assert s3.get_object(Bucket=info.s3_bucket, Key="outage/probe")["Body"].read() == b"x"

    stack.stop_service("kafka")
    stack.start_service("kafka")
    assert await kafka_brokers(info.kafka_bootstrap_servers)
    assert all(s.healthy for s in stack.status())


def test_postgres_never_runs_as_root(stack: Stack) -> None:
    pid = next(s.pid for s in stack.status() if s.name == "postgres")
    assert pid is not None
    uid = psutil.Process(pid).uids().real
    assert uid != 0
    if os.geteuid() != 0:
        assert uid == os.geteuid()


def test_down_never_signals_a_recorded_pid_that_is_now_another_process(root: Path) -> None:
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        # A state file whose kafka pid was reused by an unrelated process (start time differs).
        st = state_file.StackState.new("omnilog")
        st.service("kafka").pid = stranger.pid
        st.service("kafka").create_time = psutil.Process(stranger.pid).create_time() - 3600
        st.service("kafka").ports = {"port": 9}
        state_file.save(root, st)

        status = omnilog("stack", "status", "--root", str(root))
        assert status.exit_code == 1
        down = omnilog("stack", "down", "--root", str(root))
        assert down.exit_code == 0, down.output
        assert "nothing to stop" in down.output
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()
