"""A real Prometheus, loaded with deploy/prometheus/rules/omnilog.rules.yml, scrapes a running
`omnilog ingest` on loopback while `omnilog produce` sends a small ingestion; the recording rules
must evaluate to the throughput the worker actually achieved and to its real freshness."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.devtools.stack.ports import free_ports
from pipeline.settings import Settings
from sinks.migrate import migrate
from tests.deploy.support import RULES_FILE, tool

pytestmark = pytest.mark.integration

OMNILOG = str(Path(sys.executable).parent / "omnilog")
EVENTS = 3000
RATE = 150  # events/s: a 20 s ingestion, well inside the rules' 1-minute window
FRESHNESS_EDGES = (0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)


def _env(settings: Settings, metrics_port: int) -> dict[str, str]:
    key, secret = settings.aws_access_key_id, settings.aws_secret_access_key
    return {
        **os.environ,
        "OMNILOG_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "OMNILOG_DATABASE_URL": settings.database_url.get_secret_value(),
        "OMNILOG_S3_ENDPOINT_URL": settings.s3_endpoint_url,
        "OMNILOG_S3_BUCKET": settings.s3_bucket,
        "OMNILOG_TOPIC": settings.topic,
        "OMNILOG_DLQ_TOPIC": settings.dlq_topic,
        "OMNILOG_CONSUMER_GROUP": settings.consumer_group,
        "OMNILOG_METRICS_PORT": str(metrics_port),
        "AWS_ACCESS_KEY_ID": key.get_secret_value() if key else "",
        "AWS_SECRET_ACCESS_KEY": secret.get_secret_value() if secret else "",
        "AWS_REGION": settings.aws_region,
        "OMNILOG_BATCH_MAX_AGE_S": "0.5",
    }


@asynccontextmanager
async def _process(
    args: list[str], log: Path, env: dict[str, str] | None = None
) -> AsyncIterator[subprocess.Popen[bytes]]:
    with log.open("ab") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, 40)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)


async def _wait_for(what: str, check: Callable[[], Any], timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with suppress(httpx.HTTPError):
            if await check():
                return
        await asyncio.sleep(0.25)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{tail}")


def _prometheus_config(path: Path, worker_port: int) -> None:
    # Scraped and evaluated every second so a short test sees many samples; the job name is the
    # Kubernetes Service name, as the rules and dashboards expect.
    path.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {RULES_FILE}\n"
        "scrape_configs:\n  - job_name: omnilog-ingest\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{worker_port}']\n"
    )


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


class _CounterLog:
    """The worker's own counters, read straight from its /metrics every 250 ms: the ground truth
    the recording rules are compared with."""

    def __init__(self, client: httpx.AsyncClient, url: str) -> None:
        self.client, self.url = client, url
        self.points: list[tuple[float, float, float]] = []  # (unix time, consumed, indexed)
        self.last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    async def run(self) -> None:
        while True:
            with suppress(httpx.HTTPError):
                self.last = _samples((await self.client.get(self.url)).text)
                consumed = self.last.get(("omnilog_events_consumed_total", ()), 0.0)
                indexed = self.last.get(("omnilog_events_indexed_total", ()), 0.0)
                self.points.append((time.time(), consumed, indexed))
            await asyncio.sleep(0.25)

    def at(self, when: float, column: int) -> float:
        """Counter value at `when` (the last reading at or before it; 0 before the first)."""
        value = 0.0
        for point in self.points:
            if point[0] > when:
                break
            value = point[column]
        return value


async def _query(client: httpx.AsyncClient, base: str, expr: str) -> list[dict[str, Any]]:
    response = await client.get(f"{base}/api/v1/query", params={"query": expr})
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def test_recording_rules_match_the_throughput_a_scraped_worker_achieved(
    fresh_database_url: str, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(database_url=fresh_database_url)
    await migrate(fresh_database_url)
    worker_port, prom_port = free_ports(2)
    env = _env(settings, worker_port)
    topics = subprocess.run(
        [OMNILOG, "topics", "--partitions", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert topics.returncode == 0, topics.stdout + topics.stderr

    config = tmp_path / "prometheus.yml"
    _prometheus_config(config, worker_port)
    prom = f"http://127.0.0.1:{prom_port}"
    worker_url = f"http://127.0.0.1:{worker_port}"
    prometheus_args = [
        tool("prometheus"),
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
        "--log.level=warn",
    ]
    async with (
        httpx.AsyncClient(timeout=5.0) as client,
        _process(prometheus_args, tmp_path / "prometheus.log"),
        _process([OMNILOG, "ingest"], tmp_path / "worker.log", env),
    ):

        async def prometheus_ready() -> bool:
            return (await client.get(f"{prom}/-/ready")).status_code == 200

        async def worker_ready() -> bool:
            return (await client.get(f"{worker_url}/readyz")).status_code == 200

        await _wait_for("Prometheus", prometheus_ready, 60, tmp_path / "prometheus.log")
        await _wait_for("the worker to join its group", worker_ready, 90, tmp_path / "worker.log")
        counters = _CounterLog(client, f"{worker_url}/metrics")
        sampler = asyncio.create_task(counters.run())
        try:
            produce = await asyncio.to_thread(
                subprocess.run,
                [OMNILOG, "produce", "--count", str(EVENTS), "--rate", str(RATE), "--seed", "7",
                 "--orgs", "3", "--span-hours", "0.002", "--no-progress"],
                env=env, capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            assert produce.returncode == 0, produce.stdout + produce.stderr

            async def all_indexed() -> bool:
                return bool(counters.points) and counters.points[-1][2] >= EVENTS

            await _wait_for(f"{EVENTS} events indexed", all_indexed, 90, tmp_path / "worker.log")
            await asyncio.sleep(3.0)  # a few more scrapes and rule evaluations

            indexed = await _query(client, prom, "timestamp(job:omnilog_events_indexed:rate1m)")
            (recorded,) = await _query(
                client, prom, 'job:omnilog_events_indexed:rate1m{job="omnilog-ingest"}'
            )
            (consumed,) = await _query(
                client, prom, 'job:omnilog_events_consumed:rate1m{job="omnilog-ingest"}'
            )
        finally:
            sampler.cancel()
            with suppress(asyncio.CancelledError):
                await sampler

        # The rule's value at its last evaluation time T is the worker's throughput over (T-60s, T]:
        # the increase of its own counter in that minute, divided by 60.
        evaluated_at = float(indexed[0]["value"][1])
        for column, sample, name in ((2, recorded, "indexed"), (1, consumed, "consumed")):
            truth = (counters.at(evaluated_at, column) - counters.at(evaluated_at - 60, column)) / 60
            value = float(sample["value"][1])
            assert truth > EVENTS / 60 * 0.5, f"the ingestion fell outside the window ({name})"
            # Prometheus extrapolates a window's increase to its edges: a few % at 1 s scrapes.
            assert value == pytest.approx(truth, rel=0.06), (
                f"{name}: rule {value:.2f}/s, worker did {truth:.2f}/s"
            )
        assert counters.points[-1][1] == EVENTS and counters.points[-1][2] == EVENTS

        # Freshness percentiles: the recorded p50 lies in the histogram bucket of the true median
        # of (commit time - started_at), read back from Postgres.
        conn = await asyncpg.connect(fresh_database_url)
        try:
            true_median = await conn.fetchval(
                "SELECT percentile_cont(0.5) WITHIN GROUP"
                " (ORDER BY extract(epoch FROM created_at - started_at)) FROM log_index"
            )
        finally:
            await conn.close()
        (p50,) = await _query(client, prom, "job:omnilog_freshness_seconds:p50_5m")
        low = max([0.0, *[e for e in FRESHNESS_EDGES if e <= true_median * 0.95]])
        high = min(e for e in FRESHNESS_EDGES if e >= true_median * 1.05)
        assert low <= float(p50["value"][1]) <= high, (
            f"p50 {p50['value'][1]} vs true median {true_median:.2f}s"
        )
        for rule in ("p95_5m", "p99_5m"):
            (upper,) = await _query(client, prom, f"job:omnilog_freshness_seconds:{rule}")
            assert float(p50["value"][1]) <= float(upper["value"][1]) <= FRESHNESS_EDGES[-1]

        # Every rule evaluated without error against the live series, and nothing fires.
        groups = (await client.get(f"{prom}/api/v1/rules")).json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        assert len(rules) >= 19
        assert [r["name"] for r in rules if r["health"] != "ok"] == [], [r.get("lastError") for r in rules]
        alerts = {
            a["labels"]["alertname"]: a["state"]
            for a in (await client.get(f"{prom}/api/v1/alerts")).json()["data"]["alerts"]
        }
        # No `omnilog maintain` pushes metrics here, so the alert on their absence is pending (it
        # fires after 26 h); every other alert must be neither pending nor firing.
        assert alerts.pop("OmnilogMaintenanceNotReported", "pending") == "pending"
        assert alerts == {}
        (up,) = await _query(client, prom, 'up{job="omnilog-ingest"}')
        assert up["value"][1] == "1"

        # The memory and CPU panels read prometheus_client's process collector from the worker.
        for name in ("process_resident_memory_bytes", "process_cpu_seconds_total"):
            assert await _query(client, prom, f'{name}{{job="omnilog-ingest"}}'), (
                f"worker does not export {name}"
            )
