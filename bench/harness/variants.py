"""Worker variants for attributing cost: the production worker with parts of the job removed.

    python -c "from bench.harness.variants import main; main()" VARIANT

- `full`: exactly `consumers.ingest.factory.build_worker` (what `omnilog ingest` runs);
- `no-merger`: the batch extensions (usage rows, aggregate parts) but no background merger;
- `index-only`: objects + `log_index` only, no extensions and no merger.

Only `full` is the product; the others exist so the report can say what each part costs.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from datetime import date

from consumers.ingest.factory import build_worker
from consumers.ingest.worker import IngestWorker
from pipeline.log_format import configure_logging
from pipeline.settings import Settings, load_settings
from sinks.aggregates import build_extensions
from sinks.db import Connection
from sinks.partitions import PartitionCache, ensure_day_partitions

VARIANTS = ("full", "no-merger", "index-only")
_TABLES = {"no-merger": ("log_index", "usage_events", "mcp_usage"), "index-only": ("log_index",)}


def make_worker(variant: str, settings: Settings) -> IngestWorker:
    if variant == "full":
        return build_worker(settings)
    if variant not in _TABLES:
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    cache = PartitionCache()
    tables = _TABLES[variant]

    async def ensure_partitions(conn: Connection, days: set[date]) -> None:
        for table in tables:
            await ensure_day_partitions(conn, table, days, cache)

    extensions = build_extensions() if variant == "no-merger" else []
    return IngestWorker(settings, extensions=extensions, ensure_partitions=ensure_partitions)


async def _run(variant: str) -> int:
    settings = load_settings()
    configure_logging(settings.log_level)
    worker = make_worker(variant, settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.request_stop)
    return await worker.run()


def main() -> None:
    sys.exit(asyncio.run(_run(sys.argv[1] if len(sys.argv) > 1 else "full")))
