"""`omnilog demo` end to end on its own embedded stack (a smaller --count than the README's)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_demo_runs_end_to_end(scratch_stack_root: Path) -> None:
    omnilog = str(Path(sys.executable).parent / "omnilog")
    try:
        result = subprocess.run(
            [omnilog, "demo", "--count", "5000", "--root", str(scratch_stack_root)],
            capture_output=True, text=True, timeout=240, check=False,
            env={"COLUMNS": "200", "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"},
        )  # fmt: skip
        out = result.stdout + result.stderr
        assert result.returncode == 0, out[-3000:]
        assert "events indexed" in out and "throughput" in out and "freshness" in out
        assert "omnilog logs get" in out and '"event_id"' in out
        # The valid share of 5,000 messages (the rest are duplicates and invalid ones) was indexed.
        indexed = int(out.split("events indexed")[1].split("│")[1].strip().replace(",", ""))
        assert 4800 <= indexed <= 5000
        assert "omnilog stack down" in out  # it says how to stop the stack it leaves running
    finally:
        subprocess.run([omnilog, "stack", "down", "--purge", "--root", str(scratch_stack_root)], check=False,
                       capture_output=True, timeout=60)  # fmt: skip
