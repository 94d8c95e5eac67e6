"""`Stack`: start, check, stop the three local services under one root directory."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pipeline.devtools.stack import kafka, postgres, s3
from pipeline.devtools.stack import state as state_file
from pipeline.devtools.stack.errors import StackError
from pipeline.devtools.stack.info import ServiceStatus, StackInfo
from pipeline.devtools.stack.ports import port_is_free, require_free
from pipeline.devtools.stack.procs import exited, is_alive, log_tail, spawn, stop
from pipeline.devtools.stack.service import Service
from pipeline.devtools.stack.state import StackState

SERVICES = ("postgres", "kafka", "s3")
ENV_FILE = "stack.env"
_LOCK_FILE = ".lock"
_BIND_ERRORS = ("address already in use", "address in use", "could not bind", "bind:")


class ServiceStartError(StackError):
    """A service did not become healthy; the message carries the tail of its log."""


@dataclass(frozen=True)
class UpResult:
    info: StackInfo
    started: tuple[str, ...]


def default_root() -> Path:
    override = os.environ.get("OMNILOG_STACK_ROOT")
    return Path(override) if override else Path.cwd() / ".omnilog"


class Stack:
    """The embedded local stack rooted at `root` (data, logs, state file, stack.env)."""

    def __init__(
        self,
        root: Path,
        bucket: str = "omnilog",
        pg_port: int | None = None,
        kafka_port: int | None = None,
        s3_port: int | None = None,
    ) -> None:
        self.root = Path(root).absolute()
        self.bucket = bucket
        self._explicit = {"postgres": pg_port, "kafka": kafka_port, "s3": s3_port}

    # ---- public API -------------------------------------------------------------------

    def up(self) -> StackInfo:
        """Start whatever is not running and wait until all three answer. Idempotent."""
        return self.ensure_up().info

    def ensure_up(self) -> UpResult:
        with self._locked():
            st = state_file.load(self.root) or StackState.new(self.bucket)
            st.bucket = self.bucket
            self._check_explicit_ports(st)
            to_start: list[str] = []
            for name in SERVICES:
                svc = st.service(name)
                record = svc.record
                if record is not None and is_alive(record):
                    continue
                svc.pid = None
                to_start.append(name)
            try:
                self._start(st, to_start)
                # Services left running are probed too, so `up` never reports a broken stack as fine.
                for name in SERVICES:
                    if name not in to_start:
                        service = self._service(st, name)
                        self._wait_healthy(st, name, service, timeout=15.0)
                        # Cheap and idempotent; creates a bucket named by a later `up --bucket`.
                        try:
                            service.after_healthy(st.service(name).ports)
                        except Exception as exc:
                            raise StackError(f"{name}: setup failed: {_one_line(exc)}") from exc
            finally:
                state_file.save(self.root, st)
            info = self._info(st)
            self._write_env(info)
            return UpResult(info, tuple(to_start))

    def info(self) -> StackInfo:
        st = state_file.load(self.root)
        if st is None or any(not st.service(n).ports for n in SERVICES):
            raise StackError(f"no stack under {self.root}; run `omnilog stack up` first")
        return self._info(st)

    def status(self) -> list[ServiceStatus]:
        st = state_file.load(self.root)
        if st is None:
            return [ServiceStatus(name, None, None, False, "not started") for name in SERVICES]
        result = []
        for name in SERVICES:
            svc = st.service(name)
            port = svc.ports.get("port")
            record = svc.record
            if record is None or not is_alive(record):
                result.append(ServiceStatus(name, None, port, False, "stopped"))
                continue
            try:
                self._service(st, name).probe(svc.ports, timeout=3.0)
            except Exception as exc:  # noqa: BLE001 - any probe failure means "unhealthy"
                result.append(ServiceStatus(name, record.pid, port, False, f"unhealthy: {_one_line(exc)}"))
            else:
                result.append(ServiceStatus(name, record.pid, port, True, "healthy"))
        return result

    def down(self, purge: bool = False) -> list[str]:
        """Stop the services this stack started; returns the names stopped. Keeps data unless `purge`."""
        if not self.root.exists():
            return []
        with self._locked():
            st = state_file.load(self.root)
            stopped: list[str] = []
            if st is not None:
                for name in SERVICES:
                    if self._stop(st, name):
                        stopped.append(name)
                state_file.save(self.root, st)
            if purge:
                self._purge(st)
        if purge:
            _remove_if_empty(self.root)
        return stopped

    def stop_service(self, name: str) -> None:
        """Stop one service (chaos tests: an outage); its ports and data are kept."""
        with self._locked():
            st = self._require_state()
            self._stop(st, _known(name))
            state_file.save(self.root, st)

    def start_service(self, name: str) -> None:
        """Start one service again on the SAME ports and data, and wait until it answers."""
        with self._locked():
            st = self._require_state()
            svc = st.service(_known(name))
            record = svc.record
            if record is not None and is_alive(record):
                return
            if not svc.ports:
                raise StackError(f"{name} was never started under {self.root}; run `omnilog stack up`")
            for port in svc.ports.values():
                require_free(port, name)
            try:
                self._start_one(st, name, reuse_only=True)
            finally:
                state_file.save(self.root, st)

    # ---- internals --------------------------------------------------------------------

    def _service(self, st: StackState, name: str) -> Service:
        if name == "postgres":
            return postgres.Postgres(self.root)
        if name == "kafka":
            return kafka.Kafka(self.root)
        credentials = s3.S3Credentials(st.access_key_id, st.secret_access_key)
        return s3.SeaweedS3(self.root, st.bucket, credentials)

    def _check_explicit_ports(self, st: StackState) -> None:
        for name, wanted in self._explicit.items():
            if wanted is None:
                continue
            svc = st.service(name)
            record = svc.record
            running = record is not None and is_alive(record)
            current = svc.ports.get("port")
            if running and current != wanted:
                raise StackError(
                    f"{name} is already running on port {current}, not {wanted}; "
                    "run `omnilog stack down` first to change it"
                )
            if not running:
                require_free(wanted, name)

    def _start(self, st: StackState, names: list[str]) -> None:
        if not names:
            return
        # Fail fast on a missing binary or account before anything is launched.
        for name in names:
            _check_binaries(name)
        with ThreadPoolExecutor(max_workers=len(names), thread_name_prefix="omnilog-stack-start") as pool:
            futures = {name: pool.submit(self._start_one, st, name) for name in names}
            errors = []
            for name, future in futures.items():
                exc = future.exception()
                if exc is not None:
                    errors.append(exc if isinstance(exc, StackError) else StackError(f"{name}: {exc}"))
        if errors:
            raise StackError("\n\n".join(str(e) for e in errors)) from errors[0]

    def _start_one(self, st: StackState, name: str, reuse_only: bool = False) -> None:
        """Launch `name` and wait for health; with auto-picked ports, retry once on a bind race."""
        service = self._service(st, name)
        svc = st.service(name)
        service.prepare()
        attempts = 1 if reuse_only or self._explicit.get(name) else 2
        for attempt in range(attempts):
            if not reuse_only:
                svc.ports = self._choose_ports(st, name, service, fresh=attempt > 0)
            record, offset = spawn(
                service.argv(svc.ports),
                service.log_path,
                run_as=service.run_as(),
                env=service.env(),
                cwd=self.root,
            )
            svc.pid, svc.create_time, svc.log_offset = record.pid, record.create_time, offset
            try:
                self._wait_healthy(st, name, service, timeout=service.start_timeout)
                service.after_healthy(svc.ports)
                return
            except ServiceStartError:
                stop(record, service.stop_signal, service.stop_timeout)
                svc.pid = None
                tail = log_tail(service.log_path, offset).lower()
                if attempt + 1 < attempts and any(marker in tail for marker in _BIND_ERRORS):
                    continue
                raise

    def _choose_ports(self, st: StackState, name: str, service: Service, fresh: bool) -> dict[str, int]:
        taken = {p for other, s in st.services.items() if other != name for p in s.ports.values()}
        previous = st.service(name).ports
        explicit = self._explicit.get(name)
        # Reuse the last ports when they are still free: stack.env stays valid across down/up.
        if not fresh and previous and set(previous) == set(service.port_names):
            wanted_main = explicit if explicit is not None else previous.get("port")
            candidate = {**previous, "port": wanted_main} if wanted_main is not None else previous
            if all(port_is_free(p) for p in candidate.values()) and not taken & set(candidate.values()):
                return dict(candidate)
        needed = list(service.port_names)
        chosen: dict[str, int] = {}
        if explicit is not None:
            chosen["port"] = explicit
            needed.remove("port")
        chosen.update(service.pick_ports(needed, avoid=taken | set(chosen.values())))
        return chosen

    def _wait_healthy(self, st: StackState, name: str, service: Service, timeout: float) -> None:
        svc = st.service(name)
        record = svc.record
        assert record is not None
        deadline = time.monotonic() + timeout
        last_error = "no answer yet"
        while True:
            code = exited(record)
            if code is not None or not is_alive(record):
                raise ServiceStartError(
                    f"{name} exited (code {code}) before becoming healthy; "
                    f"last lines of {service.log_path}:\n{log_tail(service.log_path, svc.log_offset)}"
                )
            try:
                service.probe(svc.ports, timeout=min(5.0, max(0.5, deadline - time.monotonic())))
                return
            except Exception as exc:  # noqa: BLE001 - any probe failure means "not healthy yet"
                last_error = _one_line(exc)
            if time.monotonic() >= deadline:
                raise ServiceStartError(
                    f"{name} did not become healthy within {timeout:.0f}s ({last_error}); "
                    f"last lines of {service.log_path}:\n{log_tail(service.log_path, svc.log_offset)}"
                )
            time.sleep(0.2)

    def _stop(self, st: StackState, name: str) -> bool:
        svc = st.service(name)
        record = svc.record
        if record is None:
            return False
        service = self._service(st, name)
        was_alive = is_alive(record)
        # `stop` re-checks identity (pid + start time) before every signal.
        stop(record, service.stop_signal, service.stop_timeout)
        svc.pid = None
        svc.create_time = 0.0
        return was_alive

    def _purge(self, st: StackState | None) -> None:
        for name in SERVICES:
            if st is not None:
                self._service(st, name).purge()
        for path in (self.root / "pg", self.root / "run", self.root / "s3", self.root / "logs"):
            shutil.rmtree(path, ignore_errors=True)
        for path in (
            self.root / state_file.STATE_FILE,
            self.root / ENV_FILE,
            self.root / "s3-identities.json",
            self.root / _LOCK_FILE,
        ):
            path.unlink(missing_ok=True)

    def _require_state(self) -> StackState:
        st = state_file.load(self.root)
        if st is None:
            raise StackError(f"no stack under {self.root}; run `omnilog stack up` first")
        return st

    def _info(self, st: StackState) -> StackInfo:
        ports = {name: st.service(name).ports["port"] for name in SERVICES}
        return StackInfo(
            root=self.root,
            database_url=postgres.database_url(ports["postgres"]),
            kafka_bootstrap_servers=kafka.bootstrap_servers(ports["kafka"]),
            s3_endpoint_url=s3.endpoint_url(ports["s3"]),
            s3_bucket=st.bucket,
            aws_access_key_id=st.access_key_id,
            aws_secret_access_key=st.secret_access_key,
            aws_region=s3.REGION,
        )

    def _write_env(self, info: StackInfo) -> None:
        path = self.root / ENV_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(info.env_file_text())

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialize up/down/start/stop on one root (two terminals, or xdist workers)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / _LOCK_FILE).open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _check_binaries(name: str) -> None:
    from pipeline.devtools.stack import binaries

    if name == "postgres":
        binaries.postgres_bindir()
    elif name == "kafka":
        binaries.tansu_binary()
    else:
        binaries.weed_binary()


def _known(name: str) -> str:
    if name not in SERVICES:
        raise StackError(f"unknown service {name!r}; expected one of {', '.join(SERVICES)}")
    return name


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _remove_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()
