"""sinks.index.stage_rows: what the batch COPYs into its stage must give back every log_index column.

The INSERT (sinks/index.py) rebuilds started_at from `started_us` and the pointer from `member`, an
index (from 1) into the batch's pointer arrays; the stored rows themselves are compared with the
previous row form in bench/index_rows_speed.py and checked end to end in tests/integration.
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from pipeline.contract import ValidationPolicy, ValidEvent, validate_event
from pipeline.processing.store import IndexedEvent
from sinks.index import _STAGE_COLUMNS, stage_rows

NOW = datetime(2026, 11, 29, 12, tzinfo=UTC)
POLICY = ValidationPolicy(max_age=timedelta(days=365 * 10_000), max_future_skew=timedelta(days=365 * 10_000))
PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


def event(rng: random.Random, started_at: str) -> ValidEvent:
    body: dict[str, Any] = {
        "event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "organization_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "started_at": started_at,
        "duration_ms": rng.randint(0, 5000),
        "server_id": rng.choice([None, str(uuid.UUID(int=rng.getrandbits(128), version=4))]),
        "rpc_method": rng.choice([None, "tools/call"]),
        "status_code": rng.choice([None, 200, 503]),
        "user_id": rng.choice([None, "u1"]),
        "remote_ip": rng.choice([None, "10.0.0.1", "2001:db8::1"]),
        "redaction_version": rng.choice([None, 2]),
    }
    result = validate_event(orjson.dumps(body), NOW, POLICY)
    assert isinstance(result, ValidEvent), result
    return result


def stamps(rng: random.Random, count: int) -> list[str]:
    """started_at texts: around now, before and after the 2000 epoch, the ends of the range, offsets."""
    fixed = ["0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999Z", "2000-01-01T00:00:00Z"]
    fixed += [
        "1999-12-31T23:59:59.999999Z",
        "2026-03-08T02:30:00.5-05:00",
        "1969-07-20T20:17:40.000001+14:00",
    ]
    drawn = [
        (PG_EPOCH + timedelta(microseconds=rng.randint(-(10**16), 10**16))).isoformat().replace("+00:00", "Z")
        for _ in range(count)
    ]
    return fixed + drawn


def test_stage_records_hold_every_column_and_started_at_to_the_microsecond() -> None:
    rng = random.Random(1)
    events = [event(rng, stamp) for stamp in stamps(rng, 300)]
    indexed = [IndexedEvent(e, f"s3://b/{n % 3}", 100 * n, 7) for n, e in enumerate(events)]
    stage = stage_rows(indexed)
    assert stage.events == events
    for item, record in zip(indexed, stage.records, strict=True):
        row = dict(zip(_STAGE_COLUMNS, record, strict=True))
        e = item.event
        started_us, member = row["started_us"], row["member"]
        assert type(started_us) is int and type(member) is int
        assert PG_EPOCH + timedelta(microseconds=started_us) == e.started_at
        member -= 1
        assert (stage.uris[member], stage.offsets[member], stage.lengths[member]) == (
            item.object_uri,
            item.byte_offset,
            item.byte_length,
        )
        assert (row["id"], row["organization_id"], row["server_id"], row["rpc_method"], row["level"]) == (
            e.event_id,
            e.organization_id,
            e.server_id,
            e.rpc_method,
            e.level,
        )
        assert (row["duration_ms"], row["status_code"], row["error_flag"], row["user_id"]) == (
            e.duration_ms,
            e.status_code,
            e.error,
            e.user_id,
        )
        assert (row["remote_ip"], row["redaction_version"]) == (e.remote_ip, e.redaction_version)
        assert (row["session_id"], row["client_id"], row["connection_id"]) == (
            e.session_id,
            e.client_id,
            e.connection_id,
        )


def test_events_of_one_member_share_one_pointer_entry() -> None:
    rng = random.Random(2)
    events = [event(rng, "2026-11-29T11:00:00Z") for _ in range(10)]
    # Two objects, as the flush lists them: the first holds two members of 3 events, the second
    # one member of 4.
    first, second = "s3://b/one", "s3://b/two"
    pointers = [(first, 0, 50)] * 3 + [(first, 50, 60)] * 3 + [(second, 0, 70)] * 4
    indexed = [IndexedEvent(e, *p) for e, p in zip(events, pointers, strict=True)]
    stage = stage_rows(indexed)
    assert list(zip(stage.uris, stage.offsets, stage.lengths, strict=True)) == [
        (first, 0, 50),
        (first, 50, 60),
        (second, 0, 70),
    ]
    members = [r[_STAGE_COLUMNS.index("member")] for r in stage.records]
    assert members == [1, 1, 1, 2, 2, 2, 3, 3, 3, 3]


def test_a_pointer_that_differs_in_length_only_is_a_new_member() -> None:
    rng = random.Random(3)
    events = [event(rng, "2026-11-29T11:00:00Z") for _ in range(2)]
    indexed = [IndexedEvent(events[0], "s3://b/x", 0, 10), IndexedEvent(events[1], "s3://b/x", 0, 11)]
    stage = stage_rows(indexed)
    assert stage.lengths == [10, 11]
    assert [r[_STAGE_COLUMNS.index("member")] for r in stage.records] == [1, 2]


def test_an_empty_batch_has_no_rows() -> None:
    stage = stage_rows([])
    assert (stage.records, stage.events, stage.uris) == ([], [], [])
