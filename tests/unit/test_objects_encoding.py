import gzip
import io
import random

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from isal import igzip

from pipeline.processing.layout import encode_lines, object_key, parse_object_uri


def _lines(n: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    return [orjson.dumps({"event_id": str(i), "pad": "x" * rng.randint(10, 3000)}) for i in range(n)]


def test_whole_object_reads_as_json_lines_with_plain_gzip() -> None:
    lines = _lines(500)
    encoded = encode_lines(lines, member_bytes=16 * 1024)
    with gzip.GzipFile(fileobj=io.BytesIO(encoded.body)) as f:
        assert f.read().split(b"\n")[:-1] == lines


def test_every_pointer_names_the_member_holding_its_line() -> None:
    lines = _lines(400, seed=7)
    encoded = encode_lines(lines, member_bytes=8 * 1024)
    assert len(set(encoded.pointers)) > 10  # really several members
    for line, (offset, length) in zip(lines, encoded.pointers, strict=True):
        member = encoded.body[offset : offset + length]
        assert line in igzip.decompress(member).split(b"\n")


def test_members_hold_about_the_configured_text_size() -> None:
    lines = [b"y" * 99 for _ in range(10_000)]  # 100 bytes with the newline
    encoded = encode_lines(lines, member_bytes=64 * 1024)
    members = sorted(set(encoded.pointers))
    sizes = [len(igzip.decompress(encoded.body[o : o + n])) for o, n in members]
    assert all(64 * 1024 - 100 < s <= 64 * 1024 for s in sizes[:-1])
    assert sum(sizes) == encoded.text_bytes == 1_000_000


def test_a_line_larger_than_a_member_gets_its_own_member() -> None:
    lines = [b"a", b"b" * 100_000, b"c"]
    encoded = encode_lines(lines, member_bytes=2048)
    assert len(set(encoded.pointers)) == 3


@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=300).map(lambda b: b.replace(b"\n", b" ")), max_size=200))
def test_pointers_cover_members_contiguously(lines: list[bytes]) -> None:
    encoded = encode_lines(lines, member_bytes=1024)
    members = sorted(set(encoded.pointers))
    position = 0
    for offset, length in members:
        assert offset == position
        position += length
    assert position == len(encoded.body)


def test_object_keys_are_unique_per_attempt_and_follow_the_layout() -> None:
    from datetime import date

    a = object_key("0b7e", date(2026, 11, 23), None, "gateway.requests.v1")
    b = object_key("0b7e", date(2026, 11, 23), None, "gateway.requests.v1")
    assert a != b
    assert a.startswith("org/0b7e/date=2026-11-23/_/gateway.requests.v1-")
    assert a.endswith(".jsonl.gz")
    assert parse_object_uri(f"s3://bucket/{a}") == ("bucket", a)
