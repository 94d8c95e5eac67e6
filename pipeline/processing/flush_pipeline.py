"""Up to two batches in flight: batch N+1 is prepared while batch N commits.

A flush is two halves (pipeline/processing/flush.py): `prepare` (horizon, decode, dead letters,
encode, upload: CPU and S3/Kafka I/O, nothing the stored offsets depend on) and `commit` (the
PostgreSQL transaction, then the Kafka commit). Run one after the other, the worker idles through
each transaction; here batch N+1's `prepare` overlaps batch N's `commit`.

The rules that keep every offset in exactly one place (pipeline/processing/offsets.py, point 8):

- **Commits in batch order.** N+1's ranges start where N's end, so its compare-and-set can only
  succeed once N has committed. N+1's task therefore waits for N's task to end before it commits,
  and commits only if N committed.
- **A batch that does not commit takes the later one with it.** If N fails in any way (fenced,
  dead-letter limit, permanent error, cancelled at a drain deadline or a revoke), N+1 is discarded:
  cancelled if it is still preparing, never committed. Its uploads are counted as orphans
  (`omnilog_orphaned_uploads_total`) and its dead letters will be produced again when the batch is
  replayed (at-least-once, the dead-letter contract). `take_finished` hands both back together, so
  the worker re-reads its positions only once nothing chained from the failed batch is left.
- **One preparing, one committing.** A new batch starts only once every batch in flight has
  finished preparing (and none has failed), and never more than DEPTH at once: the dead letters
  found while decoding are produced in batch order, and the bytes held are bounded (the worker's
  backpressure counts `size_bytes` with its buffer).
- **Drains are bounded.** `settle` (revoke, offset reset, shutdown) lets both finish in order
  within one budget and cancels what has not by then, the later batch first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Final

from pipeline.processing.batch import Batch
from pipeline.processing.flush import FlushContext, FlushReport, commit, discard, prepare

log = logging.getLogger("omnilog.flush")

# One batch committing and one preparing: enough to hide the transaction behind the next batch's
# decode and upload; a deeper pipeline would only hold more memory (every stage after prepare is
# serialised by the offset chain anyway).
DEPTH: Final = 2


class Discarded(Exception):
    """A prepared batch given up, uncommitted, because the batch before it did not commit."""


@dataclass(eq=False)
class InFlight:
    """One batch being flushed: its task, and whether its prepare half has ended."""

    batch: Batch
    task: asyncio.Task[FlushReport]
    prepared: asyncio.Future[None]  # done once `prepare` returned, or the task ended without it

    @property
    def preparing(self) -> bool:
        return not self.prepared.done() and not self.task.done()

    @property
    def committed(self) -> bool:
        return self.task.done() and not self.task.cancelled() and self.task.exception() is None

    @property
    def failed(self) -> bool:
        return self.task.done() and not self.committed


class FlushPipeline:
    """The batches in flight, oldest first."""

    def __init__(self, ctx: FlushContext, depth: int = DEPTH) -> None:
        self._ctx = ctx
        self._depth = depth
        self._flights: deque[InFlight] = deque()

    def __len__(self) -> int:
        return len(self._flights)

    @property
    def batches(self) -> list[Batch]:
        return [f.batch for f in self._flights]

    @property
    def size_bytes(self) -> int:
        return sum(f.batch.size_bytes for f in self._flights)

    def has_room(self) -> bool:
        """True when a new batch may start: fewer than DEPTH in flight, none still preparing and
        none failed (a failure must be taken first: the positions are re-read after it)."""
        flights = self._flights
        return len(flights) < self._depth and not any(f.preparing or f.failed for f in flights)

    def start(self, batch: Batch) -> None:
        if not self.has_room():
            raise RuntimeError("no room in the flush pipeline")
        previous = self._flights[-1].task if self._flights else None
        prepared: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._flush(batch, previous, prepared), name="omnilog-flush")
        # A task cancelled before it ran never reaches its `finally`: mark it prepared here too.
        task.add_done_callback(lambda _: _mark_done(prepared))
        self._flights.append(InFlight(batch, task, prepared))

    async def _flush(
        self, batch: Batch, previous: asyncio.Task[FlushReport] | None, prepared: asyncio.Future[None]
    ) -> FlushReport:
        try:
            ready = await prepare(self._ctx, batch)
        finally:
            _mark_done(prepared)
        try:
            may_commit = previous is None or await _ends_committed(previous)
        except BaseException:  # cancelled while waiting
            discard(self._ctx, ready)
            raise
        previous = None  # its report holds every event of that batch: let it go before committing
        if not may_commit:
            discard(self._ctx, ready)
            raise Discarded("the batch before it did not commit")
        return await commit(self._ctx, ready)

    async def wait(self, timeout_s: float) -> None:
        """Until a batch ends or finishes preparing (room for the next), at most `timeout_s`."""
        pending: set[asyncio.Future[Any]] = {f.task for f in self._flights if not f.task.done()}
        pending |= {f.prepared for f in self._flights if not f.prepared.done()}
        if pending:
            await asyncio.wait(pending, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)

    async def take_finished(self) -> list[InFlight]:
        """The batches at the head that have ended, in order. When one did not commit, every batch
        after it is discarded first (cancelled and awaited) and handed back with it."""
        done: list[InFlight] = []
        while self._flights and self._flights[0].task.done():
            if self._flights[0].failed and len(self._flights) > 1:
                later = list(self._flights)[1:]
                for flight in later:
                    flight.task.cancel()
                # Handed back only once ended: if this wait is cancelled, they stay to be settled.
                await asyncio.wait({f.task for f in later})
                done += self._flights
                self._flights.clear()
                break
            done.append(self._flights.popleft())
        return done

    async def settle(self, budget_s: float) -> list[InFlight]:
        """Let every batch in flight end, in order, within `budget_s`; cancel those that have not by
        then (the later first, so it can never commit after the earlier was given up). Returns them
        all, ended, oldest first."""
        deadline = time.monotonic() + budget_s
        settled: list[InFlight] = []
        while self._flights:
            head = self._flights[0].task
            remaining = deadline - time.monotonic()
            if remaining > 0:
                await asyncio.wait({head}, timeout=remaining)
            if not head.done():
                log.warning(
                    "abandoning in-flight flushes at their deadline",
                    extra={"partitions": sorted({p for f in self._flights for p in f.batch.partitions})},
                )
                for flight in reversed(self._flights):
                    flight.task.cancel()
                await asyncio.wait({f.task for f in self._flights})
            settled += await self.take_finished()
        return settled


async def _ends_committed(task: asyncio.Task[FlushReport]) -> bool:
    """Wait for `task` to end (never cancelling it); True if its batch committed."""
    await asyncio.wait({task})
    return not task.cancelled() and task.exception() is None


def _mark_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
