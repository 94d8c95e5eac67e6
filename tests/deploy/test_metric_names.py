"""Every metric a dashboard, an alert or the HPA queries is one the worker exports (or one of the
few Kubernetes/process metrics listed below on purpose), and every recording rule a dashboard or
alert uses is defined."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
import yaml
from prometheus_client import CollectorRegistry, ProcessCollector

from pipeline.api.middleware import ApiMetrics
from pipeline.commands.maintain import MaintainMetrics
from pipeline.metrics import WorkerMetrics
from tests.deploy.support import DASHBOARDS, KUBE, RULES_FILE

# Metrics we query that the worker's own WorkerMetrics do not define, on purpose:
# - process_*: prometheus_client's process collector in the worker (memory and CPU panels);
# - kube_pod_container_status_restarts_total: kube-state-metrics (OmnilogWorkerRestarting);
# - up: Prometheus itself, per scrape target (OmnilogWorkersDown).
PROCESS_METRICS = {"process_resident_memory_bytes", "process_cpu_seconds_total"}
EXTERNAL_METRICS = {"kube_pod_container_status_restarts_total", "up"}

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
}
_RECORDED = re.compile(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b")
_OMNILOG = re.compile(r"\bomnilog_[a-z_]+\b")
_OTHER = re.compile(r"\b(?:process_[a-z_]+|kube_[a-z_]+|up(?=\s*[{\[)]|\s*==|\s*$))")


def exported_names() -> set[str]:
    """Sample names of a worker's registry, as Prometheus sees them when scraped."""
    registry = CollectorRegistry()
    WorkerMetrics(registry)
    ApiMetrics(registry)  # the read API's (pipeline/api), scraped as job="omnilog-api"
    MaintainMetrics.register(registry)  # `omnilog maintain`'s text file (a textfile collector)
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return names


def referenced(expr: str) -> tuple[set[str], set[str], set[str]]:
    """(recording-rule names, omnilog_* names, other metric names) in one PromQL expression."""
    without_strings = re.sub(r'"[^"]*"|\'[^\']*\'', '""', expr)
    recorded = set(_RECORDED.findall(without_strings))
    rest = _RECORDED.sub(" ", without_strings)
    return recorded, set(_OMNILOG.findall(rest)), set(_OTHER.findall(rest))


def _rule_exprs() -> Iterator[tuple[str, str]]:
    for group in yaml.safe_load(RULES_FILE.read_text())["groups"]:
        for rule in group["rules"]:
            yield f"rule {rule.get('record') or rule.get('alert')}", rule["expr"]


def _dashboard_exprs() -> Iterator[tuple[str, str]]:
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                if "expr" in target:
                    yield f"{path.name} panel {panel['title']!r}", target["expr"]
        for var in board["templating"]["list"]:
            query = var.get("query")
            if isinstance(query, dict) and "query" in query and var["datasource"]["type"] == "prometheus":
                yield f"{path.name} variable {var['name']}", query["query"]


def _hpa_exprs() -> Iterator[tuple[str, str]]:
    hpa = yaml.safe_load((KUBE / "components" / "hpa" / "hpa.yaml").read_text())
    for metric in hpa["spec"]["metrics"]:
        if metric["type"] == "External":
            yield "components/hpa external metric", metric["external"]["metric"]["name"]


def _all_exprs() -> list[tuple[str, str]]:
    return [*_rule_exprs(), *_dashboard_exprs(), *_hpa_exprs()]


def problems(exprs: list[tuple[str, str]], exported: set[str], recorded_names: set[str]) -> list[str]:
    found = []
    for where, expr in exprs:
        recorded, own, other = referenced(expr)
        found += [f"{where}: recording rule {n} is not defined" for n in recorded - recorded_names]
        found += [f"{where}: {n} is not exported by the worker" for n in own - exported]
        found += [
            f"{where}: {n} is not an intended external metric"
            for n in other - PROCESS_METRICS - EXTERNAL_METRICS
        ]
    return found


def _recorded_names() -> set[str]:
    return {name for where, _ in _rule_exprs() if (name := where.removeprefix("rule ")) and ":" in name}


def test_every_queried_metric_is_exported() -> None:
    exprs = _all_exprs()
    assert len(exprs) > 40, "too few expressions found: is the extraction broken?"
    assert problems(exprs, exported_names(), _recorded_names()) == []


def test_the_checker_catches_a_misspelt_or_unknown_metric() -> None:
    bad = [
        ("typo", 'sum(rate(omnilog_events_consumd_total{job="x"}[1m]))'),
        ("base name of a histogram", "rate(omnilog_freshness_seconds[5m])"),
        ("undefined recording rule", "job:omnilog_events_indexed:rate5m > 0"),
        ("unlisted external metric", "kube_pod_status_phase == 1"),
    ]
    assert len(problems(bad, exported_names(), _recorded_names())) == len(bad)


def test_label_values_inside_selectors_are_not_mistaken_for_metrics() -> None:
    recorded, own, other = referenced('sum(omnilog_worker_ready{job="omnilog_ingest_x", pod=~"up"})')
    assert (recorded, own, other) == (set(), {"omnilog_worker_ready"}, set())


def test_every_worker_metric_is_shown_or_alerted_on() -> None:
    # The reverse direction: a metric nobody looks at is either dead code or a missing panel.
    used: set[str] = set()
    for _, expr in _all_exprs():
        used |= referenced(expr)[1]
    families = {re.sub(r"(_total|_created|_bucket|_sum|_count)$", "", n) for n in exported_names()}
    unused = {f for f in families if not any(u == f or u.startswith(f + "_") for u in used)}
    assert unused == set()


@pytest.mark.parametrize("name", sorted(PROCESS_METRICS))
def test_process_metrics_come_from_prometheus_client(name: str) -> None:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    samples = {s.name for family in registry.collect() for s in family.samples}
    assert name in samples
