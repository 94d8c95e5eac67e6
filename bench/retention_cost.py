"""What expiring one organization's rows costs the ingest hot path.

An ingest loop writes batches the way a worker's batch transaction does (COPY into the temporary
stage table, INSERT ... ON CONFLICT DO NOTHING into log_index, one ledger row per object, one
transaction per batch; sinks/index.py's statements) for today's day partition, at full speed on
one connection. Each round measures its rate alone (baseline), then while `expire_organization`
(sinks/janitor.py) deletes `--expired-rows` index rows of one organization, with their ledger
rows, from older days on a second connection. Reports rows/s for both and the drop.

The object store is a stub that accepts every delete at once: the expiry then runs its database
work back to back, the worst case for contention (real deletes only add pauses between pages).

The expiry is paced as `omnilog maintain` paces it (pipeline/commands/maintain.py: objects per
page, idle time after a page as a multiple of its own time); `--variant PAGE:IDLE_RATIO` (repeat
it) measures other pacings side by side: every round runs each variant once, the order rotating
from round to round, so a shared machine's load and the growing table move them alike. The last
line is the JSON report: per variant, each round's figures, the drops and their median; each
round is also printed on stderr as it ends.

    .venv/bin/python bench/retention_cost.py --database-url postgresql://... --expired-rows 1000000 \
        --rounds 4 --variant 100:4 --variant 100:9

The database must be migrated (`omnilog migrate`) and is left with today's ingested rows. On a
shared machine, repeat the rounds and read the spread: other processes move both numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import statistics
import sys
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

import asyncpg

from pipeline.commands.maintain import EXPIRY_IDLE_RATIO, EXPIRY_PAGE_OBJECTS
from sinks.index import LOG_INDEX_COLUMNS
from sinks.janitor import expire_before_horizon, expire_organization
from sinks.partitions import ensure_day_partitions
from sinks.retention import advance_horizon

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

# The ingest load's own stage, in log_index's columns (remote_ip as text, cast by the INSERT): the
# batch transaction's stage (sinks/index.py) takes the worker's pre-encoded rows, not these.
_STAGE = "retention_cost_stage"
_CREATE_STAGE = (
    f"CREATE TEMP TABLE IF NOT EXISTS {_STAGE} ON COMMIT DELETE ROWS AS SELECT "
    + ", ".join("remote_ip::text AS remote_ip" if c == "remote_ip" else c for c in LOG_INDEX_COLUMNS)
    + " FROM log_index WITH NO DATA"
)
_INSERT_NEW = (
    f"INSERT INTO log_index ({', '.join(LOG_INDEX_COLUMNS)}) SELECT "
    + ", ".join("remote_ip::inet" if c == "remote_ip" else c for c in LOG_INDEX_COLUMNS)
    + f" FROM {_STAGE} ON CONFLICT DO NOTHING RETURNING id::text"
)

EXPIRING_ORG = uuid.UUID(int=0xE1)
INGEST_ORGS = [uuid.UUID(int=0x100 + n) for n in range(20)]
ROWS_PER_OBJECT = 500


class AcceptingS3:
    """Answers DeleteObjects at once, deleting nothing (only the database cost is measured).

    With a `gate`, a delete waits while the gate is closed (`parked` is set meanwhile): the expiry
    stops between its index-row delete and its ledger-row delete, holding no transaction.
    """

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.gate = gate
        self.parked = asyncio.Event()

    async def delete_objects(self, **_: Any) -> dict[str, Any]:
        if self.gate is not None and not self.gate.is_set():
            self.parked.set()
            await self.gate.wait()
            self.parked.clear()
        return {}


def _row(rng: random.Random, org: uuid.UUID, started: datetime, uri: str, offset: int) -> tuple[object, ...]:
    return (
        uuid.uuid4(), org, None, None, "tools/call", "info", started, rng.randint(1, 3000), 200,
        False, "s3", uri, offset, 1000, f"user-{rng.randint(1, 2000)}", "10.0.0.1", None, None, 1,
    )  # fmt: skip


async def seed_expired(conn: asyncpg.Connection, rows: int, days: list[date], rng: random.Random) -> None:
    """`rows` index rows of the expiring organization spread over `days`, with their ledger rows."""
    records: list[tuple[object, ...]] = []
    ledger: list[tuple[object, ...]] = []
    for n in range(rows):
        if n % ROWS_PER_OBJECT == 0:  # an object holds one day's events, as the worker writes them
            day = days[n * len(days) // rows]
            uri = f"s3://bench/org/{EXPIRING_ORG}/date={day.isoformat()}/_/seed-{n}.jsonl.gz"
            ledger.append((uri, EXPIRING_ORG, day, ROWS_PER_OBJECT, ROWS_PER_OBJECT * 1000))
        started = datetime(day.year, day.month, day.day, 12, tzinfo=UTC)
        records.append(_row(rng, EXPIRING_ORG, started, uri, (n % ROWS_PER_OBJECT) * 1000))
    await conn.copy_records_to_table("log_index", records=records, columns=LOG_INDEX_COLUMNS)
    await conn.copy_records_to_table(
        "ingest_objects",
        records=ledger,
        columns=("object_uri", "organization_id", "log_date", "event_count", "byte_size"),
    )


async def ingest(
    conn: asyncpg.Connection, batch: int, until: asyncio.Event, min_s: float, rng: random.Random
) -> float:
    """Write batches until `until` is set and `min_s` has passed; return rows/s."""
    await conn.execute(_CREATE_STAGE)
    began = time.perf_counter()
    written = 0
    while not (until.is_set() and time.perf_counter() - began >= min_s):
        await _write_batch(conn, batch, rng)
        written += batch
    return written / (time.perf_counter() - began)


async def _write_batch(conn: asyncpg.Connection, batch: int, rng: random.Random) -> None:
    org = rng.choice(INGEST_ORGS)
    now = datetime.now(UTC)
    uri = f"s3://bench/org/{org}/date={now.date().isoformat()}/_/live-{uuid.uuid4().hex}.jsonl.gz"
    records = [_row(rng, org, now, uri, i * 1000) for i in range(batch)]
    async with conn.transaction():
        await conn.copy_records_to_table(_STAGE, records=records, columns=LOG_INDEX_COLUMNS)
        await conn.fetch(_INSERT_NEW)
        await conn.execute(
            "INSERT INTO ingest_objects (object_uri, organization_id, log_date, event_count, byte_size)"
            " VALUES ($1, $2, $3, $4, $5)",
            uri, org, now.date(), batch, batch * 1000,
        )  # fmt: skip


async def ingest_paired(
    conn: asyncpg.Connection,
    batch: int,
    store: AcceptingS3,
    done: asyncio.Event,
    window_s: float,
    rng: random.Random,
) -> tuple[list[float], list[float]]:
    """Write batches in alternating windows of `window_s`: the expiry paused (its gate closed, the
    window counted once it is parked), then running. Returns the rows/s of the paused windows and
    of the running ones. Adjacent windows share whatever else loads the machine, so their ratio
    holds where a baseline measured minutes apart does not."""
    assert store.gate is not None
    await conn.execute(_CREATE_STAGE)
    paused: list[float] = []
    running: list[float] = []
    expiring = False
    while not done.is_set():
        if expiring:
            store.gate.set()
        else:
            store.gate.clear()
            while not (store.parked.is_set() or done.is_set()):  # let the page in flight finish
                await _write_batch(conn, batch, rng)
        began = time.perf_counter()
        written = 0
        while time.perf_counter() - began < window_s:
            await _write_batch(conn, batch, rng)
            written += batch
        # A running window in which the expiry ended is only partly loaded: left out.
        if not (expiring and done.is_set()):
            (running if expiring else paused).append(written / (time.perf_counter() - began))
        expiring = not expiring
    store.gate.set()
    return paused, running


async def one_round(
    url: str,
    expired_rows: int,
    batch: int,
    baseline_s: float,
    seed: int,
    page: int,
    idle_ratio: float,
    window_s: float = 0.0,
) -> dict[str, float]:
    rng = random.Random(seed)
    today = datetime.now(UTC).date()
    days = [today - timedelta(days=d) for d in range(8, 15)]
    writer, expirer = await asyncpg.connect(url), await asyncpg.connect(url)
    try:
        await ensure_day_partitions(expirer, "log_index", [today, *days])
        await seed_expired(expirer, expired_rows, days, rng)
        await expirer.execute("VACUUM ANALYZE log_index")
        await expirer.execute("VACUUM ANALYZE ingest_objects")
        store = AcceptingS3(asyncio.Event() if window_s > 0 else None)
        if window_s <= 0:
            stop = asyncio.Event()
            stop.set()
            baseline = await ingest(writer, batch, stop, baseline_s, rng)

        done = asyncio.Event()
        timing: dict[str, float] = {}

        async def expire() -> None:
            began = time.perf_counter()
            try:
                result = await expire_organization(
                    expirer,
                    cast("S3Client", store),
                    str(EXPIRING_ORG),
                    today - timedelta(days=7),
                    page=page,
                    idle_ratio=idle_ratio,
                )
            finally:
                done.set()  # also when it failed: the writer stops, and `await task` raises
            timing["expire_s"] = time.perf_counter() - began
            timing["expired_rows"] = result.index_rows

        task = asyncio.create_task(expire())
        if window_s > 0:
            paused, running = await ingest_paired(writer, batch, store, done, window_s, rng)
            baseline, during = statistics.median(paused), statistics.median(running)
        else:
            during = await ingest(writer, batch, done, 0.0, rng)
        await task
    finally:
        await writer.close()
        await expirer.close()
    return {
        "baseline_rows_per_s": round(baseline),
        "during_expiry_rows_per_s": round(during),
        "drop_pct": round(100 * (1 - during / baseline), 1),
        "expire_s": round(timing["expire_s"], 2),
        "expired_rows": timing["expired_rows"],
        "expired_rows_per_s": round(timing["expired_rows"] / timing["expire_s"]),
    }


async def janitor_scale(url: str, ledger_rows: int) -> dict[str, float]:
    """Expire a synthetic ledger of `ledger_rows` objects before the horizon (stub object store):
    the time, and how much the process's peak memory grew (it must not grow with the ledger)."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "INSERT INTO ingest_objects (object_uri, organization_id, log_date, event_count, byte_size)"
            " SELECT 's3://bench/org/' || $2::text || '/date=2000-01-01/_/scale-' || n || '.jsonl.gz',"
            " $2::uuid, DATE '2000-01-01', 1, 1000 FROM generate_series(1, $1) AS n",
            ledger_rows, str(EXPIRING_ORG),
        )  # fmt: skip
        await conn.execute("VACUUM ANALYZE ingest_objects")
        await advance_horizon(conn, date(2000, 1, 2))
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        began = time.perf_counter()
        result = await expire_before_horizon(conn, cast("S3Client", AcceptingS3()), date(2000, 1, 2))
        elapsed = time.perf_counter() - began
        peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    finally:
        await conn.close()
    return {
        "ledger_rows": ledger_rows,
        "expired_objects": result.objects,
        "seconds": round(elapsed, 1),
        "objects_per_s": round(result.objects / elapsed),
        "peak_rss_growth_mib": round((peak_after - peak_before) / 1024, 1),
    }


