"""Start server processes detached from the caller, and stop only the ones we started.

A process is identified by (pid, create time): a recorded pid that now belongs to some
other process is never signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil


@dataclass(frozen=True)
class RunAs:
    """An unprivileged account to run a server as (when the stack is started by root)."""

    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class ProcessRecord:
    pid: int
    create_time: float


# Popen objects of children started by this interpreter. Holding them keeps Popen.__del__
# from warning about running children, and lets `stop` reap them (no zombies left behind
# in a long-lived process such as a pytest session).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def spawn(
    argv: Sequence[str],
    log_path: Path,
    *,
    run_as: RunAs | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> tuple[ProcessRecord, int]:
    """Start `argv` in its own session with output appended to `log_path`.

    Returns the record and the log offset where this run's output begins (for `log_tail`).
    The new session keeps Ctrl-C in the caller's terminal from reaching the servers.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    with log_path.open("ab") as log:
        log.write(f"\n--- {stamp} omnilog stack: {' '.join(argv)}\n".encode())
        log.flush()
        offset = log.tell()
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            user=run_as.uid if run_as else None,
            group=run_as.gid if run_as else None,
            extra_groups=[] if run_as else None,
        )
    _CHILDREN[proc.pid] = proc
    try:
        created = psutil.Process(proc.pid).create_time()
    except psutil.NoSuchProcess:
        created = 0.0
    return ProcessRecord(proc.pid, created), offset


def exited(record: ProcessRecord) -> int | None:
    """The exit code if `record` is our child and it has exited, else None."""
    proc = _CHILDREN.get(record.pid)
    return proc.poll() if proc is not None else None


def is_alive(record: ProcessRecord) -> bool:
    """True if the recorded process still runs (and is that process, not a reused pid)."""
    proc = _CHILDREN.get(record.pid)
    if proc is not None and proc.poll() is not None:
        return False
    try:
        current = psutil.Process(record.pid)
        if record.create_time and abs(current.create_time() - record.create_time) > 0.05:
            return False
        return current.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def stop(record: ProcessRecord, first_signal: signal.Signals, timeout: float) -> None:
    """Signal the process, wait up to `timeout`, then SIGKILL. Not-ours/gone is a no-op."""
    if not is_alive(record):
        _reap(record.pid)
        return
    try:
        os.kill(record.pid, first_signal)
    except ProcessLookupError:
        _reap(record.pid)
        return
    if not _wait_gone(record, timeout):
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, signal.SIGKILL)
        _wait_gone(record, 10.0)
    _reap(record.pid)


def _wait_gone(record: ProcessRecord, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_alive(record):
            return True
        time.sleep(0.05)
    return not is_alive(record)


def _reap(pid: int) -> None:
    proc = _CHILDREN.pop(pid, None)
    if proc is not None:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _CHILDREN[pid] = proc


def run(argv: Sequence[str], *, run_as: RunAs | None = None, log_path: Path, timeout: float = 120) -> None:
    """Run a short-lived tool (e.g. initdb) to completion, output to `log_path`.

    Raises CalledProcessError carrying the tool's output tail when it fails.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(f"\n--- omnilog stack: {' '.join(argv)}\n".encode())
        log.flush()
        offset = log.tell()
        result = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
            user=run_as.uid if run_as else None,
            group=run_as.gid if run_as else None,
            extra_groups=[] if run_as else None,
        )
    if result.returncode != 0:
        raise subprocess.CalledProcessError(result.returncode, list(argv), output=log_tail(log_path, offset))


def log_tail(log_path: Path, offset: int = 0, lines: int = 30) -> str:
    """The last `lines` lines written to `log_path` since `offset`."""
    try:
        with log_path.open("rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])
