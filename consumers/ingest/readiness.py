"""Whether the worker is ready, and why not: what `/readyz` and `omnilog_worker_ready` report."""

from __future__ import annotations

from pipeline.metrics import WorkerMetrics


class Readiness:
    """Ready means: started, assigned partitions at least once, every dependency answered its last
    call, and not stopped by the dead-letter limit or a permanent error."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self._metrics = metrics
        self._dependencies: dict[str, bool] = {}
        self.started = False
        self.assigned_once = False
        self.dlq_tripped: str | None = None
        self.fatal: str | None = None

    @property
    def stopped_by_error(self) -> bool:
        return self.dlq_tripped is not None or self.fatal is not None

    def set_dependency(self, name: str, ok: bool) -> None:
        if self._dependencies.get(name) != ok:
            self._dependencies[name] = ok
            self._metrics.dependency_up.labels(name).set(1 if ok else 0)
        self.refresh()

    def refresh(self) -> None:
        self._metrics.ready.set(1 if self.state()[0] else 0)

    def state(self) -> tuple[bool, str]:
        if self.fatal is not None:
            return False, self.fatal
        if self.dlq_tripped is not None:
            return False, self.dlq_tripped
        down = sorted(name for name, ok in self._dependencies.items() if not ok)
        if down:
            return False, "dependency down: " + ", ".join(down)
        if not self.started or not self.assigned_once:
            return False, "joining the consumer group"
        return True, "ready"
