"""The kustomize base, the dev and prod overlays and the HPA variant: they render, validate
against the Kubernetes schemas, pass checkov, and hold the properties the runbooks rely on."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate
import pytest
import yaml

from pipeline.settings import Settings, load_settings
from tests.deploy.conftest import VARIANT_NAMES
from tests.deploy.crd_schemas import BY_KIND
from tests.deploy.support import (
    CRD_KINDS,
    DASHBOARDS,
    DEPLOY,
    RULES_FILE,
    Manifest,
    assert_checkov_clean,
    config_data,
    only,
    pod_specs,
)

# The oldest Kubernetes we support (CronJob timeZone is GA from 1.27) and the newest schemas shipped.
K8S_VERSIONS = ["1.28.0", "1.37.0"]
SECRET_KEYS = {
    "OMNILOG_DATABASE_URL",
    "OMNILOG_API_DATABASE_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
}

Rendered = dict[str, list[Manifest]]


def _setting_names() -> set[str]:
    names: set[str] = set()
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        names.update(c for c in getattr(alias, "choices", []) if isinstance(c, str))
    return names


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_variant_renders_the_whole_deployment(rendered: Rendered, variant: str) -> None:
    kinds = {m["kind"] for m in rendered[variant]}
    assert {
        "ServiceAccount",
        "ConfigMap",
        "Deployment",
        "Service",
        "ServiceMonitor",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "Job",
        "CronJob",
        "PrometheusRule",
    } <= kinds
    assert "Secret" not in kinds, "secret values must never be committed; the Secret is made by the operator"
    namespaces = {m["metadata"].get("namespace") for m in rendered[variant]}
    assert len(namespaces) == 1 and None not in namespaces, f"every object in one namespace: {namespaces}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_builtin_kinds_validate_against_kubernetes_schemas(
    rendered: Rendered, variant: str, version: str
) -> None:
    checked = 0
    for manifest in rendered[variant]:
        if manifest["kind"] in CRD_KINDS:
            continue  # not in the Kubernetes schemas: test_custom_resources_validate_structurally
        kubernetes_validate.validate(manifest, version, strict=True)
        checked += 1
    assert checked >= 9


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_custom_resources_validate_structurally(rendered: Rendered, variant: str) -> None:
    crds = [m for m in rendered[variant] if m["kind"] in CRD_KINDS]
    assert {m["kind"] for m in crds} >= {"ServiceMonitor", "PrometheusRule"}
    for manifest in crds:
        jsonschema.validate(manifest, BY_KIND[manifest["kind"]])


def test_crd_schemas_reject_a_misspelt_field(rendered: Rendered) -> None:
    scaled = only(rendered["prod"], "ScaledObject")
    broken = json.loads(json.dumps(scaled))
    broken["spec"]["triggers"][0]["metadata"]["lagTreshold"] = "10"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, BY_KIND["ScaledObject"])


def test_checkov_passes_every_variant_and_every_skip_is_justified(rendered: Rendered, tmp_path: Path) -> None:
    for variant, manifests in rendered.items():
        (tmp_path / f"{variant}.yaml").write_text(yaml.safe_dump_all(manifests))
    assert_checkov_clean(tmp_path, min_passed=500)


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_every_pod_is_unprivileged_with_a_read_only_root(rendered: Rendered, variant: str) -> None:
    specs = pod_specs(rendered[variant])
    assert {name.split("/")[0] for name, _ in specs} == {"Deployment", "Job", "CronJob"}
    for name, spec in specs:
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["runAsUser"] == 10001, f"{name}: must match the Dockerfile's USER"
        tmp_volumes = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for container in spec["containers"]:
            ctx = container["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True, name
            assert ctx["allowPrivilegeEscalation"] is False, name
            assert ctx["capabilities"]["drop"] == ["ALL"], name
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert mounts.get("/tmp") in tmp_volumes, f"{name}: /tmp must be a writable emptyDir"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= container["resources"][kind].keys(), name


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_secrets_are_references_to_one_mounted_env_file(rendered: Rendered, variant: str) -> None:
    for name, spec in pod_specs(rendered[variant]):
        secret_volumes = [v for v in spec["volumes"] if "secret" in v]
        # The API has its own Secret: its pods never hold the owner's database URL (docs/security.md).
        expected = "omnilog-api-secrets" if name == "Deployment/omnilog-api" else "omnilog-secrets"
        assert [v["secret"]["secretName"] for v in secret_volumes] == [expected], name
        (container,) = spec["containers"]
        mount = next(m for m in container["volumeMounts"] if m["name"] == secret_volumes[0]["name"])
        assert mount["readOnly"] is True
        args = container["args"]
        env_file = args[args.index("--env-file") + 1]
        assert env_file == f"{mount['mountPath']}/omnilog.env", f"{name}: --env-file must be the mounted key"
        env_names = {e["name"] for e in container.get("env", [])}
        assert not env_names & SECRET_KEYS, f"{name}: secret settings belong in the Secret file"


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_configmap_holds_valid_settings_only(rendered: Rendered, variant: str) -> None:
    data = config_data(rendered[variant])
    unknown = set(data) - _setting_names()
    assert not unknown, f"not settings of pipeline/settings.py: {unknown}"
    assert not set(data) & SECRET_KEYS, "secret settings must not be in the ConfigMap"
    # The values must load as a worker would load them (a dummy URL stands in for the Secret).
    load_settings(**data, OMNILOG_DATABASE_URL="postgresql://u@db/omnilog")
    for name, spec in pod_specs(rendered[variant]):
        refs = [e["configMapRef"]["name"] for e in spec["containers"][0]["envFrom"]]
        assert refs == [only(rendered[variant], "ConfigMap", refs[0])["metadata"]["name"]], name


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_worker_probes_ports_and_drain_grace(rendered: Rendered, variant: str) -> None:
    manifests = rendered[variant]
    deployment = only(manifests, "Deployment", "omnilog-ingest")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][0] == "ingest"
    config = config_data(manifests)
    port = next(p for p in container["ports"] if p["name"] == "metrics")
    assert port["containerPort"] == int(config["OMNILOG_METRICS_PORT"])
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    # SIGTERM drains for up to OMNILOG_SHUTDOWN_GRACE_S; the kubelet's SIGKILL must come after it,
    # with room for the final commit and the consumer leaving the group.
    grace = float(config.get("OMNILOG_SHUTDOWN_GRACE_S", Settings.model_fields["shutdown_grace_s"].default))
    assert pod["terminationGracePeriodSeconds"] >= grace + 15
    assert "lifecycle" not in container, "no preStop: the worker drains on SIGTERM itself"
    keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    strategy = deployment["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_selectors_connect_service_monitor_pdb_and_pods(rendered: Rendered, variant: str) -> None:
    manifests = rendered[variant]
    pod_labels = only(manifests, "Deployment", "omnilog-ingest")["spec"]["template"]["metadata"]["labels"]
    service = only(manifests, "Service", "omnilog-ingest")
    monitor = only(manifests, "ServiceMonitor", "omnilog-ingest")
    pdb = only(manifests, "PodDisruptionBudget", "omnilog-ingest")
    policy = only(manifests, "NetworkPolicy", "omnilog")

    def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    assert matches(service["spec"]["selector"], pod_labels)
    assert matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert matches(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert matches(policy["spec"]["podSelector"]["matchLabels"], pod_labels)
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert allowed == {int(config_data(manifests)["OMNILOG_METRICS_PORT"])}
    # The rules and dashboards select job="omnilog-ingest": Prometheus names the job after the Service.
    assert service["metadata"]["name"] == "omnilog-ingest"


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_migrate_job_is_named_for_the_release_and_runs_the_same_image(
    rendered: Rendered, variant: str
) -> None:
    manifests = rendered[variant]
    image = only(manifests, "Deployment", "omnilog-ingest")["spec"]["template"]["spec"]["containers"][0][
        "image"
    ]
    job = only(manifests, "Job")
    tag = image.rsplit(":", 1)[1]
    assert job["metadata"]["name"] == "omnilog-migrate-" + re.sub(r"[^a-z0-9]+", "-", tag.lower())
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == image
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][0] == "migrate"
    cron = only(manifests, "CronJob")
    cron_container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert cron_container["image"] == image and cron_container["args"][0] == "maintain"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"


def test_autoscaling_per_variant(rendered: Rendered) -> None:
    def autoscalers(variant: str) -> set[str]:
        return {m["kind"] for m in rendered[variant]} & {"ScaledObject", "HorizontalPodAutoscaler"}

    assert autoscalers("base") == set()
    assert autoscalers("dev") == set()
    assert autoscalers("prod") == {"ScaledObject"}
    assert autoscalers("prod-hpa") == {"HorizontalPodAutoscaler"}
    assert only(rendered["dev"], "Deployment", "omnilog-ingest")["spec"]["replicas"] == 1
    for variant in ("prod", "prod-hpa"):
        ingest = only(rendered[variant], "Deployment", "omnilog-ingest")
        assert "replicas" not in ingest["spec"], "the autoscaler owns replicas"

    scaled = only(rendered["prod"], "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "omnilog-ingest"
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    config = config_data(rendered["prod"])
    for key in ("bootstrapServersFromEnv", "consumerGroupFromEnv", "topicFromEnv"):
        assert trigger["metadata"][key] in config, f"KEDA resolves {key} from the worker's env"
    assert int(trigger["metadata"]["lagThreshold"]) > 0

    hpa = only(rendered["prod-hpa"], "HorizontalPodAutoscaler")
    external = next(m["external"] for m in hpa["spec"]["metrics"] if m["type"] == "External")
    assert external["metric"]["name"] == "omnilog_consumer_lag_messages"
    assert hpa["spec"]["maxReplicas"] == scaled["spec"]["maxReplicaCount"]


def test_prometheus_rule_carries_the_plain_rule_file(rendered: Rendered) -> None:
    plain: dict[str, Any] = yaml.safe_load(RULES_FILE.read_text())
    for variant in VARIANT_NAMES:
        rule = only(rendered[variant], "PrometheusRule")
        assert rule["spec"]["groups"] == plain["groups"], "run python deploy/tools/gen_prometheusrule.py"


def test_grafana_configmap_holds_the_dashboard_files(rendered: Rendered) -> None:
    files = {p.name: p.read_text() for p in DASHBOARDS.glob("*.json")}
    assert len(files) == 3  # pipeline, gateway traffic, AI usage
    for variant in VARIANT_NAMES:
        dashboards = only(rendered[variant], "ConfigMap", "omnilog-grafana-dashboards")
        assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert dashboards["data"] == files
        datasources = only(rendered[variant], "ConfigMap", "omnilog-grafana-datasources")
        expected = (DEPLOY / "grafana" / "datasources" / "omnilog-postgres.yaml").read_text()
        assert datasources["data"] == {"omnilog-postgres.yaml": expected}
