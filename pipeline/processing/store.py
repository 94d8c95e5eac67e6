"""What the flush needs from storage, as small interfaces; `sinks` implements them.

The core never imports a storage client: the batch transaction (`sinks.index.PostgresIndexStore`),
the object store (`sinks.objects.ObjectWriter`) and the dead-letter producer
(`sinks.dead_letters.DeadLetterWriter`) are handed in. Tests hand in fakes that fail, block, fence
and time out (tests/unit/processing/).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import TYPE_CHECKING, Protocol

from pipeline.processing.dead_letters import DeadLetter
from pipeline.processing.offsets import PartitionRange

if TYPE_CHECKING:
    from pipeline.contract import ValidEvent


@dataclass(frozen=True, slots=True)
class IndexedEvent:
    """A valid event and the pointer to the gzip member that holds its line."""

    event: ValidEvent
    object_uri: str
    byte_offset: int
    byte_length: int


@dataclass(frozen=True, slots=True)
class ObjectRecord:
    """An uploaded object, for the ledger that tells live objects from orphans."""

    object_uri: str
    organization_id: str
    log_date: date
    event_count: int
    byte_size: int


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    new_events: list[ValidEvent]  # indexed for the first time
    duplicates: int  # valid events whose event_id was indexed before
    committed_at: datetime


class IndexStore(Protocol):
    """The batch transaction and the offset store (docs: pipeline/processing/offsets.py)."""

    async def load_horizon(self) -> date | None:
        """The first UTC day still accepted (None: no retention horizon yet). A plain read."""
        ...

    def prebuild(self, ranges: Sequence[PartitionRange], indexed: Sequence[IndexedEvent]) -> object:
        """The transaction's rows for `indexed`, computed without touching storage, to hand to
        `commit(prebuilt=)`. The flush calls it while the batch before commits. Opaque to the flush;
        `commit` must give the same result with or without it."""
        ...

    async def commit(
        self,
        ranges: Sequence[PartitionRange],
        indexed: Sequence[IndexedEvent],
        objects: Sequence[ObjectRecord],
        *,
        check_horizon: bool = True,
        rollback: bool = False,
        prebuilt: object = None,
    ) -> BatchOutcome:
        """Advance every range's stored offset (the fence) and write the rows, in one transaction.

        Raises `Fenced` (a stored offset is not at its range's start; nothing written), `HorizonMoved`
        (an event is before the horizon locked in the transaction; nothing written) or the storage
        error. With `rollback` the same writes are tried and then rolled back: a probe. `prebuilt`
        is `prebuild`'s answer for these ranges and events, or None.
        """
        ...


class BucketUnavailable(Exception):
    """The store gives up on one bucket for now: an organization's own bucket that has failed for
    longer than the store's bound (docs/storage.md). The flush dead-letters the events bound for
    it (`storage_unavailable`) instead of holding the batch, and every other tenant's events in
    it, until that bucket answers."""

    def __init__(self, bucket: str, detail: str) -> None:
        super().__init__(f"{bucket}: {detail}")
        self.bucket = bucket
        self.detail = detail


class ObjectStore(Protocol):
    @property
    def bucket(self) -> str:
        """The deployment's own bucket (dead letters' large values always go there)."""
        ...

    def bucket_for(self, organization_id: str) -> str:
        """The bucket that holds this organization's event objects: the deployment's own, or the
        organization's own bucket where it has one."""
        ...

    async def put(self, key: str, body: bytes, *, bucket: str | None = None) -> None:
        """Store one object in `bucket` (default: the deployment's own). A retry with the same key
        and body is harmless. Raises BucketUnavailable when it gives up on `bucket` for now."""
        ...


class PreparedLetters(Protocol):
    """Dead-letter records ready to go: whole values to store aside first, then the records."""

    @property
    def offloads(self) -> int:
        """How many values are too large for a record and are stored aside by `offload`."""
        ...

    async def offload(self) -> None:
        """Store the whole values of cut letters. Idempotent: same names, same bytes."""
        ...

    async def send(self) -> None:
        """Produce every letter and wait until the broker has them all (at-least-once)."""
        ...


class DeadLetterSink(Protocol):
    def prepare(self, letters: Sequence[DeadLetter]) -> PreparedLetters:
        """The records to produce (no I/O yet)."""
        ...
