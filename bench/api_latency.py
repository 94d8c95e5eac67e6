"""Latency of the read API under 100 concurrent requests: a logs page, and one stored event.

Starts an embedded stack of its own (PostgreSQL, SeaweedFS; in a temporary root, removed at the
end), migrates, loads two organizations' events the way the worker stores them (gzip JSON Lines
objects of ~64 KiB members in S3, one log_index row per event pointing at its member), creates the
API's login role and a key, and runs `omnilog serve` as its own process (uvicorn, as deployed).
Then, for each scenario, it keeps `--concurrency` requests in flight until `--requests` have
completed, and records each request's latency as the client sees it:

- `logs_page`: GET /v1/logs?limit=100 over the last 24 h, each request a different filter mix;
- `event`: GET /v1/events/{id} of a random event (one index lookup + one ranged GET of a member).

    .venv/bin/python bench/api_latency.py [--events 40000] [--requests 3000] [--concurrency 100]

Writes bench/results/api-latency.json and bench/results/api-latency.md. The API's rate limit is
raised for the run (OMNILOG_API_RATE_BURST), since one key drives all the load.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson

from pipeline.devtools.stack import Stack, StackInfo, create_database
from pipeline.settings import load_settings
from sinks.api_keys import create_key
from sinks.migrate import migrate
from sinks.objects import ObjectWriter, s3_client
from sinks.partitions import ensure_day_partitions

RESULTS = Path(__file__).parent / "results"
METHODS = ["tools/call", "tools/list", "resources/read", "prompts/get", "initialize"]
MEMBER_BYTES = 64 * 1024
EVENTS_PER_OBJECT = 4000


@dataclass
class Loaded:
    org: str
    event_ids: list[str]


def _event(rng: random.Random, org: str, servers: list[str], now: datetime) -> dict[str, Any]:
    status = rng.choice([200] * 8 + [404, 500])
    return {
        "event_id": str(uuid.UUID(int=rng.getrandbits(128))),
        "organization_id": org,
        "server_id": rng.choice(servers),
        "session_id": str(uuid.UUID(int=rng.getrandbits(128))),
        "rpc_method": rng.choice(METHODS),
        "started_at": (now - timedelta(seconds=rng.uniform(0, 20 * 3600))).isoformat(),
        "duration_ms": int(rng.lognormvariate(4, 1)),
        "status_code": status,
        "user_id": f"user-{rng.randint(1, 50)}",
        "remote_ip": "10.0.0.7",
        "request": {"jsonrpc": "2.0", "method": "tools/call", "params": {"q": "x" * rng.randint(100, 1200)}},
        "response": {"ok": status < 400},
    }


_COLUMNS = [
    "id", "organization_id", "server_id", "session_id", "rpc_method", "level", "started_at", "duration_ms",
    "status_code", "error_flag", "storage_provider", "object_uri", "byte_offset", "byte_length", "user_id",
]  # fmt: skip


def _level(status: int) -> str:
    return "error" if status >= 500 else "info"


def _object(batch: list[dict[str, Any]], uri: str) -> tuple[bytes, list[tuple[Any, ...]]]:
    """One object as the worker writes it: gzip members of about MEMBER_BYTES of JSON Lines, and
    the index row of each event pointing at its member."""
    body = b""
    records: list[tuple[Any, ...]] = []
    members: list[list[dict[str, Any]]] = [[]]
    size = 0
    for event in batch:
        members[-1].append(event)
        size += len(orjson.dumps(event)) + 1
        if size >= MEMBER_BYTES:
            members.append([])
            size = 0
    for events in filter(None, members):
        member = gzip.compress(b"\n".join(orjson.dumps(e) for e in events) + b"\n", compresslevel=1)
        for e in events:
            records.append(
                (
                    uuid.UUID(e["event_id"]), uuid.UUID(e["organization_id"]), uuid.UUID(e["server_id"]),
                    uuid.UUID(e["session_id"]), e["rpc_method"], _level(e["status_code"]),
                    datetime.fromisoformat(e["started_at"]), e["duration_ms"], e["status_code"],
                    e["status_code"] >= 500, "s3", uri, len(body), len(member), e["user_id"],
                )
            )  # fmt: skip
        body += member
    return body, records


async def _load(settings: Any, owner_url: str, events: int, rng: random.Random) -> list[Loaded]:
    now = datetime.now(UTC)
    orgs = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(2)]
    servers = {org: [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(5)] for org in orgs}
    loaded = {org: Loaded(org, []) for org in orgs}
    conn = await asyncpg.connect(owner_url)
    try:
        await ensure_day_partitions(conn, "log_index", [(now - timedelta(days=d)).date() for d in range(2)])
        async with s3_client(settings) as s3:
            objects = ObjectWriter(s3, settings.s3_bucket, 1 << 30)
            for start in range(0, events, EVENTS_PER_OBJECT):
                org = orgs[(start // EVENTS_PER_OBJECT) % 2]
                count = min(EVENTS_PER_OBJECT, events - start)
                batch = [_event(rng, org, servers[org], now) for _ in range(count)]
                key = f"org/{org}/bench/{uuid.uuid4().hex}.jsonl.gz"
                body, records = _object(batch, f"s3://{settings.s3_bucket}/{key}")
                loaded[org].event_ids.extend(e["event_id"] for e in batch)
                await objects.put(key, body)
                await conn.copy_records_to_table("log_index", records=records, columns=_COLUMNS)
        await conn.execute("ANALYZE log_index")
    finally:
        await conn.close()
    return list(loaded.values())


async def _drive(
    session: aiohttp.ClientSession, base: str, paths: list[str], concurrency: int, headers: dict[str, str]
) -> tuple[list[float], dict[int, int], float]:
    """`concurrency` requests in flight until `paths` are done; each one's latency as seen here."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    queue = iter(paths)

    async def worker() -> None:
        for path in queue:
            began = time.perf_counter()
            async with session.get(base + path, headers=headers) as response:
                await response.read()
            latencies.append(time.perf_counter() - began)
            statuses[response.status] = statuses.get(response.status, 0) + 1

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, statuses, time.perf_counter() - began