def _variant(text: str) -> tuple[int, float]:
    """PAGE:IDLE_RATIO, e.g. 100:4 (objects per page, idle time per page's time)."""
    page, _, idle = text.partition(":")
    try:
        return int(page), float(idle)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PAGE:IDLE_RATIO (e.g. 100:4), got {text!r}") from None


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--expired-rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=2000, help="rows per ingest batch")
    parser.add_argument("--baseline-s", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--janitor-ledger-rows",
        type=int,
        default=0,
        help="instead: expire a synthetic ledger of this many objects",
    )
    parser.add_argument(
        "--paired-window-s",
        type=float,
        default=0.0,
        help="instead of a baseline before the expiry: alternate windows of this many seconds with "
        "the expiry paused and running, and compare their median rates (for a machine whose load "
        "moves within a round; the expiry then takes about twice as long)",
    )
    parser.add_argument(
        "--variant",
        type=_variant,
        action="append",
        metavar="PAGE:IDLE_RATIO",
        help="a pacing to measure (repeatable; default: maintain's). Each round runs every variant in "
        "turn, the order rotating, so a shared machine's load moves them alike.",
    )
    args = parser.parse_args()
    if args.janitor_ledger_rows:
        print(json.dumps(await janitor_scale(args.database_url, args.janitor_ledger_rows)))
        return
    variants: list[tuple[int, float]] = args.variant or [(EXPIRY_PAGE_OBJECTS, EXPIRY_IDLE_RATIO)]
    runs: dict[tuple[int, float], list[dict[str, float]]] = {v: [] for v in variants}
    for seed in range(args.rounds):
        shift = seed % len(variants)
        for page, idle_ratio in variants[shift:] + variants[:shift]:
            result = await one_round(
                args.database_url,
                args.expired_rows,
                args.batch,
                args.baseline_s,
                seed,
                page,
                idle_ratio,
                args.paired_window_s,
            )
            runs[(page, idle_ratio)].append(result)
            # Progress on stderr (a round of 1 M rows takes minutes on a busy machine).
            print(
                json.dumps({"round": seed, "page": page, "idle_ratio": idle_ratio, **result}), file=sys.stderr
            )
    report = [
        {
            "expiry_page_objects": page,
            "idle_ratio": idle_ratio,
            "rows_per_object": ROWS_PER_OBJECT,
            "drops_pct": [r["drop_pct"] for r in rounds],
            "median_drop_pct": statistics.median(r["drop_pct"] for r in rounds),
            "median_expire_s": statistics.median(r["expire_s"] for r in rounds),
            "rounds": rounds,
        }
        for (page, idle_ratio), rounds in runs.items()
    ]
    print(json.dumps({"variants": report}))


if __name__ == "__main__":
    asyncio.run(main())
