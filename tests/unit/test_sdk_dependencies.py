"""The producer SDK and the event contract import only the base dependencies of the package.

`pip install omnilog` (no extra) must be enough for `pipeline.sdk` and `pipeline.contract`; the
worker's dependencies come with `omnilog[worker]`. A fresh interpreter imports both packages and
reports every third-party distribution it loaded; each must be in the closure of
`[project].dependencies`. (tests/integration/test_sdk_install.py proves the same with a real install.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
WORKER_ONLY = {"numpy", "asyncpg", "aioboto3", "isal", "click", "pydantic", "pydantic-settings", "psutil"}

_REPORT_IMPORTS = """
import json, sys
before = set(sys.modules)
import pipeline.contract, pipeline.sdk
from importlib import metadata
owners = metadata.packages_distributions()
tops = {name.split(".")[0] for name in set(sys.modules) - before} - set(sys.stdlib_module_names)
print(json.dumps(sorted({dist for top in tops for dist in owners.get(top, [])})))
"""


def _base_closure() -> set[str]:
    """Canonical names of the base dependencies and everything they require (as installed here)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pending = [Requirement(text) for text in project["dependencies"]]
    closure: set[str] = set()
    while pending:
        requirement = pending.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        if name in closure:
            continue
        closure.add(name)
        pending.extend(Requirement(text) for text in metadata.distribution(name).requires or [])
    return closure


def _imported_distributions() -> set[str]:
    result = subprocess.run(
        [sys.executable, "-c", _REPORT_IMPORTS], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return {canonicalize_name(name) for name in json.loads(result.stdout)}


def test_the_base_dependencies_are_not_the_workers() -> None:
    assert not WORKER_ONLY & _base_closure()


def test_sdk_and_contract_import_only_base_dependencies() -> None:
    imported = _imported_distributions()
    assert "orjson" in imported and "aiokafka" in imported  # guards the probe itself
    outside = imported - _base_closure() - {"omnilog"}
    assert not outside, f"pipeline.sdk / pipeline.contract import beyond the base dependencies: {outside}"


def test_the_command_line_without_the_worker_extra_says_what_to_install() -> None:
    # `None` in sys.modules makes `import click` fail as it does when click is not installed.
    script = "import sys; sys.modules['click'] = None; from pipeline.cli import main; main()"
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "omnilog: the command line needs the worker's dependencies (no module 'click'): "
        "pip install 'omnilog[worker]'"
    ]
