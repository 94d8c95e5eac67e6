"""The peer: the same job written the straightforward way with faust-streaming.

What a Python team would write first: one faust agent on the input topic taking small batches
(`stream.take(PEER_BATCH, within=1 s)`), validating each event with the same validator, writing
each batch as one gzip JSON Lines object (stdlib gzip, zlib's default level 6) with aioboto3 and
its rows with one `executemany` INSERT ... ON CONFLICT DO NOTHING into the same `log_index`, then
letting faust commit offsets. No aggregates: the peer does less work than the worker.

Run as a process (faust owns its event loop):

    python -c "from bench.harness.peer_faust import main; main()"

configured by the stack variables plus PEER_APP_ID, PEER_TOPIC, PEER_BATCH and PEER_PARTITIONS.
On the first event it records `first_consume` in `bench_peer_marks`, so the harness times the
drain from the same moment as it does for the worker.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from typing import IO, Any

import aioboto3
import asyncpg
import faust

from bench.harness import traffic
from bench.harness.ceilings import POLICY
from bench.harness.env import BenchEnv, connect
from pipeline.contract import ValidEvent, validate_event
from sinks.index import LOG_INDEX_COLUMNS
from sinks.partitions import ensure_day_partitions

MARKS_DDL = "CREATE TABLE IF NOT EXISTS bench_peer_marks (name text PRIMARY KEY, at timestamptz NOT NULL)"
_INSERT = (
    f"INSERT INTO log_index ({', '.join(LOG_INDEX_COLUMNS)}) "
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(LOG_INDEX_COLUMNS) + 1))}) ON CONFLICT DO NOTHING"
)


def _row(e: ValidEvent, uri: str, length: int) -> tuple[object, ...]:
    return (
        e.event_id, e.organization_id, e.server_id, e.session_id, e.rpc_method, e.level, e.started_at,
        e.duration_ms, e.status_code, e.error, "s3", uri, 0, length, e.user_id, e.remote_ip,
        e.client_id, e.connection_id, e.redaction_version,
    )  # fmt: skip


def build_app() -> Any:
    env = os.environ
    app = faust.App(
        env["PEER_APP_ID"],
        broker=f"kafka://{env['OMNILOG_KAFKA_BOOTSTRAP_SERVERS']}",
        store="memory://",
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
        topic_partitions=int(env.get("PEER_PARTITIONS", "8")),
        topic_replication_factor=1,
        topic_allow_declare=False,
        datadir=env["PEER_DATADIR"],
        # Tansu holds a group's first join for about half the session timeout (faust's default
        # 60 s: a 30 s wait; the worker's is 10 s). Start-up is not measured: this keeps runs short.
        broker_rebalance_timeout=6.0,
        broker_session_timeout=6.0,
    )
    topic = app.topic(env["PEER_TOPIC"], value_type=bytes, value_serializer="raw")
    batch = int(env.get("PEER_BATCH", "100"))
    bucket = env["OMNILOG_S3_BUCKET"]
    state: dict[str, Any] = {}
    connected = asyncio.Event()

    @app.task  # type: ignore[untyped-decorator]
    async def connect() -> None:
        state["pool"] = await asyncpg.create_pool(env["OMNILOG_DATABASE_URL"], min_size=1, max_size=2)
        session = aioboto3.Session()
        state["s3"] = await session.client(
            "s3",
            endpoint_url=env["OMNILOG_S3_ENDPOINT_URL"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env.get("AWS_REGION", "us-east-1"),
        ).__aenter__()
        connected.set()

    @app.agent(topic)
    async def ingest(stream: Any) -> None:
        async for values in stream.take(batch, within=1.0):
            await connected.wait()  # the connect task runs concurrently at start-up
            pool, s3 = state["pool"], state["s3"]
            if "marked" not in state:
                state["marked"] = True
                await pool.execute(
                    "INSERT INTO bench_peer_marks VALUES ('first_consume', clock_timestamp()) "
                    "ON CONFLICT DO NOTHING"
                )
            now = datetime.now(UTC)
            events = [e for v in values if isinstance(e := validate_event(v, now, POLICY), ValidEvent)]
            body = gzip.compress(b"".join(e.line + b"\n" for e in events), compresslevel=6)
            key = f"peer/{now:%Y-%m-%d}/{uuid.uuid4().hex}.jsonl.gz"
            await s3.put_object(Bucket=bucket, Key=key, Body=body)
            uri = f"s3://{bucket}/{key}"
            await pool.executemany(_INSERT, [_row(e, uri, len(body)) for e in events])

    return app


def main() -> None:
    app = build_app()
    sys.argv = [sys.argv[0], "worker", "--loglevel", os.environ.get("PEER_LOGLEVEL", "warn"), "--without-web"]
    app.main()


async def run_peer(env: BenchEnv, count: int, seed: int, log_dir: Path, batch: int = 100) -> dict[str, Any]:
    """Drain a backlog of `count` events with the faust peer; timed from its first consume to
    the last row in Postgres (its offset commits may come later: that only favours the peer)."""
    topic = await env.new_topic("peer", 8)
    url = await env.new_database("peer")
    async with connect(url) as conn:
        await conn.execute(MARKS_DDL)
        today = datetime.now(UTC).date()
        await ensure_day_partitions(conn, "log_index", {today - timedelta(days=d) for d in range(3)})
    produced = await traffic.produce_backlog(env.info.kafka_bootstrap_servers, topic, count, seed)
    log_path = log_dir / "peer-faust.log"
    child_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OMNILOG_", "PEER_"))},
        "PEER_LOGLEVEL": os.environ.get("PEER_LOGLEVEL", "warn"),
        **env.info.env(),
        "OMNILOG_DATABASE_URL": url,
        "OMNILOG_S3_BUCKET": env.bucket,
        "PEER_APP_ID": env.name("peer"),
        "PEER_TOPIC": topic,
        "PEER_BATCH": str(batch),
        "PEER_DATADIR": str(log_dir / "peer-data"),
    }
    process, log = _spawn(child_env, log_path)
    with log:
        try:
            seconds = await _wait_rows(url, produced.delivered, process, log_path)
        finally:
            # The measurement is over; faust's graceful stop takes ~30 s, which buys nothing here.
            process.kill()
            await asyncio.to_thread(process.wait)
    return {
        "events": produced.delivered,
        "seconds": round(seconds, 3),
        "events_per_s": round(produced.delivered / seconds, 1),
        "batch": batch,
        "framework": f"faust-streaming {version('faust-streaming')}",
    }


def _spawn(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-c", "from bench.harness.peer_faust import main; main()"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return process, log


async def _wait_rows(url: str, total: int, process: subprocess.Popen[bytes], log_path: Path) -> float:
    """Seconds from the peer's first consume to `total` rows, both on the database's clock."""
    async with connect(url) as conn:
        last, last_change = -1, time.monotonic()
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"faust peer exited with {process.returncode}; log: {log_path}")
            row = await conn.fetchrow(
                "SELECT (SELECT count(*) FROM log_index) AS n, clock_timestamp() AS now,"
                " (SELECT at FROM bench_peer_marks WHERE name = 'first_consume') AS first"
            )
            assert row is not None
            if row["n"] >= total and row["first"] is not None:
                return float((row["now"] - row["first"]).total_seconds())
            if row["n"] != last:
                last, last_change = row["n"], time.monotonic()
            elif time.monotonic() - last_change > 90:
                raise TimeoutError(f"faust peer stuck at {row['n']}/{total} rows; log: {log_path}")
            await asyncio.sleep(0.1)
