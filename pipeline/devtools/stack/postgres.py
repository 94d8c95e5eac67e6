"""PostgreSQL from the distribution binaries: initdb, a loopback-only trust setup, probes."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import stat
import subprocess
from collections.abc import Mapping
from pathlib import Path

import asyncpg

from pipeline.devtools.stack.binaries import BinaryNotFoundError, postgres_bindir
from pipeline.devtools.stack.blocking import run_blocking
from pipeline.devtools.stack.errors import StackError
from pipeline.devtools.stack.ports import HOST
from pipeline.devtools.stack.procs import RunAs, run
from pipeline.devtools.stack.service import Service

SUPERUSER = "omnilog"
DATABASE = "omnilog"
MAX_CONNECTIONS = 200
# A unix socket path longer than this cannot be bound (sun_path is 108 bytes).
_MAX_SOCKET_PATH = 100

# Server settings for an ingest-heavy laptop stack (docs/operations.md "PostgreSQL for ingest"
# says why each one, what it costs, and the production values). The server's own memory stays
# under ~0.5 GiB: shared_buffers + wal_buffers, plus work_mem per sort or hash of a query.
INGEST_SETTINGS: dict[str, str] = {
    # A drain's working set (today's log_index partition and its indexes, the rollups) stays
    # cached; the default 128MB is evicted by a 200 k-event drain. Not more: log_index's indexes
    # take ~200 MiB per million rows of a day, and events in time order only touch their right
    # edges. Events at random within the hour (the bench's worst case) touch them all, yet at
    # 1 M such rows 2GB measured no better than 256MB (interleaved, `python -m
    # bench.harness.index_buffers 1000000 --arm 256MB --arm 2GB`: the insert's shared blocks
    # read 0.001 vs 0 per row, µs/row within the noise). Sizing it from the machine's memory
    # (a quarter, up to 2GB) would matter past ~1.3 M out-of-order rows a day: unmeasured.
    "shared_buffers": "256MB",
    # A 20 k-event batch writes ~34 MB of WAL in one transaction. With the default 4MB (1/32 of
    # 128MB) the backend found the buffers full and wrote WAL itself 700-4 400 times per 60 k
    # events; with 16MB (the automatic ceiling) 0 times in 7 drains of 9, at most 421.
    "wal_buffers": "16MB",
    # No checkpoint during a drain: one is forced every max_wal_size / 1.9 of WAL (~540 MB with
    # the default 1GB, ~320 k events at ~1.7 kB of WAL each); 4GB lets a 1 M-event drain through.
    # After a checkpoint a page's next change logs the whole page. The price: crash recovery
    # replays more, and pg_wal may use up to ~4 GB of disk.
    "max_wal_size": "4GB",
    "min_wal_size": "256MB",
    "checkpoint_timeout": "15min",
    # Full page images compressed (lz4, cheap on CPU): less WAL to write, archive and replicate.
    "wal_compression": "lz4",
    # synchronous_commit stays on: off would save one WAL flush per batch (~ms per 20 k events)
    # and would let a crash of PostgreSQL undo commits that `maintain` has acted on already.
    # Sorts and hashes of the merger's folds and the API's reads in memory rather than on disk.
    "work_mem": "16MB",
    "maintenance_work_mem": "128MB",
    # Two cores shared with the workers, Tansu and SeaweedFS: a parallel query would take the
    # ingest worker's core; one helper at most.
    "max_parallel_workers_per_gather": "1",
    "max_parallel_workers": "2",
    # SSD: prefetch for bitmap heap scans (the API's filtered reads).
    "effective_io_concurrency": "200",
    "random_page_cost": "1.1",
    # The hot queries are short; compiling a plan costs more than it saves, and the rare large
    # query (a wide count) must not pause for 100s of ms of LLVM.
    "jit": "off",
    # The delta tables are inserted and deleted within seconds: vacuum them soon enough that
    # their pages are reused rather than grown.
    "autovacuum_naptime": "15s",
}

_HBA = f"""\
# Written by `omnilog stack`: trust, loopback and this stack's own socket dir only.
local all all trust
host  all all {HOST}/32 trust
"""


class StackSetupError(StackError):
    """The local environment cannot host the stack (e.g. no account to run PostgreSQL as)."""


def database_url(port: int, database: str = DATABASE) -> str:
    return f"postgresql://{SUPERUSER}@{HOST}:{port}/{database}"


def _account() -> RunAs | None:
    """Who runs PostgreSQL: ourselves, or (as root, which postgres refuses) an unprivileged user."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "omnilog-pg"):
        try:
            entry = pwd.getpwnam(name)
            return RunAs(name, entry.pw_uid, entry.pw_gid)
        except KeyError:
            continue
    useradd = shutil.which("useradd")
    if useradd is None:
        raise StackSetupError(
            "running as root, and neither a 'postgres' user nor useradd to create one exists; "
            "create an unprivileged user named 'postgres' or run as a normal user"
        )
    subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "omnilog-pg"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    entry = pwd.getpwnam("omnilog-pg")
    return RunAs("omnilog-pg", entry.pw_uid, entry.pw_gid)


