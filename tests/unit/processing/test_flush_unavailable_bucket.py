"""An organization's own bucket that the object store gives up on (BucketUnavailable): the flush
dead-letters that organization's events (`storage_unavailable`) and commits everyone else's."""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from pipeline.processing.flush import flush
from pipeline.processing.store import BucketUnavailable
from tests.unit.processing.fakes import FakeObjects, event, harness, ids, make_batch

CUSTOMER = "0e5a1c3b-7a57-4c00-8d00-00000000c0fe"


@dataclass
class _CustomerBucketDown(FakeObjects):
    """The deployment's bucket works; the customer organization's bucket is given up on after
    `fail_first` retriable failures."""

    fail_first: int = 0
    attempts: int = 0

    def bucket_for(self, organization_id: str) -> str:
        return "acme" if organization_id == CUSTOMER else self.bucket

    async def put(self, key: str, body: bytes, *, bucket: str | None = None) -> None:
        if bucket == "acme":
            self.attempts += 1
            if self.attempts <= self.fail_first:
                raise ConnectionResetError("acme is slow")  # retriable: the flush retries it
            raise BucketUnavailable("acme", "organization x: AccessDenied")
        await super().put(key, body, bucket=bucket)


async def test_the_events_of_a_bucket_given_up_on_are_dead_lettered_and_the_rest_committed() -> None:
    h = harness({0: 0})
    objects = _CustomerBucketDown(h.log, fail_first=2)
    h.ctx.objects = objects
    theirs = [event(organization_id=CUSTOMER) for _ in range(3)]
    ours = [event() for _ in range(4)]
    batch = make_batch({0: 0}, {0: [theirs[0], *ours[:2], theirs[1], *ours[2:], theirs[2]]})

    report = await flush(h.ctx, batch)

    assert objects.attempts == 3  # two retried outages, then given up
    assert set(h.index.rows) == ids(ours)
    assert h.index.offsets == {0: 7}  # every offset placed: indexed or dead-lettered
    assert sorted((m.message.offset, m.reason) for m in h.letters.sent) == [
        (0, "storage_unavailable"),
        (3, "storage_unavailable"),
        (6, "storage_unavailable"),
    ]
    assert all("AccessDenied" in m.detail for m in h.letters.sent)
    assert {orjson.loads(m.message.value or b"")["organization_id"] for m in h.letters.sent} == {CUSTOMER}
    assert all(i.object_uri.startswith("s3://logs/") for i in h.index.rows.values())
    assert report.invalid == 3 and len(report.outcome.new_events) == 4
    names = h.log.names()
    assert names.index("dead_letters") < names.index("commit")  # letters before the offsets move
