"""`omnilog maintain`: one pass of partition maintenance (a CronJob runs it, e.g. hourly)."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import click
import orjson
from botocore.exceptions import BotoCoreError, ClientError
from prometheus_client import (
    CollectorRegistry,
    Gauge,
    push_to_gateway,
    pushadd_to_gateway,
    write_to_textfile,
)
from prometheus_client.parser import text_string_to_metric_families

from pipeline.processing.flush import REUPLOAD_AFTER_S
from pipeline.settings import Settings, load_settings
from sinks.held_deltas import expire_held_server_deltas, held_delta_cutoff
from sinks.janitor import (
    Expiry,
    dead_letter_prefix_is_safe,
    expire_before_horizon,
    expire_dead_letter_values,
    expire_organization,
    sweep_orphans,
)
from sinks.objects import s3_client

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
from sinks.partitions import DEFAULT_DAYS_AHEAD, PartitionError, create_ahead, drop_expired
from sinks.retention import OrganizationRetention, RetentionError, load_horizon, load_organization_retention

# The pacing of each organization's expiry (sinks/janitor.py expire_organization): objects per page
# (one short transaction each) and the idle time after a page, as a multiple of the page's own time.
# Busy 1/5 of the time: expiring 1 M index rows of one organization cost a concurrent writer a
# median 4 % (100:4, 4 rounds; 10 % alone on the machine) and -2 % in paired windows, under the
# 20 % target (bench/retention_cost.py --variant PAGE:IDLE_RATIO, docs/operations.md "Retention").
EXPIRY_PAGE_OBJECTS = 100
EXPIRY_IDLE_RATIO = 4.0

# Metrics of the last run. The CronJob's process lives for one run, so nothing could scrape it: it
# pushes them to a Prometheus Pushgateway (OMNILOG_MAINTAIN_PUSHGATEWAY_URL; Prometheus scrapes the
# gateway with honor_labels) and/or writes them as a text file (`--metrics-textfile`, for a
# node_exporter textfile collector). Gauges, each describing the last run.
_LAST_SUCCESS = "omnilog_maintain_last_success_timestamp_seconds"
# The Pushgateway group (its `job` label): one per deployment, replaced by each run's push.
PUSH_JOB = "omnilog_maintain"
_PUSH_TIMEOUT_S = 10.0
# Summary totals (sinks/janitor.py Expiry, rollups) -> the `kind` label of the deleted-rows gauge.
_ROW_KINDS = {
    "index_rows": "log_index",
    "usage_rows": "usage",
    "aggregate_rows": "rollups",
    "held_server_deltas": "held_server_deltas",
}


@dataclass(frozen=True, slots=True)
class MaintainMetrics:
    """The gauges of one run, on their own registry (also read by tests/deploy's name check).

    What was deleted per organization is in `retention_cleanup_logs`; these are the run's totals.
    """

    last_success: Gauge
    failed: Gauge
    failed_objects: Gauge
    deleted_rows: Gauge
    deleted_objects: Gauge
    deleted_bytes: Gauge
    duration: Gauge

    @classmethod
    def register(cls, registry: CollectorRegistry) -> MaintainMetrics:
        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, labels, registry=registry)

        return cls(
            last_success=gauge(_LAST_SUCCESS, "When maintain last ran without any failure (Unix time)."),
            failed=gauge("omnilog_maintain_last_run_failed", "1 when the last maintain run failed, else 0."),
            failed_objects=gauge(
                "omnilog_maintain_failed_objects", "Objects whose delete failed in the last run."
            ),
            deleted_rows=gauge(
                "omnilog_maintain_last_run_deleted_rows",
                "Rows the last run deleted (log_index: index rows; usage: raw usage rows; rollups; "
                "held_server_deltas: deltas of servers never registered, past the accepted lateness).",
                ("kind",),
            ),
            deleted_objects=gauge(
                "omnilog_maintain_last_run_deleted_objects",
                "Objects the last run deleted (events' objects and dead letters' stored values).",
            ),
            deleted_bytes=gauge(
                "omnilog_maintain_last_run_deleted_bytes", "Bytes of the objects the last run deleted."
            ),
            duration=gauge("omnilog_maintain_last_run_duration_seconds", "How long the last run took."),
        )

    def fill(self, summary: dict[str, object] | None, *, ok: bool, duration_s: float) -> None:
        """Everything but the last success; `summary` None (the run failed before it could
        report): the counts are zero."""
        totals = summary.get("deleted", {}) if summary else {}
        assert isinstance(totals, dict)
        self.failed.set(0 if ok else 1)
        self.failed_objects.set(totals.get("failed_objects", 0))
        for key, kind in _ROW_KINDS.items():
            self.deleted_rows.labels(kind).set(totals.get(key, 0))
        self.deleted_objects.set(totals.get("objects", 0))
        self.deleted_bytes.set(totals.get("bytes", 0))
        self.duration.set(duration_s)


def _succeeded(summary: dict[str, object] | None) -> bool:
    return summary is not None and not summary.get("failures")


def write_metrics(
    path: Path, summary: dict[str, object] | None, *, now: float, duration_s: float = 0.0
) -> None:
    """Write the run's metrics to `path` (atomically). `summary` None: the run failed before it
    could report; the last success timestamp is carried over from the previous file."""
    registry = CollectorRegistry()
    m = MaintainMetrics.register(registry)
    ok = _succeeded(summary)
    m.fill(summary, ok=ok, duration_s=duration_s)
    m.last_success.set(now if ok else _previous_success(path))
    write_to_textfile(str(path), registry)


def push_metrics(gateway: str, summary: dict[str, object] | None, *, now: float, duration_s: float) -> None:
    """Push the run's metrics to the Pushgateway at `gateway`, group job=`PUSH_JOB`.

    A successful run replaces the whole group (PUT). A failed one replaces only the metrics it
    pushes (POST) and leaves out the last success, so the gateway keeps the previous run's value:
    that is what OmnilogMaintenanceStale measures, and no file or state is needed here.
    Raises OSError (urllib's URLError) when the gateway cannot be reached.
    """
    registry = CollectorRegistry()
    m = MaintainMetrics.register(registry)
    ok = _succeeded(summary)
    m.fill(summary, ok=ok, duration_s=duration_s)
    if ok:
        m.last_success.set(now)
        push_to_gateway(gateway, PUSH_JOB, registry, timeout=_PUSH_TIMEOUT_S)
    else:
        registry.unregister(m.last_success)
        pushadd_to_gateway(gateway, PUSH_JOB, registry, timeout=_PUSH_TIMEOUT_S)


def _previous_success(path: Path) -> float:
    try:
        text = path.read_text()
    except OSError:
        return 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == _LAST_SUCCESS:
                return float(sample.value)
    return 0.0


def _refuse_unsafe(settings: Settings, retention_days: int, orphan_grace: timedelta | None) -> None:
    """Refuse, before touching anything, a run that could delete what is still accepted."""
    if retention_days < settings.max_event_age_days:
        raise click.ClickException(
            f"--retention-days {retention_days} is shorter than OMNILOG_MAX_EVENT_AGE_DAYS "
            f"({settings.max_event_age_days}): workers still accept events that old; nothing was deleted"
        )
    if orphan_grace is not None and orphan_grace.total_seconds() <= REUPLOAD_AFTER_S:
        raise click.ClickException(
            f"--orphan-grace-hours {orphan_grace.total_seconds() / 3600:g} is not longer than the "
            f"{REUPLOAD_AFTER_S / 3600:g} h after which a flush re-uploads an object it still holds "
            "(REUPLOAD_AFTER_S): the sweep could delete an object a slow commit is about to point at; "
            "nothing was deleted (0 disables the sweep)"
        )


# (table, time column, extra condition): the rollup tiers, each with its own retention setting.
_HOURLY_ROLLUPS: tuple[tuple[str, str, str], ...] = (
    ("usage_hourly", "bucket", ""),
    ("usage_hour_users", "window_start", ""),
    ("log_aggregates", "window_start", "AND window_type = 'hourly'"),
)
_DAILY_ROLLUPS: tuple[tuple[str, str, str], ...] = (
    ("usage_daily", "bucket", ""),
    ("usage_day_users", "window_start", ""),
    ("log_aggregates", "window_start", "AND window_type = 'daily'"),
)
_UNREGISTERED = """
SELECT DISTINCT organization_id::text AS id FROM ingest_objects
 WHERE log_date < $1 AND organization_id NOT IN (SELECT id FROM organizations)
"""
_RECORD = """
INSERT INTO retention_cleanup_logs (run_id, dry_run, what, organization_id, cutoff, index_rows,
    usage_rows, aggregate_rows, objects, bytes, failed_objects, detail, duration_ms, error)
VALUES ($1, $2, $3, $4::uuid, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
"""


@dataclass(slots=True)
class _Recorder:
    """Writes one `retention_cleanup_logs` row per step and keeps the run's totals."""

    conn: asyncpg.Connection
    dry_run: bool
    run_id: uuid.UUID = field(default_factory=uuid.uuid4)
    totals: dict[str, int] = field(default_factory=dict)
    failures: int = 0

    async def record(
        self,
        what: str,
        started: float,
        *,
        organization_id: str | None = None,
        cutoff: date | None = None,
        expiry: Expiry | None = None,
        aggregate_rows: int = 0,
        objects: int = 0,
        detail: str | None = None,
        error: str | None = None,
        also_total: tuple[str, int] | None = None,
        aggregate_total: str = "aggregate_rows",
    ) -> None:
        """`aggregate_total`: the run total that `aggregate_rows` adds to (the column is the
        same); `also_total`: one more (name, count) for the run's totals."""
        e = expiry or Expiry(objects=objects)
        counts = {
            "index_rows": e.index_rows,
            "usage_rows": e.usage_rows,
            "aggregate_rows": aggregate_rows,
            "objects": e.objects,
            "bytes": e.bytes,
            "failed_objects": e.failed_objects,
        }
        totals = {**counts, "aggregate_rows": 0, aggregate_total: aggregate_rows}
        if also_total is not None:
            totals[also_total[0]] = totals.get(also_total[0], 0) + also_total[1]
        for name, value in totals.items():
            self.totals[name] = self.totals.get(name, 0) + value
        error = error or ("; ".join(e.errors[:5]) if e.errors else None)
        self.failures += error is not None
        await self.conn.execute(
            _RECORD, self.run_id, self.dry_run, what, organization_id, cutoff, *counts.values(), detail,
            round((time.monotonic() - started) * 1000), error,
        )  # fmt: skip


async def _expire_rollups(conn: asyncpg.Connection, settings: Settings, today: date, rec: _Recorder) -> None:
    for tier, days, tables in (
        ("hourly", settings.usage_hourly_retention_days, _HOURLY_ROLLUPS),
        ("daily", settings.usage_daily_retention_days, _DAILY_ROLLUPS),
    ):
        started = time.monotonic()
        cutoff = today - timedelta(days=days)
        removed = 0
        for table, column, condition in tables:
            where = f"{column} < $1 {condition}"
            if rec.dry_run:
                removed += await conn.fetchval(
                    f"SELECT count(*) FROM {table} WHERE {where}", _midnight(cutoff)
                )
            else:
                status = await conn.execute(f"DELETE FROM {table} WHERE {where}", _midnight(cutoff))
                removed += int(status.rsplit(" ", 1)[1])
        await rec.record("rollups", started, cutoff=cutoff, aggregate_rows=removed, detail=tier)


async def _ledger_before(conn: asyncpg.Connection, day: date) -> Expiry:
    """The objects (count and bytes) the ledger records before `day`."""
    row = await conn.fetchrow(
        "SELECT count(*) AS n, coalesce(sum(byte_size), 0)::bigint AS b FROM ingest_objects"
        " WHERE log_date < $1",
        day,
    )
    assert row is not None  # an aggregate always returns one row
    return Expiry(objects=row["n"], bytes=row["b"])


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


async def _expire_held_deltas(conn: asyncpg.Connection, settings: Settings, rec: _Recorder) -> dict[str, int]:
    """server_stats deltas held for a server never registered, past the accepted lateness: one
    `held_server_deltas` record per organization (sinks/held_deltas.py)."""
    started = time.monotonic()
    before = held_delta_cutoff(settings.max_event_age_days)
    dropped = await expire_held_server_deltas(conn, before, dry_run=rec.dry_run)
    for organization_id, count in sorted(dropped.items()):
        await rec.record(
            "held_server_deltas", started, organization_id=organization_id, cutoff=before.date(),
            aggregate_rows=count, aggregate_total="held_server_deltas",
        )  # fmt: skip
        started = time.monotonic()
    return dropped


async def _expire_dead_letters(
    s3: S3Client, settings: Settings, retention: timedelta, rec: _Recorder, summary: dict[str, object]
) -> None:
    """The whole values of oversized dead letters older than `retention` (sinks/janitor.py)."""
    started = time.monotonic()
    before = datetime.now(UTC) - retention
    prefix = settings.dlq_object_prefix
    if not dead_letter_prefix_is_safe(prefix):
        # Left alone rather than risk the events' objects; the run fails so it is seen.
        await rec.record(
            "dead_letters", started, cutoff=before.date(), detail=prefix,
            error=f"OMNILOG_DLQ_OBJECT_PREFIX {prefix!r} is empty or overlaps org/: dead letters not expired",
        )  # fmt: skip
        return
    expiry = await expire_dead_letter_values(
        s3, settings.s3_bucket, prefix, before,
        page=EXPIRY_PAGE_OBJECTS, idle_ratio=EXPIRY_IDLE_RATIO, dry_run=rec.dry_run,
    )  # fmt: skip
    await rec.record(
        "dead_letters", started, cutoff=before.date(), expiry=expiry, detail=prefix,
        also_total=("dead_letter_values", expiry.objects),
    )  # fmt: skip
    summary["dead_letter_values"] = expiry.objects


async def _run(
    settings: Settings,
    days_ahead: int,
    retention_days: int,
    orphan_grace: timedelta | None,
    dry_run: bool,
    dead_letter_retention: timedelta,
) -> dict[str, object]:
    conn = await asyncpg.connect(settings.database_url.get_secret_value())
    today = datetime.now(UTC).date()
    rec = _Recorder(conn, dry_run)
    try:
        organizations = await load_organization_retention(conn)
        # The partition-drop line: past every organization's retention (and never closer than the
        # oldest accepted event), so a dropped day is one no organization keeps any more.
        longest = max([retention_days, *(o.days for o in organizations)])
        summary: dict[str, object] = {
            "run_id": str(rec.run_id),
            "dry_run": dry_run,
            "partition_retention_days": longest,
        }
        async with s3_client(settings) as s3:
            if dry_run:
                horizon = max(today - timedelta(days=longest), await load_horizon(conn) or date.min)
                started = time.monotonic()
                await rec.record(
                    "expired_objects", started, cutoff=horizon, expiry=await _ledger_before(conn, horizon)
                )
            else:
                started = time.monotonic()
                summary["created"] = {
                    table: [d.isoformat() for d in days]
                    for table, days in (await create_ahead(conn, days_ahead)).items()
                    if days
                }
                # Advances the retention horizon (committed) before dropping anything behind it.
                dropped = await drop_expired(conn, longest)
                loaded = await load_horizon(conn)
                assert loaded is not None  # drop_expired has just set it
                horizon = loaded
                summary["dropped_days"] = [d.isoformat() for d in dropped]
                await rec.record(
                    "partitions", started, cutoff=horizon, detail=f"{len(dropped)} day(s) dropped"
                )
                # Index rows first (above), then their objects: a failure in between leaves objects
                # with ledger rows, deleted on the next run, never an index row pointing at nothing.
                started = time.monotonic()
                expired = await expire_before_horizon(conn, s3, before=horizon)
                await rec.record("expired_objects", started, cutoff=horizon, expiry=expired)
                summary["expired_objects"] = expired.objects
            summary["retention_horizon"] = horizon.isoformat()
            usage_first_kept = today - timedelta(days=settings.usage_raw_retention_days)
            # Organizations events name but nobody registered keep --retention-days.
            unregistered = [
                OrganizationRetention(r["id"], retention_days, False)
                for r in await conn.fetch(_UNREGISTERED, today - timedelta(days=retention_days))
            ]
            per_org: dict[str, dict[str, int]] = {}
            for org in [*organizations, *unregistered]:
                started = time.monotonic()
                cutoff = org.first_kept_day(today)
                expiry = await expire_organization(
                    conn,
                    s3,
                    org.organization_id,
                    cutoff,
                    usage_first_kept_day=usage_first_kept,
                    since=horizon,
                    page=EXPIRY_PAGE_OBJECTS,
                    idle_ratio=EXPIRY_IDLE_RATIO,
                    dry_run=dry_run,
                )
                await rec.record(
                    "organization", started, organization_id=org.organization_id, cutoff=cutoff, expiry=expiry
                )
                if expiry.index_rows or expiry.objects or expiry.usage_rows or expiry.failed_objects:
                    per_org[org.organization_id] = {
                        "retention_days": org.days, "index_rows": expiry.index_rows,
                        "objects": expiry.objects, "usage_rows": expiry.usage_rows,
                        "failed_objects": expiry.failed_objects,
                    }  # fmt: skip
            summary["organizations"] = per_org
            await _expire_rollups(conn, settings, today, rec)
            summary["held_server_deltas"] = await _expire_held_deltas(conn, settings, rec)
            await _expire_dead_letters(s3, settings, dead_letter_retention, rec, summary)
            if orphan_grace and not dry_run:
                started = time.monotonic()
                orphans = await sweep_orphans(conn, s3, settings.s3_bucket, orphan_grace)
                await rec.record("orphans", started, objects=orphans)
                summary["orphans_deleted"] = orphans
    finally:
        await conn.close()
    summary["deleted" if not dry_run else "would_delete"] = rec.totals
    summary["failures"] = rec.failures
    return summary


def _run_and_record(
    settings: Settings,
    days_ahead: int,
    keep: int,
    grace: timedelta | None,
    dry_run: bool,
    metrics_textfile: Path | None,
    dead_letter_retention: timedelta,
) -> dict[str, object]:
    summary: dict[str, object] | None = None
    began = time.monotonic()
    try:
        summary = asyncio.run(_run(settings, days_ahead, keep, grace, dry_run, dead_letter_retention))
        return summary
    finally:
        # A dry run changes nothing, so it reports nothing either (its counts are predictions).
        if not dry_run:
            _report_metrics(settings, metrics_textfile, summary, time.monotonic() - began)


def _report_metrics(
    settings: Settings, metrics_textfile: Path | None, summary: dict[str, object] | None, duration_s: float
) -> None:
    now = time.time()
    if metrics_textfile is not None:
        write_metrics(metrics_textfile, summary, now=now, duration_s=duration_s)
    if settings.maintain_pushgateway_url:
        try:
            push_metrics(settings.maintain_pushgateway_url, summary, now=now, duration_s=duration_s)
        except OSError as exc:
            # The run's own outcome stands (its exit code, retention_cleanup_logs); a gateway that
            # stays unreachable shows as OmnilogMaintenanceStale once the last pushed success ages.
            click.echo(
                f"warning: could not push metrics to OMNILOG_MAINTAIN_PUSHGATEWAY_URL "
                f"({settings.maintain_pushgateway_url}): {exc}",
                err=True,
            )


@click.command("maintain")
@click.option("--env-file", type=click.Path(path_type=Path), help="A .env-style file of settings.")
@click.option(
    "--days-ahead",
    type=click.IntRange(min=0),
    default=DEFAULT_DAYS_AHEAD,
    show_default=True,
    help="Create the partitions of today and this many days ahead.",
)
@click.option(
    "--retention-days",
    type=click.IntRange(min=1),
    default=None,
    help="Drop days older than this (at least OMNILOG_MAX_EVENT_AGE_DAYS, its default: the oldest "
    "accepted event).",
)
@click.option(
    "--orphan-grace-hours",
    type=click.FloatRange(min=0),
    default=6.0,
    show_default=True,
    help="Delete objects no committed batch recorded once older than this; 0 disables the sweep. "
    "Must be longer than the 1 h after which a flush re-uploads an upload it still holds.",
)
@click.option(
    "--metrics-textfile",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Write the run's metrics (last success, deletions, failures) to this Prometheus text file "
    "(OMNILOG_MAINTAIN_PUSHGATEWAY_URL pushes them to a Pushgateway instead or as well).",
)
@click.option(
    "--dead-letter-retention-days",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Delete the stored whole values of oversized dead letters (OMNILOG_DLQ_OBJECT_PREFIX) once "
    "older than this; default: the retention of organizations nobody registered (--retention-days). "
    "Keep it at least the dead-letter topic's retention.",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Count what a run would delete (recorded in retention_cleanup_logs) and delete nothing.",
)
def command(
    env_file: Path | None,
    days_ahead: int,
    retention_days: int | None,
    orphan_grace_hours: float,
    metrics_textfile: Path | None,
    dead_letter_retention_days: float | None,
    dry_run: bool,
) -> None:
    """Create partitions ahead, drop those past retention with their objects, sweep orphans.

    Prints one JSON summary line.
    """
    settings = load_settings(env_file)
    keep = retention_days or settings.max_event_age_days
    grace = timedelta(hours=orphan_grace_hours) if orphan_grace_hours > 0 else None
    _refuse_unsafe(settings, keep, grace)
    try:
        dead_letters = timedelta(days=dead_letter_retention_days or keep)
        summary = _run_and_record(settings, days_ahead, keep, grace, dry_run, metrics_textfile, dead_letters)
    except (PartitionError, RetentionError) as exc:
        raise click.ClickException(str(exc)) from None
    except (BotoCoreError, ClientError) as exc:
        raise click.ClickException(
            f"object storage (OMNILOG_S3_ENDPOINT_URL, OMNILOG_S3_BUCKET, AWS_*): {type(exc).__name__}: {exc}"
        ) from None
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise click.ClickException(f"database (OMNILOG_DATABASE_URL): {type(exc).__name__}: {exc}") from None
    summary["retention_days"] = keep
    click.echo(orjson.dumps(summary).decode())
    if summary["failures"]:
        # Some objects could not be deleted: their ledger rows stay and the next run retries them;
        # the non-zero exit marks the CronJob run as failed so the failure is seen.
        raise SystemExit(1)
