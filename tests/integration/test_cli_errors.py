"""A dependency that is down or refuses gives one line naming it and exit 1, never a traceback;
creating what already exists is success for the stack (a retried or concurrent `stack up`)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import aioboto3
import pytest

from pipeline.devtools.stack import StackInfo, drop_database
from pipeline.devtools.stack.blocking import run_blocking
from pipeline.devtools.stack.postgres import _ensure_database
from pipeline.devtools.stack.s3 import S3Credentials, ensure_bucket

pytestmark = pytest.mark.integration

OMNILOG = str(Path(sys.executable).with_name("omnilog"))
PASSWORD = "hunter2-S3cr3t"
# Nothing listens on port 1 of the loopback: connections are refused at once.
CLOSED = "127.0.0.1:1"
SOME_ID = "0190f0d8-0000-7000-8000-000000000001"


def _omnilog(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OMNILOG_", "AWS_"))}
    return subprocess.run(
        [OMNILOG, *args],
        env={**base, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _assert_one_line(done: subprocess.CompletedProcess[str], *names: str) -> None:
    shown = f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    assert done.returncode == 1, shown
    assert "Traceback" not in done.stderr, shown
    assert len(done.stderr.splitlines()) == 1, shown
    assert all(name in done.stderr for name in names), shown
    assert PASSWORD not in done.stderr + done.stdout, shown


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["logs", "query"], ("PostgreSQL", "OMNILOG_DATABASE_URL")),
        (["logs", "query", "--with-body", "--format", "json"], ("PostgreSQL", "OMNILOG_DATABASE_URL")),
        (["logs", "get", SOME_ID], ("PostgreSQL", "OMNILOG_DATABASE_URL")),
        (["migrate"], ("PostgreSQL", "OMNILOG_DATABASE_URL")),
        (["aggregates", "show", "--org", SOME_ID], ("PostgreSQL", "OMNILOG_DATABASE_URL")),
        (["aggregates", "usage", "--org", SOME_ID], ("PostgreSQL", "OMNILOG_DATABASE_URL")),
        (["aggregates", "merge"], ("PostgreSQL", "OMNILOG_DATABASE_URL")),
        (["maintain"], ("OMNILOG_DATABASE_URL",)),
    ],
)
def test_postgres_down(args: list[str], names: tuple[str, ...], tmp_path: Path) -> None:
    env = {"OMNILOG_DATABASE_URL": f"postgresql://omnilog:{PASSWORD}@{CLOSED}/omnilog"}
    _assert_one_line(_omnilog(args, env, tmp_path), *names)


def test_kafka_down(tmp_path: Path) -> None:
    done = _omnilog(["topics"], {"OMNILOG_KAFKA_BOOTSTRAP_SERVERS": CLOSED}, tmp_path)
    _assert_one_line(done, "Kafka", "OMNILOG_KAFKA_BOOTSTRAP_SERVERS")


@pytest.mark.parametrize(
    "args", [["logs", "query"], ["logs", "get", SOME_ID], ["aggregates", "show", "--org", SOME_ID]]
)
def test_postgres_up_but_not_migrated_says_so(
    args: list[str], fresh_database_url: str, stack_info: StackInfo, tmp_path: Path
) -> None:
    env = {**stack_info.env(), "OMNILOG_DATABASE_URL": fresh_database_url}
    _assert_one_line(_omnilog(args, env, tmp_path), "PostgreSQL", "omnilog migrate")


def test_creating_a_bucket_that_exists_is_success(stack_info: StackInfo) -> None:
    """`stack up` creates first and takes "already exists" as success: the real server's answer
    for an existing bucket is exercised on every call after the first."""
    credentials = S3Credentials(stack_info.aws_access_key_id, stack_info.aws_secret_access_key)
    port = int(stack_info.s3_endpoint_url.rsplit(":", 1)[1])
    bucket = f"exists-{uuid.uuid4().hex[:12]}"
    for _ in range(3):
        ensure_bucket(port, credentials, bucket)

    async def codes_of_a_second_create() -> str:
        session = aioboto3.Session()
        async with session.client(
            "s3",
            endpoint_url=stack_info.s3_endpoint_url,
            aws_access_key_id=credentials.access_key_id,
            aws_secret_access_key=credentials.secret_access_key,
            region_name=stack_info.aws_region,
        ) as client:
            try:
                await client.create_bucket(Bucket=bucket)
            except client.exceptions.ClientError as exc:
                return str(exc.response["Error"]["Code"])
            return "created again"

    # The server does refuse a second create (so the calls above took the "exists" path).
    assert run_blocking(codes_of_a_second_create) in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}


def test_creating_a_database_that_exists_is_success(stack_info: StackInfo) -> None:
    port = int(stack_info.database_url.rsplit(":", 1)[1].split("/", 1)[0])
    name = f"exists_{uuid.uuid4().hex[:12]}"

    async def twice() -> None:
        await _ensure_database(port, name)
        await _ensure_database(port, name)

    try:
        run_blocking(twice)
    finally:
        drop_database(stack_info, name)
