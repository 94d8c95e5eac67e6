"""Writes the Grafana dashboards under deploy/grafana/dashboards/.

Dashboards are built here rather than edited as raw JSON so that every panel follows one layout
and one query convention, and the metric names stay checkable (tests/deploy reads every query
of the generated JSON). Run after editing: `python deploy/tools/gen_dashboards.py` (`--check`
exits 1 when a committed file is stale; tests/deploy runs the same comparison).

- omnilog-pipeline.json: pipeline health from Prometheus (the workers' own metrics).
- omnilog-gateway-traffic.json: gateway traffic from the Postgres aggregates (`log_aggregates`).
- omnilog-usage.json: AI usage and server health from the Postgres rollups (`usage_hourly`,
  `usage_daily`, `usage_monthly`, `mcp_usage_hourly`, `server_stats`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent.parent / "grafana" / "dashboards"

Panel = dict[str, Any]

_PROM = {"type": "prometheus", "uid": "${datasource}"}
_PG = {"type": "grafana-postgresql-datasource", "uid": "${datasource}"}
# Every Prometheus query is scoped to the chosen deployment(s).
_SEL = 'namespace=~"$namespace", job=~"$job"'
_LEGEND = {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]}


class _Layout:
    """Places panels left to right in rows of 24 grid units."""

    def __init__(self) -> None:
        self.panels: list[Panel] = []
        self._x = 0
        self._y = 0
        self._row_height = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "panels": [],
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self._y},
                "id": len(self.panels) + 1,
            }
        )
        self._y += 1

    def add(self, panel: Panel, w: int, h: int = 8) -> None:
        if self._x + w > 24:
            self._newline()
        panel["gridPos"] = {"h": h, "w": w, "x": self._x, "y": self._y}
        panel["id"] = len(self.panels) + 1
        self.panels.append(panel)
        self._x += w
        self._row_height = max(self._row_height, h)

    def _newline(self) -> None:
        if self._x:
            self._y += self._row_height
        self._x = 0
        self._row_height = 0


def _quantile(q: float, histogram: str, by: str = "") -> str:
    """A percentile of a histogram over all selected pods, at Grafana's rate interval."""
    keys = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({keys}) (rate({histogram}_bucket{{{_SEL}}}[$__rate_interval])))"


def _per_second(counter: str) -> str:
    return f"sum(rate({counter}{{{_SEL}}}[$__rate_interval]))"


def _unit(matcher: str, options: str, unit: str) -> dict[str, Any]:
    return {"matcher": {"id": matcher, "options": options}, "properties": [{"id": "unit", "value": unit}]}


def _prom(expr: str, legend: str, ref: str = "A") -> dict[str, Any]:
    return {"datasource": _PROM, "expr": expr, "legendFormat": legend, "range": True, "refId": ref}


def _sql(sql: str, fmt: str = "time_series", ref: str = "A") -> dict[str, Any]:
    return {
        "datasource": _PG,
        "editorMode": "code",
        "format": fmt,
        "rawQuery": True,
        "rawSql": sql.strip(),
        "refId": ref,
    }


def _refs(targets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for i, target in enumerate(targets):
        target["refId"] = chr(ord("A") + i)
    return targets


def _timeseries(
    title: str,
    targets: list[dict[str, Any]],
    unit: str,
    description: str,
    datasource: dict[str, str],
    thresholds: list[tuple[float, str]] | None = None,
    stack: bool = False,
) -> Panel:
    steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
    steps += [{"color": color, "value": value} for value, color in thresholds or []]
    custom: dict[str, Any] = {"drawStyle": "line", "fillOpacity": 10, "showPoints": "never"}
    if stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    if thresholds:
        custom["thresholdsStyle"] = {"mode": "dashed"}
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": datasource,
        "targets": _refs(targets),
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "custom": custom,
                "thresholds": {"mode": "absolute", "steps": steps},
            },
            "overrides": [],
        },
        "options": {"legend": _LEGEND},
    }


def _stat(
    title: str, target: dict[str, Any], unit: str, description: str, thresholds: list[tuple[float, str]]
) -> Panel:
    steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
    steps += [{"color": color, "value": value} for value, color in thresholds]
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": _PROM,
        "targets": _refs([target]),
        "fieldConfig": {
            "defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
            "overrides": [],
        },
        "options": {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "background"},
    }


def _dashboard(uid: str, title: str, description: str, panels: list[Panel], templating: list[Any]) -> Panel:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["omnilog"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "utc",
        "templating": {"list": templating},
        "annotations": {"list": []},
        "links": [],
        "panels": panels,
    }


def _datasource_var(plugin: str, label: str) -> dict[str, Any]:
    return {"name": "datasource", "label": label, "type": "datasource", "query": plugin, "current": {}}


