"""`pip install omnilog` (no extra) gives a producer the SDK and the contract, and nothing of the worker.

Builds the wheel from a copy of the source (so no build directory lands in the checkout), installs
it without extras into a fresh virtualenv (pip fetches the base dependencies from the package
index), then checks what got installed and runs a producer's script there: build an event with
the SDK, validate it with the contract. The command line, which needs the worker, must say how to
get it in one line. Needs the network (the package index), hence the integration tier.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
WORKER_ONLY = {
    "numpy",
    "asyncpg",
    "aioboto3",
    "isal",
    "click",
    "pydantic",
    "pydantic-settings",
    "psutil",
    "rich",
}

PRODUCER_SCRIPT = """
import sys
from datetime import UTC, datetime, timedelta

import orjson

from pipeline.contract import ValidationPolicy, ValidEvent, generate_schema, load_schema, validate_event
from pipeline.sdk import EventProducer, GatewayRequestEvent, RedactionConfig

assert EventProducer and RedactionConfig  # the whole SDK imports
now = datetime.now(UTC)
event = GatewayRequestEvent(
    organization_id="0191b5e8-0000-7000-8000-000000000001",
    started_at=now,
    duration_ms=12,
    status_code=200,
    model="gpt-4o-mini",
    headers={"authorization": "Bearer x"},
)
policy = ValidationPolicy(max_age=timedelta(days=90), max_future_skew=timedelta(hours=1))
result = validate_event(orjson.dumps(event.to_dict()), now, policy)
assert isinstance(result, ValidEvent), result
assert result.event_id == event.event_id and result.status_code == 200
heavy = {"numpy", "asyncpg", "aioboto3", "isal", "click", "pydantic"} & set(sys.modules)
assert not heavy, heavy
assert load_schema() == generate_schema()  # the published schema ships in the wheel
print("ok", result.event_id)
"""


def _run(*args: str | Path, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, check=False, timeout=timeout
    )


@pytest.fixture(scope="module")
def sdk_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("sdk-install")
    source = work / "src"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for package in ("pipeline", "consumers", "sinks", "bench/harness"):
        if (ROOT / package).is_dir():
            shutil.copytree(ROOT / package, source / package, ignore=ignore)
    # Build isolation: the project needs a newer setuptools than the test environment may have.
    built = _run(
        sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", work / "dist", ".", cwd=source
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (work / "dist").glob("omnilog-*.whl")
    venv.create(work / "venv", with_pip=True)
    python = work / "venv" / "bin" / "python"
    installed = _run(python, "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel, cwd=work)
    assert installed.returncode == 0, installed.stderr
    return work / "venv"


def test_the_base_install_holds_none_of_the_workers_dependencies(sdk_venv: Path) -> None:
    listed = _run(sdk_venv / "bin" / "python", "-m", "pip", "list", "--format=freeze", cwd=sdk_venv)
    assert listed.returncode == 0, listed.stderr
    names = {canonicalize_name(line.split("==")[0]) for line in listed.stdout.splitlines() if "==" in line}
    assert {"omnilog", "aiokafka", "orjson"} <= names
    assert not WORKER_ONLY & names, f"worker dependencies in a producer install: {WORKER_ONLY & names}"


def test_a_producer_builds_and_validates_an_event_with_the_base_install(sdk_venv: Path) -> None:
    # Run from the venv's directory, so the checkout's own `pipeline` cannot shadow the installed one.
    result = _run(sdk_venv / "bin" / "python", "-I", "-c", PRODUCER_SCRIPT, cwd=sdk_venv)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok ")


def test_the_command_line_without_the_worker_extra_is_one_line_saying_what_to_install(sdk_venv: Path) -> None:
    result = _run(sdk_venv / "bin" / "omnilog", "--help", cwd=sdk_venv)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "omnilog: the command line needs the worker's dependencies (no module 'click'): "
        "pip install 'omnilog[worker]'"
    ]
