"""What the launcher needs to know about one server process."""

from __future__ import annotations

import signal
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path

from pipeline.devtools.stack.ports import free_ports
from pipeline.devtools.stack.procs import RunAs


class ProbeFailedError(Exception):
    """The service answered, but not correctly (or not yet)."""


class Service(ABC):
    """One server: how to prepare its files, its command line, and its health probe.

    `port_names[0]` is the port clients use; the others are internal ports the server also
    binds (each chosen free, so nothing collides with other stacks on the machine).
    """

    name: str
    port_names: tuple[str, ...]
    stop_signal: signal.Signals = signal.SIGTERM
    stop_timeout: float = 15.0
    start_timeout: float = 60.0

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def log_path(self) -> Path:
        return self.root / "logs" / f"{self.name}.log"

    def run_as(self) -> RunAs | None:
        return None

    def pick_ports(self, names: list[str], avoid: set[int]) -> dict[str, int]:
        """Free ports for `names` (the client port may already be fixed by the caller)."""
        return dict(zip(names, free_ports(len(names), avoid), strict=True))

    def prepare(self) -> None:
        """Create data dirs / config files; safe to call before every start."""
        return None

    @abstractmethod
    def argv(self, ports: Mapping[str, int]) -> list[str]: ...

    def env(self) -> dict[str, str] | None:
        return None

    @abstractmethod
    def probe(self, ports: Mapping[str, int], timeout: float) -> None:
        """Raise (any exception) unless the service really answers requests."""

    def after_healthy(self, ports: Mapping[str, int]) -> None:
        """One-off setup that needs the running server (database, bucket)."""
        return None

    def purge(self) -> None:
        """Remove this service's data."""
        return None