def _query_var(name: str, label: str, query: Any, datasource: dict[str, str], multi: bool) -> dict[str, Any]:
    var: dict[str, Any] = {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": datasource,
        "query": query,
        "refresh": 2,
        "sort": 1,
        "multi": multi,
        "includeAll": multi,
        "current": {},
    }
    if multi:
        # Matches a missing label too (a Prometheus outside Kubernetes has no namespace).
        var["allValue"] = ".*"
    return var


# The read API (omnilog serve) is its own Prometheus job, named after its Service.
_API_SEL = 'namespace=~"$namespace", job="omnilog-api"'


def _api_panels(lay: _Layout) -> None:
    """Latency per route and errors of the read API (pipeline/api; docs/security.md)."""
    lay.row("Read API")
    latency = "omnilog_api_request_duration_seconds_bucket"
    lay.add(
        _timeseries(
            "API latency per route (p50, p99)",
            [
                _prom(
                    f"histogram_quantile({q}, sum by (route, le) "
                    f"(rate({latency}{{{_API_SEL}}}[$__rate_interval])))",
                    f"{{{{route}}}} p{int(q * 100)}",
                )
                for q in (0.5, 0.99)
            ],
            "s",
            "Request latency of the read API until the last byte is sent, per route template.",
            _PROM,
            thresholds=[(1.0, "orange"), (5.0, "red")],
        ),
        w=12,
    )
    requests = "omnilog_api_requests_total"
    lay.add(
        _timeseries(
            "API requests and errors",
            [
                _prom(
                    f'sum by (status) (rate({requests}{{{_API_SEL}, status=~"[45].."}}[$__rate_interval]))',
                    "{{status}}",
                ),
                _prom(f"sum(rate({requests}{{{_API_SEL}}}[$__rate_interval]))", "all requests"),
            ],
            "reqps",
            "Requests per second, and those answered with an error per status code (401: bad keys, "
            "429: rate-limited keys, 5xx: the API or its dependencies).",
            _PROM,
        ),
        w=12,
    )


# `omnilog maintain`'s gauges, pushed to a Pushgateway under job="omnilog_maintain" (honor_labels):
# scoped by namespace only, the $job variable lists the workers' jobs.
_MAINTAIN_SEL = 'namespace=~"$namespace", job="omnilog_maintain"'


def _maintenance_panels(lay: _Layout) -> None:
    """What the last `omnilog maintain` runs deleted, how long they took, and when one last succeeded."""
    lay.row("Maintenance (retention)")
    lay.add(
        _stat(
            "Since the last successful maintain run",
            _prom(f"time() - max(omnilog_maintain_last_success_timestamp_seconds{{{_MAINTAIN_SEL}}})", "age"),
            "s",
            "Runs are hourly; OmnilogMaintenanceStale fires past 26 h. Empty: nothing reports "
            "(OmnilogMaintenanceNotReported).",
            [(2 * 3600, "orange"), (26 * 3600, "red")],
        ),
        w=6,
    )
    lay.add(
        _timeseries(
            "Deleted by the last run (rows)",
            [
                _prom(
                    f"max by (kind) (omnilog_maintain_last_run_deleted_rows{{{_MAINTAIN_SEL}}})",
                    "{{kind}} rows",
                ),
                _prom(f"max(omnilog_maintain_last_run_deleted_objects{{{_MAINTAIN_SEL}}})", "objects"),
            ],
            "short",
            "Index rows, raw usage rows and rollup rows past their retention, and objects, that the "
            "last run deleted (per organization: retention_cleanup_logs).",
            _PROM,
        ),
        w=6,
    )
    lay.add(
        _timeseries(
            "Deleted by the last run (bytes)",
            [_prom(f"max(omnilog_maintain_last_run_deleted_bytes{{{_MAINTAIN_SEL}}})", "object bytes")],
            "bytes",
            "Bytes of the objects the last run deleted from object storage.",
            _PROM,
        ),
        w=6,
    )
    lay.add(
        _timeseries(
            "Maintain run time and failures",
            [
                _prom(f"max(omnilog_maintain_last_run_duration_seconds{{{_MAINTAIN_SEL}}})", "run time"),
                _prom(f"max(omnilog_maintain_last_run_failed{{{_MAINTAIN_SEL}}})", "last run failed"),
                _prom(f"max(omnilog_maintain_failed_objects{{{_MAINTAIN_SEL}}})", "failed object deletes"),
            ],
            "short",
            "Seconds the last run took (its expiry idles between pages on purpose), 1 when it failed, "
            "and the objects whose delete failed (retried by the next run).",
            _PROM,
        ),
        w=6,
    )


