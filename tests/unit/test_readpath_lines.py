"""Finding an event's line in a gzip member: any case, any escaping, decoys, corrupt members."""

from __future__ import annotations

import gzip
import uuid

import orjson
import pytest

from sinks.readpath import NotFound, UnreadableBody, find_line, member_lines

EVENT_ID = str(uuid.UUID("0190f0d8-abcd-7000-8def-00000000beef"))


def _member(*lines: bytes) -> bytes:
    return gzip.compress(b"\n".join(lines) + b"\n")


def _find(*lines: bytes) -> bytes:
    return find_line(member_lines(_member(*lines), "test member"), EVENT_ID)


@pytest.mark.parametrize(
    "line",
    [
        f'{{"event_id":"{EVENT_ID}"}}'.encode(),
        f'{{"event_id":"{EVENT_ID.upper()}"}}'.encode(),
        f'{{ "event_id" :  "{EVENT_ID[:9].upper()}{EVENT_ID[9:]}" , "x": 1 }}'.encode(),
        ('{"event_id":"' + "".join(f"\\u{ord(c):04x}" for c in EVENT_ID) + '"}').encode(),
        f'{{"event\\u005fid":"{EVENT_ID}"}}'.encode(),
    ],
)
def test_the_line_is_found_whatever_the_case_or_escaping(line: bytes) -> None:
    decoy = orjson.dumps({"event_id": str(uuid.uuid4()), "request": {"mentions": EVENT_ID}})
    assert _find(decoy, b"", b"not json at all " + EVENT_ID.encode(), line, decoy) == line


def test_the_first_line_of_the_event_wins_and_absence_is_not_found() -> None:
    first = f'{{"event_id":"{EVENT_ID.upper()}","n":1}}'.encode()
    second = f'{{"event_id":"{EVENT_ID}","n":2}}'.encode()
    assert _find(first, second) == first
    with pytest.raises(NotFound):
        _find(orjson.dumps({"event_id": str(uuid.uuid4())}), b"[1, 2]", b'"a string"')


def test_a_member_that_is_not_gzip_is_unreadable() -> None:
    with pytest.raises(UnreadableBody, match="test member: not a readable gzip member"):
        member_lines(b"plain bytes", "test member")
    with pytest.raises(UnreadableBody):
        member_lines(_member(b"{}")[:-9], "test member")  # truncated
