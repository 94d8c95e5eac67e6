"""The read API's manifests in every variant: the same image as the workers, its own Secret,
probes on its port, a Service, ServiceMonitor and PodDisruptionBudget that select its pods, and a
NetworkPolicy that admits that port only."""

from __future__ import annotations

import pytest

from pipeline.settings import load_settings
from tests.deploy.conftest import VARIANT_NAMES
from tests.deploy.support import Manifest, config_data, only

Rendered = dict[str, list[Manifest]]


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_api_deployment_service_monitor_pdb_and_policy(rendered: Rendered, variant: str) -> None:
    manifests = rendered[variant]
    api = only(manifests, "Deployment", "omnilog-api")
    worker = only(manifests, "Deployment", "omnilog-ingest")
    pod = api["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["args"][0] == "serve"
    assert container["image"] == worker["spec"]["template"]["spec"]["containers"][0]["image"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    load_settings(**{**config_data(manifests), **env}, OMNILOG_DATABASE_URL="postgresql://u@db/omnilog")
    port = next(p for p in container["ports"] if p["name"] == "http")
    assert port["containerPort"] == int(env["OMNILOG_API_PORT"])
    assert env["OMNILOG_API_HOST"] == "0.0.0.0", "the API must listen on the pod's address"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert api["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    labels = pod["metadata"]["labels"]
    service = only(manifests, "Service", "omnilog-api")
    monitor = only(manifests, "ServiceMonitor", "omnilog-api")
    pdb = only(manifests, "PodDisruptionBudget", "omnilog-api")
    policy = only(manifests, "NetworkPolicy", "omnilog-api")
    assert _matches(service["spec"]["selector"], labels)
    assert not _matches(service["spec"]["selector"], worker["spec"]["template"]["metadata"]["labels"])
    assert _matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert [(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]] == [("http", "/metrics")]
    assert _matches(pdb["spec"]["selector"]["matchLabels"], labels)
    assert _matches(policy["spec"]["podSelector"]["matchLabels"], labels)
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert allowed == {int(env["OMNILOG_API_PORT"])}
    # The workers' policy does not select the API pods (policies add up: it would open 9400 too).
    worker_policy = only(manifests, "NetworkPolicy", "omnilog")
    assert not _matches(worker_policy["spec"]["podSelector"]["matchLabels"], labels)
