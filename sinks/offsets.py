"""Moving a stored offset outside of a batch: when it no longer fits the partition's log.

A batch advances `ingest_offsets` with a compare-and-set in its own transaction (sinks/index.py).
A move made for any other reason (the log was re-created, or retention deleted records never
read) must be fenced the same way: it only succeeds from the value the mover saw, so a zombie
that lost the partition, or a batch committed meanwhile, makes it fail instead of being overwritten.
"""

from __future__ import annotations

from sinks.db import Connection

_MOVE_OFFSET = """
UPDATE ingest_offsets
   SET next_offset = $5, updated_at = now()
 WHERE consumer_group = $1 AND topic = $2 AND partition = $3 AND next_offset = $4
RETURNING partition
"""


async def move_offset(
    conn: Connection, consumer_group: str, topic: str, partition: int, expected: int, new: int
) -> bool:
    """Set the partition's stored offset to `new` if it still is `expected`; False if it was not
    (someone else moved it) or the partition has no stored offset."""
    if new < 0:
        raise ValueError(f"an offset cannot be negative: {new}")
    moved = await conn.fetchval(_MOVE_OFFSET, consumer_group, topic, partition, expected, new)
    return moved is not None