def pipeline_dashboard() -> Panel:
    lay = _Layout()
    lay.row("Now")
    lay.add(
        _stat(
            "Indexed / s",
            _prom(f"sum(job:omnilog_events_indexed:rate1m{{{_SEL}}})", "indexed"),
            "short",
            "Events indexed for the first time per second (recording rule, 1 m rate).",
            [],
        ),
        w=4,
        h=4,
    )
    lay.add(
        _stat(
            "Consumer lag",
            _prom(f"sum(job_topic:omnilog_consumer_lag_messages:sum{{{_SEL}}})", "lag"),
            "short",
            "Messages waiting in the input topic (high watermark minus next offset, all partitions).",
            [(20000, "yellow"), (100000, "red")],
        ),
        w=4,
        h=4,
    )
    lay.add(
        _stat(
            "Freshness p95",
            _prom(f"max(job:omnilog_freshness_seconds:p95_5m{{{_SEL}}})", "p95"),
            "s",
            "Commit time minus started_at, 95th percentile over 5 m. SLO: 30 s.",
            [(15, "yellow"), (30, "red")],
        ),
        w=4,
        h=4,
    )
    lay.add(
        _stat(
            "Since last commit",
            _prom(f"time() - max(omnilog_last_commit_timestamp_seconds{{{_SEL}}})", "age"),
            "s",
            "Seconds since any worker last committed a batch to Postgres (high is fine on an idle topic).",
            [(120, "yellow"), (600, "red")],
        ),
        w=4,
        h=4,
    )
    lay.add(
        _stat(
            "Workers ready",
            _prom(f"sum(omnilog_worker_ready{{{_SEL}}})", "ready"),
            "short",
            "Workers consuming with their dependencies answering.",
            [],
        ),
        w=4,
        h=4,
    )
    lay.add(
        _stat(
            "DLQ limit tripped",
            _prom(f"max(omnilog_dlq_limit_tripped{{{_SEL}}})", "tripped"),
            "bool_yes_no",
            "1 when a worker stopped consuming because too many messages were invalid.",
            [(1, "red")],
        ),
        w=4,
        h=4,
    )

    lay.row("Throughput")
    lay.add(
        _timeseries(
            "Events per second",
            [
                _prom(f"sum(job:omnilog_events_consumed:rate1m{{{_SEL}}})", "consumed"),
                _prom(f"sum(job:omnilog_events_indexed:rate1m{{{_SEL}}})", "indexed"),
                _prom(f"sum(job:omnilog_events_duplicate:rate1m{{{_SEL}}})", "duplicates"),
                _prom(f"sum(job_reason:omnilog_events_dead_lettered:rate5m{{{_SEL}}})", "dead-lettered"),
            ],
            "ops",
            "Consumed = indexed + duplicates + dead-lettered, once batches are committed.",
            _PROM,
        ),
        w=12,
    )
    lay.add(
        _timeseries(
            "Object storage writes",
            [
                _prom(f"sum(job:omnilog_object_bytes_written:rate5m{{{_SEL}}})", "bytes/s"),
                _prom(
                    _quantile(0.5, "omnilog_object_size_bytes"),
                    "median object size",
                ),
            ],
            "bytes",
            "Compressed bytes uploaded per second, and the median object size (tiny objects mean "
            "batches flush on the time bound).",
            _PROM,
        ),
        w=12,
    )
    lay.add(
        _timeseries(
            "Batch size (messages)",
            [
                _prom(
                    _quantile(0.5, "omnilog_batch_events"),
                    "p50",
                ),
                _prom(
                    _quantile(0.99, "omnilog_batch_events"),
                    "p99",
                ),
            ],
            "short",
            "Messages per flushed batch.",
            _PROM,
        ),
        w=12,
    )
    lay.add(
        _timeseries(
            "Objects, orphans and fenced batches",
            [
                _prom(_per_second("omnilog_objects_written_total"), "objects written"),
                _prom(_per_second("omnilog_fenced_batches_total"), "fenced batches"),
                _prom(_per_second("omnilog_orphaned_uploads_total"), "orphaned uploads"),
            ],
            "ops",
            "Objects uploaded per second; batches dropped because another worker owns the partition "
            "now (rebalances); objects left for the janitor.",
            _PROM,
        ),
        w=12,
    )

    lay.row("Lag and freshness")
    lay.add(
        _timeseries(
            "Consumer lag per partition",
            [_prom(f"omnilog_consumer_lag_messages{{{_SEL}}}", "{{topic}}/{{partition}}")],
            "short",
            "Reported by each partition's current owner; never negative.",
            _PROM,
            stack=True,
        ),
        w=12,
    )
    lay.add(
        _timeseries(
            "Freshness percentiles",
            [
                _prom(f"max(job:omnilog_freshness_seconds:p50_5m{{{_SEL}}})", "p50"),
                _prom(f"max(job:omnilog_freshness_seconds:p95_5m{{{_SEL}}})", "p95"),
                _prom(f"max(job:omnilog_freshness_seconds:p99_5m{{{_SEL}}})", "p99"),
            ],
            "s",
            "Postgres commit time minus the event's started_at. Late (backfilled) events raise it.",
            _PROM,
            thresholds=[(30, "red")],
        ),
        w=12,
    )

    lay.row("Dead letters")
    lay.add(
        _timeseries(
            "Dead letters by reason",
            [
                _prom(
                    f"sum by (reason) (job_reason:omnilog_events_dead_lettered:rate5m{{{_SEL}}})",
                    "{{reason}}",
                )
            ],
            "ops",
            "Invalid messages produced to the dead-letter topic, per validation reason.",
            _PROM,
            stack=True,
        ),
        w=12,
    )
    lay.add(
        _timeseries(
            "Dead-letter ratio",
            [
                _prom(
                    f"sum(job_reason:omnilog_events_dead_lettered:rate5m{{{_SEL}}}) / "
                    f"sum(rate(omnilog_events_consumed_total{{{_SEL}}}[5m]))",
                    "dead-lettered / consumed",
                )
            ],
            "percentunit",
            "Share of consumed messages that were invalid. The alert fires above 1%.",
            _PROM,
            thresholds=[(0.01, "red")],
        ),
        w=12,
    )

    lay.row("Flush")
    lay.add(
        _timeseries(
            "Flush stage latency p99",
            [
                _prom(
                    f"max by (stage) (job_stage:omnilog_flush_stage_duration_seconds:p99_5m{{{_SEL}}})",
                    "{{stage}}",
                )
            ],
            "s",
            "99th percentile time per stage of a flush: decode, encode, upload, dlq, postgres, kafka_commit.",
            _PROM,
        ),
        w=12,
    )
    lay.add(
        _timeseries(
            "Flush stage latency p50",
            [_prom(_quantile(0.5, "omnilog_flush_stage_duration_seconds", by="stage"), "{{stage}}")],
            "s",
            "Median time per flush stage.",
            _PROM,
        ),
        w=12,
    )
    lay.add(
        _timeseries(
            "Flush failures by stage",
            [
                _prom(
                    f"sum by (stage) (rate(omnilog_flush_failures_total{{{_SEL}}}[$__rate_interval]))",
                    "{{stage}}",
                )
            ],
            "ops",
            "Failed flush attempts (each is retried). Sustained failures raise OmnilogFlushFailing.",
            _PROM,
            stack=True,
        ),
        w=12,
    )
    lay.add(
        _timeseries(
            "Aggregate merger",
            [
                _prom(_quantile(0.99, "omnilog_aggregate_merge_duration_seconds"), "merge pass p99"),
                _prom(_per_second("omnilog_aggregate_parts_merged_total"), "parts merged / s"),
            ],
            "s",
            "Time of one merger pass folding aggregate parts into log_aggregates, and its throughput.",
            _PROM,
        ),
        w=12,
    )

    lay.row("Retries and permanent errors")
    lay.add(
        _timeseries(
            "Retry attempts by operation",
            [
                _prom(
                    f"sum by (operation) (rate(omnilog_retry_attempts_total{{{_SEL}}}[$__rate_interval]))",
                    "{{operation}}",
                )
            ],
            "ops",
            "Failed attempts that were retried (a retriable error: a dependency unavailable for now), "
            "per operation, over all selected workers.",
            _PROM,
            stack=True,
        ),
        w=12,
    )
    lay.add(
        _timeseries(
            "Retrying for, by operation",
            [
                _prom(
                    f"max by (operation) ((time() - omnilog_retrying_since_timestamp_seconds{{{_SEL}}}) "
                    f"and omnilog_retrying_since_timestamp_seconds{{{_SEL}}} > 0)",
                    "{{operation}}",
                )
            ],
            "s",
            "How long the longest current run of failed attempts of each operation has lasted "
            "(no line: not retrying). OmnilogOperationRetrying fires above 3 minutes.",
            _PROM,
            thresholds=[(180, "red")],
        ),
        w=12,
    )
    lay.add(
        _timeseries(
            "Aggregate merge failures and isolated keys",
            [
                _prom(
                    "sum by (kind) "
                    f"(rate(omnilog_aggregate_merge_failures_total{{{_SEL}}}[$__rate_interval]))",
                    "{{kind}} failures / s",
                ),
                _prom(f"max(omnilog_aggregate_keys_isolated{{{_SEL}}})", "keys held aside"),
            ],
            "short",
            "Merger failures: retriable (the pass is retried) or key (one key held aside so the "
            "others go on). Held-aside keys have stale rollups (OmnilogAggregateKeysIsolated).",
            _PROM,
        ),
        w=12,
    )
    lay.add(
        _timeseries(
            "Fatal stops, offsets and offloaded dead letters",
            [
                _prom(
                    f"sum by (operation) (omnilog_fatal_errors_total{{{_SEL}}})",
                    "fatal stop: {{operation}}",
                ),
                _prom(
                    f"sum by (kind) (omnilog_offset_out_of_range_total{{{_SEL}}})",
                    "offset out of range: {{kind}}",
                ),
                _prom(f"sum(omnilog_offsets_lost_total{{{_SEL}}})", "records lost to retention"),
                _prom(
                    f"sum(omnilog_dead_letters_offloaded_total{{{_SEL}}})",
                    "dead letters offloaded to object storage",
                ),
            ],
            "short",
            "Rare events, counted since each worker started (a restart resets them). Counters rather "
            "than rates: they often step up before a worker's first scrape or right before it exits, "
            "where a rate shows nothing.",
            _PROM,
        ),
        w=12,
    )

    lay.row("Workers")
    lay.add(
        _timeseries(
            "Memory (RSS) per worker",
            [
                _prom(f"process_resident_memory_bytes{{{_SEL}}}", "{{pod}}{{instance}} rss"),
                _prom(f"omnilog_inflight_bytes{{{_SEL}}}", "{{pod}}{{instance}} in flight"),
            ],
            "bytes",
            "Resident memory and the message bytes held and not yet committed (bounded by "
            "OMNILOG_MAX_INFLIGHT_BYTES).",
            _PROM,
        ),
        w=8,
    )
    lay.add(
        _timeseries(
            "CPU per worker",
            [_prom(f"rate(process_cpu_seconds_total{{{_SEL}}}[$__rate_interval])", "{{pod}}{{instance}}")],
            "percentunit",
            "CPU seconds per second (1.0 = one core).",
            _PROM,
        ),
        w=8,
    )
    lay.add(
        _timeseries(
            "Dependencies and restarts",
            [
                _prom(f"min by (dependency) (omnilog_dependency_up{{{_SEL}}})", "{{dependency}} up"),
                _prom(
                    "sum by (pod) (increase(kube_pod_container_status_restarts_total"
                    '{namespace=~"$namespace", container="ingest", pod=~"omnilog-ingest-.*"}[1h]))',
                    "{{pod}} restarts (1h)",
                ),
            ],
            "short",
            "1 = the last call to the dependency succeeded. Restarts come from kube-state-metrics.",
            _PROM,
        ),
        w=8,
    )
    _api_panels(lay)
    _maintenance_panels(lay)
    templating = [
        _datasource_var("prometheus", "Prometheus"),
        _query_var(
            "namespace",
            "Namespace",
            {"query": "label_values(omnilog_events_consumed_total, namespace)", "refId": "ns"},
            _PROM,
            multi=True,
        ),
        _query_var(
            "job",
            "Job",
            {
                "query": 'label_values(omnilog_events_consumed_total{namespace=~"$namespace"}, job)',
                "refId": "job",
            },
            _PROM,
            multi=True,
        ),
    ]
    return _dashboard(
        "omnilog-pipeline",
        "Omnilog / Pipeline health",
        "Ingest workers: throughput, lag, freshness, dead letters, flush stages, memory.",
        lay.panels,
        templating,
    )


