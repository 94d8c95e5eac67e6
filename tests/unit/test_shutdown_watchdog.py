"""A shutdown that overruns its budget ends the `omnilog ingest` process, loudly."""

from __future__ import annotations

import subprocess
import sys
import time

_SCRIPT = """
import time
from pipeline.commands.ingest import _ShutdownWatchdog
_ShutdownWatchdog(0.3).arm()
time.sleep(30)  # a shutdown that never ends
"""


def test_an_overrunning_shutdown_ends_the_process_with_its_stacks() -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT], check=False, capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 3
    assert time.monotonic() - started < 15  # the budget, not the 30 s sleep
    assert "time.sleep" in result.stderr or "<string>" in result.stderr  # the stacks were dumped
