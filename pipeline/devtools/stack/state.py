"""The state file under the stack root: pids, ports and credentials of the stack's services."""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.devtools.stack.procs import ProcessRecord

STATE_FILE = "state.json"
_VERSION = 1


@dataclass
class ServiceState:
    ports: dict[str, int] = field(default_factory=dict)
    pid: int | None = None
    create_time: float = 0.0
    log_offset: int = 0

    @property
    def record(self) -> ProcessRecord | None:
        return ProcessRecord(self.pid, self.create_time) if self.pid is not None else None


@dataclass
class StackState:
    bucket: str
    access_key_id: str
    secret_access_key: str
    services: dict[str, ServiceState] = field(default_factory=dict)

    @classmethod
    def new(cls, bucket: str) -> StackState:
        # A secret per stack root, so nothing secret is ever a constant in the code base.
        return cls(bucket=bucket, access_key_id="omnilog-local", secret_access_key=secrets.token_hex(20))

    def service(self, name: str) -> ServiceState:
        return self.services.setdefault(name, ServiceState())


def load(root: Path) -> StackState | None:
    path = root / STATE_FILE
    try:
        raw: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    if raw.get("version") != _VERSION:
        raise ValueError(f"{path}: unsupported state version {raw.get('version')!r}")
    services = {name: ServiceState(**svc) for name, svc in raw.get("services", {}).items()}
    return StackState(
        bucket=raw["bucket"],
        access_key_id=raw["access_key_id"],
        secret_access_key=raw["secret_access_key"],
        services=services,
    )


def save(root: Path, state: StackState) -> None:
    """Write atomically (a reader never sees half a file), private (it holds the S3 secret)."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / STATE_FILE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"version": _VERSION, **asdict(state)}, out, indent=2, sort_keys=True)
    tmp.replace(path)
