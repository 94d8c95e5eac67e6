"""Interleavings of two batches in flight that could lose or repeat a batch: a failed batch with
the next one still preparing, taken by a wait that is cancelled, or by the poll loop and a revoke
at once. Against the fakes of fakes.py (offset compare-and-set, ordered side-effect log)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from pipeline.processing.batch import Batch, BatchBuffer, BatchLimits
from pipeline.processing.flush_pipeline import FlushPipeline, InFlight
from pipeline.processing.offsets import Fenced
from tests.unit.processing.fakes import Harness, Record, event, harness


def _consecutive(*sizes: int) -> list[Batch]:
    """Batches of partition 0 as the worker's buffer closes them: each starts where the last ends."""
    buffer = BatchBuffer(BatchLimits(10_000, 10**9, 60.0))
    buffer.assign({0: 0})
    batches, offset = [], 0
    for size in sizes:
        buffer.add(0, [Record(offset + i, event()) for i in range(size)])
        offset += size
        batches.append(buffer.take())
    return batches


async def _until(condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


async def _fenced_with_the_next_preparing(h: Harness) -> tuple[FlushPipeline, list[Batch]]:
    """Batch N fenced (another owner committed its range) while N+1's upload still hangs."""
    batches = _consecutive(2, 2)
    h.index.block = asyncio.Event()
    h.objects.block = asyncio.Event()
    h.objects.block.set()
    pipeline = FlushPipeline(h.ctx)
    pipeline.start(batches[0])
    await _until(lambda: len(h.index.begun) == 1)
    h.objects.block.clear()  # N+1 cannot finish preparing
    pipeline.start(batches[1])
    h.index.offsets[0] = batches[0].ranges[0].end
    h.index.block.set()
    await pipeline.wait(2.0)  # N ended (fenced); N+1 is still uploading
    return pipeline, batches


def _ended_once(taken: list[InFlight], batches: list[Batch]) -> None:
    """Every batch handed back exactly once, in order: the fenced one, then the one it discarded."""
    assert [f.batch for f in taken] == batches
    assert isinstance(taken[0].task.exception(), Fenced) and taken[1].task.cancelled()


async def test_a_take_cancelled_while_discarding_leaves_both_batches_to_be_settled() -> None:
    h = harness({0: 0})
    pipeline, batches = await _fenced_with_the_next_preparing(h)

    take = asyncio.create_task(pipeline.take_finished())
    await asyncio.sleep(0)  # it has cancelled N+1 and waits for it to end
    assert not take.done()
    take.cancel()  # e.g. the poll loop cancelled at a stop
    with pytest.raises(asyncio.CancelledError):
        await take

    # Nothing dropped: the fenced batch is still there to be acted on (positions re-read).
    assert pipeline.batches == batches
    _ended_once(await pipeline.settle(1.0), batches)
    assert len(h.index.begun) == 1 and h.index.offsets == {0: 2} and h.index.rows == {}


async def test_the_poll_loop_and_a_revoke_taking_at_once_get_each_batch_once() -> None:
    h = harness({0: 0})
    pipeline, batches = await _fenced_with_the_next_preparing(h)

    reaped, settled = await asyncio.gather(pipeline.take_finished(), pipeline.settle(1.0))

    _ended_once(reaped + settled, batches)
    assert len(pipeline) == 0 and len(h.index.begun) == 1 and h.index.offsets == {0: 2}