def _grant_traversal(path: Path, account: RunAs) -> list[Path]:
    """Give `account` search (x) permission on every ancestor of `path` that denies it.

    pytest's temp dirs (/tmp/pytest-of-root, 0700) are the usual case. Only the x bit for
    "other" is added: it lets the account pass through by exact name, not list the directory.
    """
    groups = set(os.getgrouplist(account.name, account.gid))
    changed: list[Path] = []
    for directory in reversed(path.resolve().parents):
        st = directory.stat()
        if st.st_uid == account.uid:
            allowed = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid in groups:
            allowed = bool(st.st_mode & stat.S_IXGRP)
        else:
            allowed = bool(st.st_mode & stat.S_IXOTH)
        if not allowed:
            directory.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)
            changed.append(directory)
    return changed


class Postgres(Service):
    name = "postgres"
    port_names = ("port",)
    # SIGINT is PostgreSQL's "fast" shutdown: it does not wait for clients to disconnect.
    stop_signal = signal.SIGINT
    stop_timeout = 30.0

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.datadir = root / "pg"
        self.socket_dir = root / "run"
        self._bindir: Path | None = None
        self._account: RunAs | None = None
        self._account_known = False

    @property
    def bindir(self) -> Path:
        if self._bindir is None:
            self._bindir = postgres_bindir()
        return self._bindir

    def run_as(self) -> RunAs | None:
        if not self._account_known:
            self._account = _account()
            self._account_known = True
        return self._account

    def prepare(self) -> None:
        bindir = self.bindir  # fail early, naming the missing binaries
        account = self.run_as()
        for directory in (self.datadir, self.socket_dir):
            directory.mkdir(parents=True, exist_ok=True)
            if account is not None:
                os.chown(directory, account.uid, account.gid)
            directory.chmod(0o700)
        if account is not None:
            _grant_traversal(self.datadir, account)
        if (self.datadir / "PG_VERSION").exists():
            return
        initdb = bindir / "initdb"
        run(
            [
                str(initdb),
                "--pgdata",
                str(self.datadir),
                "--username",
                SUPERUSER,
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--locale",
                "C",
                # Skipping the final fsync saves seconds; a machine crash during initdb of a
                # throwaway dev cluster is an acceptable risk.
                "--no-sync",
            ],
            run_as=account,
            log_path=self.log_path,
        )
        hba = self.datadir / "pg_hba.conf"
        hba.write_text(_HBA)
        if account is not None:
            os.chown(hba, account.uid, account.gid)

    def argv(self, ports: Mapping[str, int]) -> list[str]:
        socket_dir = str(self.socket_dir) if len(str(self.socket_dir)) < _MAX_SOCKET_PATH else ""
        settings = {
            "listen_addresses": HOST,
            "unix_socket_directories": socket_dir,
            "max_connections": str(MAX_CONNECTIONS),
            "logging_collector": "off",
            # Per-statement counters for finding where ingest spends its database time
            # (`create extension pg_stat_statements` in a database to read them). Loading the
            # module costs ~1 MB of shared memory and a hash update per statement.
            "shared_preload_libraries": "pg_stat_statements",
            "pg_stat_statements.track": "top",
            # Time spent waiting on reads/writes in pg_stat_statements and EXPLAIN (BUFFERS);
            # cheap on Linux's clock source (pg_test_timing: tens of ns per call).
            "track_io_timing": "on",
            **INGEST_SETTINGS,
        }
        argv = [str(self.bindir / "postgres"), "-D", str(self.datadir), "-p", str(ports["port"])]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        return argv

    def env(self) -> dict[str, str]:
        # Keep the caller's PG* variables (PGDATABASE, PGOPTIONS ...) away from the server.
        return {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"LC_ALL": "C"}

    def probe(self, ports: Mapping[str, int], timeout: float) -> None:
        run_blocking(lambda: _select_one(database_url(ports["port"], "postgres"), connect_timeout=timeout))

    def after_healthy(self, ports: Mapping[str, int]) -> None:
        run_blocking(lambda: _ensure_database(ports["port"], DATABASE))
        run_blocking(lambda: _select_one(database_url(ports["port"]), connect_timeout=10.0))

    def purge(self) -> None:
        shutil.rmtree(self.datadir, ignore_errors=True)
        shutil.rmtree(self.socket_dir, ignore_errors=True)


async def _select_one(url: str, *, connect_timeout: float) -> None:
    conn = await asyncpg.connect(url, timeout=connect_timeout)
    try:
        value = await conn.fetchval("select 1", timeout=connect_timeout)
    finally:
        await conn.close(timeout=connect_timeout)
    if value != 1:
        raise RuntimeError(f"select 1 returned {value!r}")


async def _ensure_database(port: int, name: str) -> None:
    conn = await asyncpg.connect(database_url(port, "postgres"), timeout=10)
    try:
        exists = await conn.fetchval("select 1 from pg_database where datname = $1", name)
        if not exists:
            # Another `up` (or a retried one) may create it between the check and here: it exists,
            # which is all we asked.
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                await conn.execute(f'create database "{name}"')
    finally:
        await conn.close()


__all__ = ["DATABASE", "SUPERUSER", "BinaryNotFoundError", "Postgres", "StackSetupError", "database_url"]
