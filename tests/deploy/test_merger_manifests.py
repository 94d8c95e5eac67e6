"""The aggregates merger's Deployment (`omnilog merge`) in every variant: it runs the same image
as the workers with the same settings, is probed and scraped like them, and the workers' own
in-process merger is off wherever the Deployment runs."""

from __future__ import annotations

import pytest

from pipeline.settings import load_settings
from sinks.aggregates import build_merger_loop
from tests.deploy.conftest import VARIANT_NAMES
from tests.deploy.support import config_data, only
from tests.deploy.test_kubernetes_manifests import Rendered


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_merger_runs_omnilog_merge_probed_and_scraped(rendered: Rendered, variant: str) -> None:
    manifests = rendered[variant]
    merger = only(manifests, "Deployment", "omnilog-merger")
    ingest = only(manifests, "Deployment", "omnilog-ingest")
    pod = merger["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][:1] == ["merge"]
    assert container["image"] == ingest["spec"]["template"]["spec"]["containers"][0]["image"]
    assert container["envFrom"] == ingest["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    config = config_data(manifests)
    port = next(p for p in container["ports"] if p["name"] == "metrics")
    assert port["containerPort"] == int(config["OMNILOG_METRICS_PORT"])
    for probe, path in (
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ):
        assert container[probe]["httpGet"] == {"path": path, "port": "metrics"}
    assert merger["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert pod["terminationGracePeriodSeconds"] >= 20  # a pass commits well within it

    labels = merger["spec"]["template"]["metadata"]["labels"]
    service = only(manifests, "Service", "omnilog-merger")
    monitor = only(manifests, "ServiceMonitor", "omnilog-merger")
    policy = only(manifests, "NetworkPolicy", "omnilog")

    def matches(selector: dict[str, str], target: dict[str, str]) -> bool:
        return all(target.get(k) == v for k, v in selector.items())

    assert matches(service["spec"]["selector"], labels)
    assert matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert matches(policy["spec"]["podSelector"]["matchLabels"], labels)  # Prometheus may scrape it
    # The ingest Service and PDB must not pick the mergers up as workers.
    ingest_service = only(manifests, "Service", "omnilog-ingest")
    assert not matches(ingest_service["spec"]["selector"], labels)
    assert not matches(
        only(manifests, "PodDisruptionBudget", "omnilog-ingest")["spec"]["selector"]["matchLabels"], labels
    )


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_workers_leave_merging_to_the_merger_deployment(rendered: Rendered, variant: str) -> None:
    settings = load_settings(
        **config_data(rendered[variant]), OMNILOG_DATABASE_URL="postgresql://u@db/omnilog"
    )
    assert settings.merger_in_worker is False
    # The shard settings build a merger (an index out of range would fail here, not in the pod).
    loop = build_merger_loop(settings)
    assert len(loop.shards) == settings.merge_shards > 1
