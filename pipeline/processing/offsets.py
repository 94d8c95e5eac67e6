"""The offset protocol: why every consumed offset ends in exactly one place.

This is the argument the whole pipeline rests on; the code that carries it out is named at each step.

1. **PostgreSQL is the source of truth for progress.** For each (consumer group, topic, partition)
   the offset store (`ingest_offsets`, `sinks.index`) holds `next_offset`: every offset below it is
   done, none above it is.
2. **A batch is a set of ranges that chain from the stored offsets.** The worker's buffer
   (`pipeline.processing.batch.BatchBuffer`) starts each partition at its stored offset (read at
   assignment, and again after any failure) and closes a batch as `[start, end)` per partition; the
   next batch starts at `end`. Every offset in a range is one message of the batch.
3. **Each message of a batch ends as exactly one of**: an index row (first sighting of its event_id),
   a counted duplicate (its event_id is already indexed), or a dead letter. Decoding is total
   (`flush.decode`): there is no fourth outcome.
4. **Dead letters are produced before the transaction.** If the worker dies after producing them and
   before committing, the batch is replayed and the letters produced again: at-least-once, never lost.
   The replay gives the same verdicts, because validation depends only on the message and its
   record timestamp.
5. **One transaction makes the batch durable**: it first advances every range's stored offset with a
   compare-and-set (`next_offset = end WHERE next_offset = start`) — the *fence* — then inserts the
   index rows (`ON CONFLICT DO NOTHING`: duplicates), the object ledger and the aggregate parts of first
   sightings. If any partition's stored offset is not where the batch starts, another owner (a new
   worker after a rebalance, or this one's replay) moved it: `Fenced`, the whole transaction rolls
   back, and the worker re-reads its positions. A zombie's late commit therefore writes nothing.
6. **Objects are uploaded before the transaction, under keys unique to the attempt.** A crash between
   upload and commit leaves an orphan (swept by the janitor after a grace period longer than any
   commit may wait), never a pointer to a missing object.
7. **The Kafka commit comes last** and is advisory (for lag tools): a crash before it only makes the
   committed Kafka offset trail PostgreSQL's.
8. **Batches commit in order, with at most two in flight** (`pipeline.processing.flush_pipeline`).
   While batch N's transaction runs, batch N+1 may do everything that comes before a transaction
   (points 4 and 6: dead letters, uploads), but its transaction starts only once N's has committed:
   N+1's ranges start where N's end (point 2), so before then its fence could only fail. If N does
   not commit (fenced, stopped, abandoned), N+1 is discarded without a transaction: its dead
   letters repeat on replay and its uploads are orphans, exactly as after a crash (points 4 and
   6); the worker starts no batch after them before it has re-read its positions (point 2) or
   stopped.

Together: an offset is either below `next_offset` — and then its message is in exactly one place,
written by the one transaction that moved `next_offset` past it — or at/above it, and then nothing of
it is durable except possibly dead letters and orphans, which a replay repeats and the janitor removes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date


@dataclass(frozen=True, slots=True)
class PartitionRange:
    """Messages [start, end) of one partition: `start` must equal the stored next_offset."""

    partition: int
    start: int
    end: int


class Fenced(Exception):
    """The stored offset of a partition is not where this batch starts: another owner moved it."""

    def __init__(self, partitions: Sequence[int]) -> None:
        super().__init__(f"offset compare-and-set failed for partitions {sorted(partitions)}")
        self.partitions = list(partitions)


class HorizonMoved(Exception):
    """The retention horizon passed some of the batch's event days: those events are expired now
    (their day partitions may be gone) and must be dead-lettered before the batch is committed."""

    def __init__(self, horizon: date) -> None:
        super().__init__(f"the retention horizon moved to {horizon.isoformat()}")
        self.horizon = horizon
