"""`omnilog ingest` workers as subprocesses: start, watch (metrics, RSS), profile, stop.

Workers run as separate processes, as in production, so the harness's own polling never shares
their core time and their memory is theirs alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import aiohttp
import psutil
from prometheus_client.parser import text_string_to_metric_families

from pipeline.devtools.stack.ports import free_ports

_OMNILOG = "from pipeline.cli import main; main()"
_VARIANT = "from bench.harness.variants import main; main()"


@dataclass
class Worker:
    """One `omnilog ingest` process and what it exposes."""

    process: subprocess.Popen[bytes]
    metrics_port: int
    log_path: Path
    _log: IO[bytes]
    peak_rss: int = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    async def metrics(self, session: aiohttp.ClientSession) -> dict[str, float]:
        """The worker's metrics as `name{labels}` -> value (empty while it is not serving yet)."""
        try:
            async with session.get(f"http://127.0.0.1:{self.metrics_port}/metrics") as response:
                text = await response.text()
        except (aiohttp.ClientError, OSError):
            return {}
        return parse_metrics(text)

    def sample_rss(self) -> None:
        with contextlib.suppress(psutil.Error):
            self.peak_rss = max(self.peak_rss, psutil.Process(self.pid).memory_info().rss)


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = float(sample.value)
    return out


def metric_sum(metrics: dict[str, float], name: str) -> float:
    """Sum of a metric over all its label sets."""
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


@dataclass
class WorkerGroup:
    """Workers of one scenario, sharing one consumer group."""

    workers: list[Worker] = field(default_factory=list)
    _sampler: asyncio.Task[None] | None = None

    @classmethod
    def start(
        cls,
        count: int,
        env: dict[str, str],
        log_dir: Path,
        label: str,
        variant: str = "full",
        command: str = "ingest",
    ) -> WorkerGroup:
        """`omnilog ingest` processes (or a cost-attribution variant, see `bench.harness.variants`),
        or with `command="merge"`, `omnilog merge` processes (the aggregates merger on its own)."""
        argv = [sys.executable, "-c", _OMNILOG, command]
        if variant != "full":
            argv = [sys.executable, "-c", _VARIANT, variant]
        group = cls()
        log_dir.mkdir(parents=True, exist_ok=True)
        for i, port in enumerate(free_ports(count)):
            log_path = log_dir / f"{label}-{command}{i}.log"
            log = log_path.open("wb")
            process = subprocess.Popen(
                argv,
                env={**_base_env(), **env, "OMNILOG_METRICS_PORT": str(port)},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            group.workers.append(Worker(process, port, log_path, log))
        group._sampler = asyncio.create_task(group._sample_rss())
        return group

    async def _sample_rss(self) -> None:
        while True:
            for worker in self.workers:
                worker.sample_rss()
            await asyncio.sleep(0.05)

    async def wait_first_consume(self, session: aiohttp.ClientSession, timeout_s: float) -> float:
        """Poll until any worker reports a consumed message; returns that moment (monotonic)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            before = time.monotonic()
            scraped = await asyncio.gather(*(w.metrics(session) for w in self.workers))
            if any(metric_sum(m, "omnilog_events_consumed_total") > 0 for m in scraped):
                # The consume happened within the scrape round trip: take its midpoint.
                return (before + time.monotonic()) / 2
            await asyncio.sleep(0.02)
        raise TimeoutError(f"no worker consumed anything within {timeout_s:.0f}s; logs: {self.log_paths()}")

    async def wait_all_consumed(self, session: aiohttp.ClientSession, timeout_s: float) -> float | None:
        """Poll (every 100 ms) until every worker reports a consumed message; that moment, or None
        if some worker never consumed within `timeout_s` (e.g. more workers than partitions)."""
        deadline = time.monotonic() + timeout_s
        waiting = list(self.workers)
        while waiting and time.monotonic() < deadline:
            before = time.monotonic()
            scraped = await asyncio.gather(*(w.metrics(session) for w in waiting))
            waiting = [
                w for w, m in zip(waiting, scraped, strict=True)
                if metric_sum(m, "omnilog_events_consumed_total") == 0
            ]  # fmt: skip
            if not waiting:
                return (before + time.monotonic()) / 2
            await asyncio.sleep(0.1)
        return None

    async def wait_ready(self, session: aiohttp.ClientSession, timeout_s: float) -> None:
        """Until every worker answers /readyz 200 (joined the group, got an assignment)."""
        deadline = time.monotonic() + timeout_s
        pending = list(self.workers)
        while pending:
            self.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers not ready within {timeout_s:.0f}s; logs: {self.log_paths()}")
            still = []
            for w in pending:
                try:
                    async with session.get(f"http://127.0.0.1:{w.metrics_port}/readyz") as response:
                        ok = response.status == 200
                except (aiohttp.ClientError, OSError):
                    ok = False
                if not ok:
                    still.append(w)
            pending = still
            await asyncio.sleep(0.1)

    def check_alive(self) -> None:
        for w in self.workers:
            code = w.process.poll()
            if code is not None:
                raise RuntimeError(f"worker pid {w.pid} exited with {code}; log: {w.log_path}")

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(w.pid for w in self.workers)

    def log_paths(self) -> list[str]:
        return [str(w.log_path) for w in self.workers]

    async def scrape(self, session: aiohttp.ClientSession) -> list[dict[str, float]]:
        return list(await asyncio.gather(*(w.metrics(session) for w in self.workers)))

    async def stop(self, grace_s: float = 25.0) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        for w in self.workers:
            if w.process.poll() is None:
                w.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for w in self.workers:
            await asyncio.to_thread(_wait_or_kill, w.process, deadline - time.monotonic())
            w._log.close()


@dataclass
class Profiler:
    """py-spy sampling one process until stopped: a flame graph (SVG) and collapsed stacks (text)."""

    processes: list[subprocess.Popen[bytes]]
    outputs: list[Path]

    @classmethod
    def attach(cls, pid: int, out_dir: Path, rate_hz: int = 100) -> Profiler | None:
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(py_spy).exists():
            return None
        out_dir.mkdir(parents=True, exist_ok=True)
        procs, outputs = [], []
        for fmt, name in (("flamegraph", "profile.svg"), ("raw", "profile.txt")):
            path = out_dir / name
            procs.append(
                subprocess.Popen(
                    [py_spy, "record", "--pid", str(pid), "--rate", str(rate_hz), "--format", fmt,
                     "--output", str(path), "--nonblocking"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )  # fmt: skip
            outputs.append(path)
        return cls(procs, outputs)

    async def stop(self) -> list[Path]:
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for p in self.processes:
            await asyncio.to_thread(_wait_or_kill, p, 10.0)
        return [o for o in self.outputs if o.exists()]


def _base_env() -> dict[str, str]:
    # The parent's environment minus any OMNILOG_* setting: a scenario's values are the only ones.
    return {k: v for k, v in os.environ.items() if not k.startswith("OMNILOG_")}


def _wait_or_kill(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    try:
        process.wait(timeout=max(timeout_s, 0.1))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
