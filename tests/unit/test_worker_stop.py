"""A stop ends the worker's poll loop even when one of its awaits never returns."""

from __future__ import annotations

import asyncio
import logging

import pytest
from prometheus_client import CollectorRegistry

from consumers.ingest import worker as worker_module
from consumers.ingest.worker import IngestWorker
from pipeline.settings import load_settings


async def test_a_stuck_poll_loop_is_cancelled_and_its_stack_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(worker_module, "POLL_STOP_TIMEOUT_S", 0.1)
    worker = IngestWorker(load_settings(None), registry=CollectorRegistry())
    never = asyncio.Event()

    async def stuck() -> None:
        await never.wait()  # an await that never returns, whatever the stop flag says

    monkeypatch.setattr(worker, "_poll_loop", stuck)
    running = asyncio.create_task(worker._poll_until_stopped())
    await asyncio.sleep(0.05)
    assert not running.done()
    worker.request_stop()
    with caplog.at_level(logging.ERROR, logger="omnilog.worker"):
        await asyncio.wait_for(running, 2.0)
    (record,) = [r for r in caplog.records if r.getMessage() == "poll loop did not stop; cancelling it"]
    assert "stuck" in record.stack  # type: ignore[attr-defined]


async def test_a_poll_loop_that_fails_stops_the_worker_with_its_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    worker = IngestWorker(load_settings(None), registry=CollectorRegistry())

    async def broken() -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(worker, "_poll_loop", broken)
    with pytest.raises(RuntimeError, match="bug"):
        await asyncio.wait_for(worker._poll_until_stopped(), 2.0)
