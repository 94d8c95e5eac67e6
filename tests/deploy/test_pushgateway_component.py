"""components/pushgateway, which the dev and prod overlays include: it renders, validates against
the Kubernetes schemas and checkov, and is wired as the maintain CronJob and Prometheus need it (the
setting names the gateway's Service, the ServiceMonitor scrapes it with honorLabels, the network
policies let pushes and scrapes in)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate
import pytest
import yaml

from pipeline.settings import load_settings
from tests.deploy.crd_schemas import BY_KIND
from tests.deploy.support import CRD_KINDS, KUBE, Manifest, assert_checkov_clean, config_data, kustomize, only

K8S_VERSIONS = ["1.28.0", "1.37.0"]
GATEWAY = "omnilog-pushgateway"


@pytest.fixture(scope="module")
def manifests() -> list[Manifest]:
    return kustomize(KUBE / "overlays" / "prod")


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_both_overlays_report_maintenance_to_their_gateway(overlay: str) -> None:
    # Without it the maintain CronJob's metrics reach no one and OmnilogMaintenanceNotReported fires.
    rendered = kustomize(KUBE / "overlays" / overlay)
    assert only(rendered, "Deployment", GATEWAY)
    assert config_data(rendered)["OMNILOG_MAINTAIN_PUSHGATEWAY_URL"] == f"http://{GATEWAY}:9091"


def _gateway(manifests: list[Manifest]) -> list[Manifest]:
    return [m for m in manifests if m["metadata"]["name"] == GATEWAY]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_the_component_validates_against_kubernetes_schemas(manifests: list[Manifest], version: str) -> None:
    kinds = {m["kind"] for m in _gateway(manifests)}
    assert kinds == {"Deployment", "Service", "ServiceMonitor", "NetworkPolicy"}
    for manifest in _gateway(manifests):
        assert manifest["metadata"]["namespace"] == "omnilog"
        if manifest["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(manifest, version, strict=True)


def test_the_service_monitor_honors_the_pushed_labels(manifests: list[Manifest]) -> None:
    monitor = only(manifests, "ServiceMonitor", GATEWAY)
    jsonschema.validate(monitor, BY_KIND["ServiceMonitor"])
    (endpoint_spec,) = monitor["spec"]["endpoints"]
    assert endpoint_spec["honorLabels"] is True

    service = only(manifests, "Service", GATEWAY)
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert endpoint_spec["port"] in {p["name"] for p in service["spec"]["ports"]}


def test_the_maintain_cronjob_pushes_to_the_gateways_service(manifests: list[Manifest]) -> None:
    data = config_data(manifests)
    settings = load_settings(**data, OMNILOG_DATABASE_URL="postgresql://u@db/omnilog")
    url = urlsplit(settings.maintain_pushgateway_url)
    service = only(manifests, "Service", GATEWAY)
    assert url.scheme == "http" and url.hostname == GATEWAY
    assert url.port in {p["port"] for p in service["spec"]["ports"]}

    cron = only(manifests, "CronJob", "omnilog-maintain")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (config_ref,) = [e["configMapRef"]["name"] for e in pod["containers"][0]["envFrom"]]
    assert only(manifests, "ConfigMap", config_ref)["data"] == data

    deployment = only(manifests, "Deployment", GATEWAY)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    target = next(p for p in service["spec"]["ports"] if p["port"] == url.port)["targetPort"]
    assert target in {p["name"] for p in container["ports"]}
    listen = next(a for a in container["args"] if a.startswith("--web.listen-address="))
    assert listen.endswith(f":{container['ports'][0]['containerPort']}")


def test_network_policies_let_pushes_and_scrapes_reach_the_gateway(manifests: list[Manifest]) -> None:
    deployment = only(manifests, "Deployment", GATEWAY)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    port = deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    selecting = [
        p
        for p in manifests
        if p["kind"] == "NetworkPolicy"
        and p["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    ]
    # Only its own policy applies: the workers' (port 9400 only) must not select the gateway.
    assert [p["metadata"]["name"] for p in selecting] == [GATEWAY]
    allowed = {q["port"] for rule in selecting[0]["spec"]["ingress"] for q in rule["ports"]}
    assert port in allowed


def test_checkov_passes_the_component(manifests: list[Manifest], tmp_path: Path) -> None:
    (tmp_path / "pushgateway.yaml").write_text(yaml.safe_dump_all(_gateway(manifests)))
    assert_checkov_clean(tmp_path, min_passed=50)