# Aggregate rows (docs/contract.md §5): per (org, server, method); per (org, server) with rpc_method NULL;
# per org with both NULL. Percentiles of one window are exact to 1%, but cannot be combined across
# windows or servers: panels show them per server and per window, and tables show the worst window.
_ORG = "a.organization_id::text = ${organization:sqlstring}"
_WINDOW = "a.window_type = ${window:sqlstring}"
_SERVERS = "a.server_id::text IN (${server:sqlstring})"
_SERVER_NAME = "COALESCE(s.name, a.server_id::text)"
_FROM = "FROM log_aggregates a LEFT JOIN mcp_servers s ON s.id = a.server_id"


def gateway_dashboard() -> Panel:
    lay = _Layout()
    lay.row("Traffic per server")
    lay.add(
        _timeseries(
            "Requests per server",
            [
                _sql(f"""
SELECT a.window_start AS "time", {_SERVER_NAME} AS metric, SUM(a.total_requests) AS requests
{_FROM}
WHERE {_WINDOW} AND $__timeFilter(a.window_start) AND {_ORG}
  AND a.server_id IS NOT NULL AND {_SERVERS} AND a.rpc_method IS NULL
GROUP BY 1, 2
ORDER BY 1
""")
            ],
            "short",
            "Requests per window (hour or day) per MCP server.",
            _PG,
            stack=True,
        ),
        w=12,
    )
    lay.add(
        _timeseries(
            "Error rate per server",
            [
                _sql(f"""
SELECT a.window_start AS "time", {_SERVER_NAME} AS metric,
       SUM(a.error_requests)::float8 / NULLIF(SUM(a.total_requests), 0) AS error_rate
{_FROM}
WHERE {_WINDOW} AND $__timeFilter(a.window_start) AND {_ORG}
  AND a.server_id IS NOT NULL AND {_SERVERS} AND a.rpc_method IS NULL
GROUP BY 1, 2
ORDER BY 1
""")
            ],
            "percentunit",
            "Errors (status >= 400, or level error/fatal) over requests, per window and server.",
            _PG,
        ),
        w=12,
    )
    lay.add(
        _timeseries(
            "p95 latency per server",
            [
                _sql(f"""
SELECT a.window_start AS "time", {_SERVER_NAME} AS metric, a.p95_duration_ms AS p95_ms
{_FROM}
WHERE {_WINDOW} AND $__timeFilter(a.window_start) AND {_ORG}
  AND a.server_id IS NOT NULL AND {_SERVERS} AND a.rpc_method IS NULL
ORDER BY 1
""")
            ],
            "ms",
            "95th percentile request duration per window and server (from the merged sketch, 1% accuracy).",
            _PG,
        ),
        w=12,
    )
    lay.add(
        _timeseries(
            "p99 latency per server",
            [
                _sql(f"""
SELECT a.window_start AS "time", {_SERVER_NAME} AS metric, a.p99_duration_ms AS p99_ms
{_FROM}
WHERE {_WINDOW} AND $__timeFilter(a.window_start) AND {_ORG}
  AND a.server_id IS NOT NULL AND {_SERVERS} AND a.rpc_method IS NULL
ORDER BY 1
""")
            ],
            "ms",
            "99th percentile request duration per window and server.",
            _PG,
        ),
        w=12,
    )

    lay.row("Per method")
    lay.add(
        _timeseries(
            "Requests per method",
            [
                _sql(f"""
SELECT a.window_start AS "time", a.rpc_method AS metric, SUM(a.total_requests) AS requests
{_FROM}
WHERE {_WINDOW} AND $__timeFilter(a.window_start) AND {_ORG}
  AND a.server_id IS NOT NULL AND {_SERVERS} AND a.rpc_method IN (${{method:sqlstring}})
GROUP BY 1, 2
ORDER BY 1
""")
            ],
            "short",
            "Requests per window and JSON-RPC method, over the selected servers.",
            _PG,
            stack=True,
        ),
        w=24,
    )
    lay.add(
        {
            "type": "table",
            "title": "Servers and methods over the time range",
            "description": "Requests and errors are exact sums over the range; p95/p99 are the worst "
            "single window in the range (percentiles of different windows cannot be added).",
            "datasource": _PG,
            "targets": _refs(
                [
                    _sql(
                        f"""
SELECT {_SERVER_NAME} AS server, a.rpc_method AS method,
       SUM(a.total_requests) AS requests,
       SUM(a.error_requests) AS errors,
       SUM(a.error_requests)::float8 / NULLIF(SUM(a.total_requests), 0) AS error_rate,
       MAX(a.p95_duration_ms) AS worst_p95_ms,
       MAX(a.p99_duration_ms) AS worst_p99_ms,
       SUM(a.total_bytes_in) AS bytes_in,
       SUM(a.total_bytes_out) AS bytes_out
{_FROM}
WHERE {_WINDOW} AND $__timeFilter(a.window_start) AND {_ORG}
  AND a.server_id IS NOT NULL AND {_SERVERS} AND a.rpc_method IN (${{method:sqlstring}})
GROUP BY 1, 2
ORDER BY requests DESC
LIMIT 500
""",
                        fmt="table",
                    )
                ]
            ),
            "fieldConfig": {
                "defaults": {},
                "overrides": [
                    _unit("byName", "error_rate", "percentunit"),
                    _unit("byRegexp", "worst_p9.*", "ms"),
                    _unit("byRegexp", "bytes_.*", "bytes"),
                ],
            },
            "options": {"showHeader": True, "sortBy": [{"displayName": "requests", "desc": True}]},
        },
        w=24,
        h=12,
    )

    lay.row("Organization total")
    lay.add(
        _timeseries(
            "All requests and errors of the organization",
            [
                _sql(f"""
SELECT a.window_start AS "time", SUM(a.total_requests) AS requests, SUM(a.error_requests) AS errors
{_FROM}
WHERE {_WINDOW} AND $__timeFilter(a.window_start) AND {_ORG}
  AND a.server_id IS NULL AND a.rpc_method IS NULL
GROUP BY 1
ORDER BY 1
""")
            ],
            "short",
            "The organization-wide rows (every server, every method).",
            _PG,
        ),
        w=24,
    )

    org_query = """
SELECT DISTINCT a.organization_id::text AS __value, COALESCE(o.name, a.organization_id::text) AS __text
FROM log_aggregates a LEFT JOIN organizations o ON o.id = a.organization_id
WHERE a.window_type = 'daily' AND a.window_start > now() - interval '35 days'
ORDER BY 2
""".strip()
    server_query = f"""
SELECT DISTINCT a.server_id::text AS __value, {_SERVER_NAME} AS __text
{_FROM}
WHERE a.window_type = 'daily' AND a.window_start > now() - interval '35 days'
  AND {_ORG} AND a.server_id IS NOT NULL
ORDER BY 2
""".strip()
    method_query = f"""
SELECT DISTINCT a.rpc_method AS __text
FROM log_aggregates a
WHERE a.window_type = 'daily' AND a.window_start > now() - interval '35 days'
  AND {_ORG} AND a.rpc_method IS NOT NULL
ORDER BY 1
""".strip()
    templating = [
        _datasource_var("grafana-postgresql-datasource", "Omnilog Postgres"),
        {
            "name": "window",
            "label": "Window",
            "type": "custom",
            "query": "hourly,daily",
            "current": {"text": "hourly", "value": "hourly"},
            "options": [
                {"text": "hourly", "value": "hourly", "selected": True},
                {"text": "daily", "value": "daily", "selected": False},
            ],
            "multi": False,
            "includeAll": False,
        },
        # One organization at a time: percentiles of different organizations cannot be combined.
        {**_query_var("organization", "Organization", org_query, _PG, multi=False)},
        {**_query_var("server", "Server", server_query, _PG, multi=True), "allValue": None},
        {**_query_var("method", "Method", method_query, _PG, multi=True), "allValue": None},
    ]
    return _dashboard(
        "omnilog-gateway-traffic",
        "Omnilog / Gateway traffic",
        "Requests, error rate and p95/p99 latency per MCP server and method, from log_aggregates.",
        lay.panels,
        templating,
    )


