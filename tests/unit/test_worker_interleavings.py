"""The worker's poll loop racing a revoke, and a batch whose commit landed but whose answer was lost:
each offset must still be committed exactly once, in order. The rig (fake consumer, flush fakes) is
tests/unit/test_worker_pipeline.py's."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from pipeline.processing.offsets import PartitionRange
from pipeline.processing.store import BatchOutcome, IndexedEvent, ObjectRecord
from tests.unit.processing.fakes import pg_error
from tests.unit.test_worker_pipeline import Rig, _polling, _rig, _two_in_flight, _until


def _commits(rig: Rig) -> list[Any]:
    return [ranges for name, ranges in rig.h.log.calls if name == "commit"]


def _chained(commits: list[Any], end: int) -> None:
    """The committed ranges of partition 0 follow each other from 0 to `end`, each once."""
    starts = [c[0][1] for c in commits]
    ends = [c[0][2] for c in commits]
    assert starts == [0, *ends[:-1]] and (ends[-1] if ends else 0) == end, commits


async def test_a_revoke_while_the_loop_polls_leaves_nothing_in_flight_and_commits_in_order() -> None:
    rig = _rig(events=9, drain_s=5.0)
    with _polling(rig) as loop:
        await _two_in_flight(rig)  # the loop keeps running: paused, it waits on the flushes
        asyncio.get_running_loop().call_later(0.05, rig.h.index.block.set)  # type: ignore[union-attr]

        await rig.worker.on_revoked([0])

        # A batch the loop started during the revoke was settled by it too: none outlives it.
        assert len(rig.flushes) == 0 and rig.worker._buffer.positions == {}
        assert len(rig.worker._buffer) == 0
        committed = rig.h.index.offsets[0]
        await asyncio.sleep(0.05)  # the loop goes on polling: nothing of partition 0 starts
        assert len(rig.flushes) == 0 and rig.h.index.offsets[0] == committed
    await asyncio.wait_for(loop, 2.0)
    _chained(_commits(rig), committed)
    assert committed in (6, 9) and len(rig.h.index.rows) == committed


async def test_a_commit_whose_answer_was_lost_is_not_committed_again_and_nothing_is_skipped() -> None:
    rig = _rig(events=9)
    index = rig.h.index
    commit = index.commit
    lost = [pg_error("08006")]  # the connection dropped after COMMIT reached the server

    async def commit_then_lose_the_answer(
        ranges: Sequence[PartitionRange],
        indexed: Sequence[IndexedEvent],
        objects: Sequence[ObjectRecord],
        **options: bool,
    ) -> BatchOutcome:
        outcome = await commit(ranges, indexed, objects, **options)
        if lost and not options.get("rollback"):
            raise lost.pop(0)
        return outcome

    index.commit = commit_then_lose_the_answer  # type: ignore[method-assign]
    with _polling(rig) as loop:
        await _two_in_flight(rig)  # [3, 6) prepared behind [0, 3)'s transaction
        index.block.set()  # type: ignore[union-attr]
        await _until(lambda: index.offsets == {0: 9} and len(rig.flushes) == 0)
    await asyncio.wait_for(loop, 2.0)

    # The retry found the range moved (Fenced), which discarded [3, 6): the worker re-read its
    # position (3), so the next batches neither re-commit [0, 3) nor skip [3, 6).
    _chained(_commits(rig), 9)
    assert len(index.rows) == 9
    assert rig.metric("omnilog_fenced_batches_total") == 1
