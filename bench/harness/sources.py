"""Another version of a module, loaded next to this checkout's, for A/B measurements in one process."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from importlib import util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def source_at(revision: str, path: str) -> str:
    """The text of `path` (relative to the repository) at git `revision`."""
    shown = subprocess.run(["git", "show", f"{revision}:{path}"], cwd=REPO, check=True, capture_output=True)
    return shown.stdout.decode()


def load_source(path: Path, name: str) -> ModuleType:
    """The Python file `path` imported as module `name`. It is registered in sys.modules before it
    runs: dataclasses look their module up there while a class is built."""
    spec = util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_text(text: str, name: str) -> ModuleType:
    """Source `text` imported as module `name` (written to a temporary file, which tracebacks name)."""
    folder = Path(tempfile.mkdtemp(prefix="omnilog-bench-source-"))
    path = folder / f"{name}.py"
    path.write_text(text)
    return load_source(path, name)