def _summary(latencies: list[float], statuses: dict[int, int], wall: float) -> dict[str, Any]:
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)

    return {
        "requests": len(ordered),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "max_ms": round(ordered[-1] * 1000, 1),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 1),
        "requests_per_s": round(len(ordered) / wall, 1),
    }


async def _wait_ready(url: str, process: asyncio.subprocess.Process) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            if process.returncode is not None:
                raise SystemExit(f"omnilog serve exited with {process.returncode}")
            try:
                async with session.get(f"{url}/readyz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit("omnilog serve did not become ready")


async def _bench(info: StackInfo, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    load_before = os.getloadavg()[0]
    owner_url = create_database(info, "api_bench")
    settings = load_settings(None, **{**info.env(), "OMNILOG_DATABASE_URL": owner_url})
    await migrate(owner_url)
    began = time.perf_counter()
    tenants = await _load(settings, owner_url, args.events, rng)
    load_s = time.perf_counter() - began
    conn = await asyncpg.connect(owner_url)
    try:
        await conn.execute(
            "DO $$ BEGIN CREATE ROLE api_bench_login LOGIN IN ROLE omnilog_api; "
            "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
        )
        key = (await create_key(conn, tenants[0].org, "bench")).secret
    finally:
        await conn.close()
    api_url = owner_url.replace("omnilog@", "api_bench_login@", 1)
    port = args.port
    env = {
        **os.environ,
        **info.env(),
        "OMNILOG_DATABASE_URL": owner_url,
        "OMNILOG_API_DATABASE_URL": api_url,
        "OMNILOG_API_PORT": str(port),
        "OMNILOG_API_RATE_BURST": "100000000",
        "OMNILOG_API_POOL_SIZE": str(args.pool_size),
        "OMNILOG_LOG_LEVEL": "WARNING",
    }
    omnilog = str(Path(sys.executable).with_name("omnilog"))
    process = await asyncio.create_subprocess_exec(omnilog, "serve", env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        await _wait_ready(base, process)
        headers = {"Authorization": f"Bearer {key}"}
        own = tenants[0].event_ids
        filters = ["", "&errors=true", "&method=tools/call", "&status=200", "&user_id=user-7", "&level=info"]
        scenarios = {
            "logs_page": [f"/v1/logs?limit=100{rng.choice(filters)}" for _ in range(args.requests)],
            "event": [f"/v1/events/{rng.choice(own)}" for _ in range(args.requests)],
        }
        # aiohttp, not httpx: at 100 connections httpx's own pool cost more CPU than the server.
        connector = aiohttp.TCPConnector(limit=args.concurrency)
        results: dict[str, Any] = {}
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=60)
        ) as session:
            for name, paths in scenarios.items():
                await _drive(session, base, paths[: args.concurrency], args.concurrency, headers)  # warm-up
                # One at a time first: the service time, without queueing behind 99 others.
                alone = _summary(*await _drive(session, base, paths[:200], 1, headers))
                results[f"{name} (1 at a time)"] = alone
                results[name] = _summary(*await _drive(session, base, paths, args.concurrency, headers))
                print(name, results[name], "alone:", alone, flush=True)
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), timeout=30)
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared with other work)",
        "events": args.events,
        "load_seconds": round(load_s, 1),
        "concurrency": args.concurrency,
        "pool_size": args.pool_size,
        "scenarios": results,
    }


def _markdown(result: dict[str, Any], command: str) -> str:
    rows = [
        f"| {name} | {s['requests']} | {s['p50_ms']} | {s['p90_ms']} | {s['p99_ms']} | {s['max_ms']} | "
        f"{s['requests_per_s']} | {s['statuses']} |"
        for name, s in result["scenarios"].items()
    ]
    return "\n".join(
        [
            "# Read API latency (bench/api_latency.py)",
            "",
            f"Run {result['when']} on {result['machine']}: {result['events']} events of two organizations, "
            f"{result['concurrency']} concurrent requests, one `omnilog serve` process (pool of "
            f"{result['pool_size']} connections), client, PostgreSQL and SeaweedFS on the same machine. "
            f"Load average (1 min) {result['load_average_before_after'][0]} before the run and "
            f"{result['load_average_before_after'][1]} after: other work was running on the same 2 cores.",
            "",
            "With 100 requests in flight in a closed loop, a request's latency is mostly its wait behind "
            "the others (latency ≈ in flight / throughput); the rows run one at a time give the service "
            "time of one request on the same machine.",
            "",
            "| scenario | requests | p50 ms | p90 ms | p99 ms | max ms | requests/s | statuses |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
            *rows,
            "",
            f"Reproduce: `{command}`",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=40_000)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--port", type=int, default=18080)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="Print only; leave bench/results alone.")
    args = parser.parse_args()
    parent = Path(tempfile.mkdtemp(prefix="omnilog-api-bench-"))
    stack = Stack(parent / "root")
    try:
        info = stack.up()
        result = asyncio.run(_bench(info, args))
    finally:
        stack.down(purge=True)
        shutil.rmtree(parent, ignore_errors=True)
    command = "python bench/api_latency.py " + " ".join(sys.argv[1:])
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "api-latency.json").write_text(json.dumps(result, indent=2) + "\n")
        (RESULTS / "api-latency.md").write_text(_markdown(result, command.strip()))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
