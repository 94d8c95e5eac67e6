"""The aggregate stage alone: the batch extensions (usage rows, aggregate parts) with 1 or more
concurrent writers, each its own connection and source partition, as workers would run them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from bench.harness.ceilings import rate
from bench.harness.env import connect
from pipeline.contract import ValidEvent
from sinks.aggregates import build_extensions
from sinks.partitions import ensure_day_partitions


async def extension_rate(
    url: str, events: Sequence[ValidEvent], writers: int, batch: int = 5000
) -> dict[str, Any]:
    """Events/s through every extension's `write`, `writers` transactions in flight at a time."""
    extensions = build_extensions()
    days = {e.started_at.date() for e in events}
    async with connect(url) as conn:
        for table in ("usage_events", "mcp_usage"):
            await ensure_day_partitions(conn, table, days)
    share = -(-len(events) // writers)
    streams = [events[i * share : (i + 1) * share] for i in range(writers)]

    async def writer(partition: int, mine: Sequence[ValidEvent]) -> None:
        async with connect(url) as conn:
            for start in range(0, len(mine), batch):
                async with conn.transaction():
                    for extension in extensions:
                        await extension.write(conn, mine[start : start + batch], partition)

    t0 = time.perf_counter()
    await asyncio.gather(*(writer(p, s) for p, s in enumerate(streams)))
    return rate(len(events), time.perf_counter() - t0, writers=writers, batch=batch)
