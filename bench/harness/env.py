"""Where a benchmark run happens: a stack (own or reused), one fresh database, unique names."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
from aiokafka.admin import AIOKafkaAdminClient

from pipeline.devtools.stack import Stack, StackInfo, create_database, drop_database
from pipeline.kafka_admin import ensure_topics
from pipeline.settings import Settings, load_settings
from sinks.migrate import migrate
from sinks.objects import s3_client

# The variables a reused stack is described by (docs/contract.md §7), as `omnilog stack up` writes them.
STACK_VARIABLES = (
    "OMNILOG_KAFKA_BOOTSTRAP_SERVERS",
    "OMNILOG_DATABASE_URL",
    "OMNILOG_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
)


def info_from_environment(environ: dict[str, str] | None = None) -> StackInfo:
    """A running stack described by the environment (e.g. `source .omnilog/stack.env`)."""
    env = dict(os.environ if environ is None else environ)
    missing = [name for name in STACK_VARIABLES if not env.get(name)]
    if missing:
        raise ValueError(f"--use-env needs {', '.join(missing)} in the environment")
    return StackInfo(
        root=Path.cwd(),
        database_url=env["OMNILOG_DATABASE_URL"],
        kafka_bootstrap_servers=env["OMNILOG_KAFKA_BOOTSTRAP_SERVERS"],
        s3_endpoint_url=env["OMNILOG_S3_ENDPOINT_URL"],
        s3_bucket=env.get("OMNILOG_S3_BUCKET", "omnilog"),
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        aws_region=env.get("AWS_REGION", "us-east-1"),
    )


@contextlib.contextmanager
def own_stack(root: Path | None) -> Iterator[StackInfo]:
    """Start a stack for this run and stop it (data purged) afterwards.

    Without a root, a fresh directory under /tmp: PostgreSQL runs as an unprivileged user that
    must traverse to its data directory, so the directory is made world-traversable.
    """
    scratch = None
    if root is None:
        scratch = Path(tempfile.mkdtemp(prefix="omnilog-bench-"))
        scratch.chmod(0o755)
        root = scratch / "root"
    stack = Stack(root)
    try:
        yield stack.up()
    finally:
        stack.down(purge=True)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


@dataclass
class BenchEnv:
    """One run's resources on a stack: a migrated database, a bucket, topics it created."""

    info: StackInfo
    run_id: str = field(default_factory=lambda: secrets.token_hex(4))
    database_url: str = ""
    bucket: str = ""
    databases: list[str] = field(default_factory=list)
    topics: list[str] = field(default_factory=list)

    def name(self, what: str) -> str:
        return f"bench.{self.run_id}.{what}"

    async def new_database(self, what: str) -> str:
        """A fresh, migrated database (so every scenario starts from empty tables)."""
        return (await self.new_named_database(what))[1]

    async def new_named_database(self, what: str) -> tuple[str, str]:
        """`new_database`, also returning the database's name (to drop it early)."""
        name = f"bench_{self.run_id}_{what}"
        url = create_database(self.info, name)
        self.databases.append(name)
        await migrate(url)
        return name, url

    async def drop_named_database(self, name: str) -> None:
        """Drop a finished scenario's database now: a large drain's tables take gigabytes."""
        drop_database(self.info, name)
        self.databases = [d for d in self.databases if d != name]

    async def new_topic(self, what: str, partitions: int) -> str:
        topic = self.name(what)
        await ensure_topics(self.info.kafka_bootstrap_servers, {topic: partitions, topic + ".dlq": 1})
        self.topics += [topic, topic + ".dlq"]
        return topic

    async def ensure_bucket(self) -> str:
        self.bucket = f"omnilog-bench-{self.run_id}"
        async with s3_client(self.settings()) as s3:
            with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
                await s3.create_bucket(Bucket=self.bucket)
        return self.bucket

    def settings(self, **overrides: str) -> Settings:
        """Settings for this stack (and the run's bucket once created), like a worker's."""
        values = {**self.info.env(), **({"OMNILOG_S3_BUCKET": self.bucket} if self.bucket else {})}
        return load_settings(None, **{**values, **overrides})

    def worker_env(self, topic: str, database_url: str, group: str, metrics_port: int) -> dict[str, str]:
        """The environment of an `omnilog ingest` process for one scenario."""
        return {
            **self.info.env(),
            "OMNILOG_DATABASE_URL": database_url,
            "OMNILOG_S3_BUCKET": self.bucket,
            "OMNILOG_TOPIC": topic,
            "OMNILOG_DLQ_TOPIC": topic + ".dlq",
            "OMNILOG_CONSUMER_GROUP": group,
            "OMNILOG_METRICS_PORT": str(metrics_port),
            # A lost member's partitions move after 6 s rather than 10 s if a run is interrupted.
            "OMNILOG_KAFKA_SESSION_TIMEOUT_MS": "6000",
        }

    async def drop_topic(self, topic: str) -> None:
        """Free a finished scenario's records now (the broker holds them in memory)."""
        await self._delete_topics([topic, topic + ".dlq"])

    async def _delete_topics(self, topics: list[str]) -> None:
        with contextlib.suppress(Exception):
            admin = AIOKafkaAdminClient(bootstrap_servers=self.info.kafka_bootstrap_servers)
            await admin.start()
            try:
                await admin.delete_topics(topics)
            finally:
                await admin.close()
        self.topics = [t for t in self.topics if t not in topics]

    async def cleanup(self) -> None:
        """Drop what this run created (topics free the broker's memory; Tansu keeps records in RAM)."""
        if self.topics:
            await self._delete_topics(list(self.topics))
        for name in self.databases:
            with contextlib.suppress(Exception):
                drop_database(self.info, name)


@contextlib.asynccontextmanager
async def connect(url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(url)
    try:
        yield conn
    finally:
        await conn.close()