# ---- usage dashboard (Postgres: usage rollups, MCP tool calls, server_stats) ----------------------

_U_ORG = "u.org_id = ${organization:sqlstring}::uuid"
_NIL = "'00000000-0000-0000-0000-000000000000'::uuid"
# "project / model", with the sentinels of docs/aggregates.md shown as "(none)"
_U_KEY = (
    f"CASE WHEN u.project_id = {_NIL} THEN '(none)' ELSE u.project_id::text END"
    " || ' / ' || COALESCE(NULLIF(u.model, ''), '(none)')"
)


def _pg_table(title: str, description: str, sql: str, overrides: list[dict[str, Any]], sort: str) -> Panel:
    return {
        "type": "table",
        "title": title,
        "description": description,
        "datasource": _PG,
        "targets": _refs([_sql(sql, fmt="table")]),
        "fieldConfig": {"defaults": {}, "overrides": overrides},
        "options": {"showHeader": True, "sortBy": [{"displayName": sort, "desc": True}]},
    }


def usage_dashboard() -> Panel:
    lay = _Layout()
    lay.row("Tokens and cost")
    lay.add(
        _timeseries(
            "Tokens per hour by project and model",
            [
                _sql(f"""
SELECT u.bucket AS "time", {_U_KEY} AS metric,
       SUM(u.total_input_tokens + u.total_output_tokens)::float8 AS tokens
FROM usage_hourly u
WHERE {_U_ORG} AND $__timeFilter(u.bucket)
GROUP BY 1, 2
ORDER BY 1
""")
            ],
            "short",
            "Input plus output tokens per hour, per project and model (exact sums from usage_hourly).",
            _PG,
            stack=True,
        ),
        w=12,
    )
    lay.add(
        _timeseries(
            "Cost per hour by project and model",
            [
                _sql(f"""
SELECT u.bucket AS "time", {_U_KEY} AS metric, SUM(u.total_cost_cents)::float8 / 100 AS cost
FROM usage_hourly u
WHERE {_U_ORG} AND $__timeFilter(u.bucket)
GROUP BY 1, 2
ORDER BY 1
""")
            ],
            "currencyUSD",
            "Cost per hour, per project and model, in dollars (exact cent sums from usage_hourly).",
            _PG,
            stack=True,
        ),
        w=12,
    )
    lay.row("Users and months")
    lay.add(
        _timeseries(
            "Unique users per day by project and model",
            [
                _sql(f"""
SELECT u.bucket AS "time", {_U_KEY} AS metric, u.unique_users AS users
FROM usage_daily u
WHERE {_U_ORG} AND u.user_id IS NULL
  AND u.bucket >= date_trunc('day', $__timeFrom()::timestamptz, 'UTC') AND u.bucket <= $__timeTo()
ORDER BY 1
""")
            ],
            "short",
            "Distinct users per UTC day (every day overlapping the range) of each project and model "
            "(exact; a user of two models counts in both, so the lines are not added up).",
            _PG,
        ),
        w=12,
    )
    lay.add(
        _pg_table(
            "Months by project and model",
            "usage_monthly: exact sums, distinct users and active days of each month overlapping the range.",
            f"""
SELECT u.month, {_U_KEY} AS project_model, u.request_count AS requests,
       u.total_input_tokens AS input_tokens, u.total_output_tokens AS output_tokens,
       u.total_cost_cents::float8 / 100 AS cost, u.unique_users AS users, u.active_days
FROM usage_monthly u
WHERE {_U_ORG} AND u.month >= date_trunc('month', $__timeFrom()::timestamptz, 'UTC')
  AND u.month <= $__timeTo()
ORDER BY u.month DESC, requests DESC
LIMIT 500
""",
            [_unit("byName", "cost", "currencyUSD")],
            "requests",
        ),
        w=12,
    )
    lay.row("MCP tools and servers")
    lay.add(
        _pg_table(
            "Top MCP tools",
            "Tool calls over the range (mcp_usage_hourly), busiest first, with their error rate.",
            """
SELECT t.tool_name AS tool, COALESCE(s.name, t.server_id::text) AS server, SUM(t.calls) AS calls,
       SUM(t.error_count + t.timeout_count)::float8 / NULLIF(SUM(t.calls), 0) AS error_rate,
       SUM(t.total_latency_ms)::float8 / NULLIF(SUM(t.calls), 0) AS avg_latency_ms
FROM mcp_usage_hourly t LEFT JOIN mcp_servers s ON s.id = t.server_id
WHERE t.org_id = ${organization:sqlstring}::uuid AND $__timeFilter(t.bucket)
GROUP BY 1, 2
ORDER BY calls DESC
LIMIT 20
""",
            [_unit("byName", "error_rate", "percentunit"), _unit("byName", "avg_latency_ms", "ms")],
            "calls",
        ),
        w=12,
    )
    lay.add(
        _timeseries(
            "Error rate per server (server_stats)",
            [
                _sql("""
SELECT $__timeGroupAlias(st.window_start, '5m'), m.name AS metric,
       SUM(st.error_requests)::float8 / NULLIF(SUM(st.total_requests), 0) AS error_rate
FROM server_stats st JOIN mcp_servers m ON m.id = st.server_id
WHERE m.organization_id = ${organization:sqlstring}::uuid AND $__timeFilter(st.window_start)
GROUP BY 1, 2
ORDER BY 1
""")
            ],
            "percentunit",
            "Errors over requests per registered server, from its one-minute server_stats windows "
            "grouped by 5 minutes (exact counts).",
            _PG,
            thresholds=[(0.05, "red")],
        ),
        w=12,
    )
    org_query = """
SELECT DISTINCT u.org_id::text AS __value, COALESCE(o.name, u.org_id::text) AS __text
FROM usage_daily u LEFT JOIN organizations o ON o.id = u.org_id
WHERE u.user_id IS NULL AND u.bucket > now() - interval '35 days'
ORDER BY 2
""".strip()
    templating = [
        _datasource_var("grafana-postgresql-datasource", "Omnilog Postgres"),
        {**_query_var("organization", "Organization", org_query, _PG, multi=False)},
    ]
    return _dashboard(
        "omnilog-usage",
        "Omnilog / AI usage",
        "Tokens and cost by project and model, unique users, months, top MCP tools and server error "
        "rates, from the Postgres rollups.",
        lay.panels,
        templating,
    )


def render_all() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {
        f"{board['uid']}.json": json.dumps(board, indent=2, sort_keys=False) + "\n"
        for board in (pipeline_dashboard(), gateway_dashboard(), usage_dashboard())
    }


def main(argv: list[str]) -> int:
    rendered = render_all()
    if "--check" in argv:
        stale = [name for name, text in rendered.items() if (OUT_DIR / name).read_text() != text]
        for name in stale:
            print(f"{OUT_DIR / name} is stale: run python deploy/tools/gen_dashboards.py")
        return 1 if stale else 0
    for name, text in rendered.items():
        (OUT_DIR / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
