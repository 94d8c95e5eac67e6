"""CPU time per process during a drain: the worker(s), the merger, PostgreSQL, the broker, S3,
the harness itself, and the machine as a whole.

A process tree's CPU at one instant is its own user+system time, plus what its already exited
and reaped children used (`children_user` / `children_system`, which the kernel adds to the parent
when it waits for them), plus the same sum for each live child. The difference of that sum
between two instants is the CPU the tree used in between, short-lived processes included: a
PostgreSQL backend that connects and exits between two snapshots is in the postmaster's reaped
children at the second one. No sampling thread is needed, and no pid is missed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import psutil


@dataclass(frozen=True)
class TreeSample:
    """CPU seconds of one process and its descendants at one instant."""

    own: float  # user + system of the process itself (all its threads)
    reaped: float  # user + system of its children that exited and were waited for
    children: tuple[TreeSample, ...] = ()

    @property
    def total(self) -> float:
        return self.own + self.reaped + sum(c.total for c in self.children)


def sample_tree(pid: int, with_children: bool = True) -> TreeSample | None:
    """The tree of `pid` now; None if it is gone (or not visible)."""
    try:
        process = psutil.Process(pid)
        return _sample(process, with_children)
    except psutil.Error:
        return None


def _sample(process: psutil.Process, with_children: bool) -> TreeSample:
    times = process.cpu_times()
    kids: list[TreeSample] = []
    if with_children:
        for child in process.children():
            with contextlib.suppress(psutil.Error):  # exited meanwhile: in `reaped` next time
                kids.append(_sample(child, True))
    return TreeSample(
        own=times.user + times.system,
        reaped=times.children_user + times.children_system,
        children=tuple(kids),
    )


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent not idle (all cores, every process, other users too)."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


@dataclass(frozen=True)
class Tracked:
    """A named group of processes whose CPU is added up (e.g. every worker of a scenario)."""

    name: str
    pids: tuple[int, ...]
    with_children: bool = True


@dataclass(frozen=True)
class Snapshot:
    at: float  # time.monotonic()
    machine_busy: float
    groups: Mapping[str, float]  # name -> CPU seconds of its trees (None-safe: gone = 0)
    missing: tuple[str, ...] = ()  # groups with a process that could not be read


def snapshot(tracked: Iterable[Tracked], own_pid: int | None = None) -> Snapshot:
    """One reading of every group, the harness itself (`harness`, its own threads only: its
    children are the workers, counted by name) and the machine."""
    groups: dict[str, float] = {}
    missing: list[str] = []
    for group in tracked:
        total = 0.0
        for pid in group.pids:
            sample = sample_tree(pid, group.with_children)
            if sample is None:
                missing.append(group.name)
            else:
                total += sample.total
        groups[group.name] = total
    harness = sample_tree(own_pid if own_pid is not None else psutil.Process().pid, with_children=False)
    groups["harness"] = harness.own if harness is not None else 0.0
    return Snapshot(time.monotonic(), machine_busy_seconds(), groups, tuple(sorted(set(missing))))


@dataclass
class CpuMeter:
    """Snapshots of the same groups at named moments of one drain."""

    tracked: list[Tracked]
    cpus: int = field(default_factory=lambda: psutil.cpu_count() or 1)
    marks: dict[str, Snapshot] = field(default_factory=dict)

    def mark(self, name: str) -> Snapshot:
        self.marks[name] = snapshot(self.tracked)
        return self.marks[name]


def usage_between(start: Snapshot, end: Snapshot, events: int, cpus: int) -> dict[str, object]:
    """CPU per group between two snapshots: seconds, µs per event, cores used on average; the
    machine's busy share of all cores, and what no tracked group accounts for (other processes on
    a shared machine, the kernel's own threads)."""
    wall = max(end.at - start.at, 1e-9)
    per_group: dict[str, dict[str, float | None]] = {}
    attributed = 0.0
    for name, value in end.groups.items():
        used = max(value - start.groups.get(name, 0.0), 0.0)
        attributed += used
        per_group[name] = _usage(used, events, wall)
    machine = max(end.machine_busy - start.machine_busy, 0.0)
    per_group["unattributed"] = _usage(max(machine - attributed, 0.0), events, wall)
    return {
        "wall_s": round(wall, 3),
        "processes": per_group,
        "machine_busy_s": round(machine, 3),
        "machine_utilisation": round(machine / (wall * cpus), 3),
        "machine_us_per_event": round(machine * 1e6 / events, 2) if events else None,
        "missing": sorted(set(start.missing) | set(end.missing)),
    }


def _usage(cpu_s: float, events: int, wall: float) -> dict[str, float | None]:
    return {
        "cpu_s": round(cpu_s, 3),
        "us_per_event": round(cpu_s * 1e6 / events, 2) if events else None,
        "cores": round(cpu_s / wall, 3),
    }
