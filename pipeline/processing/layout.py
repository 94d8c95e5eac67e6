"""The object layout (docs/contract.md §3, §4): keys, URIs, and gzip members with their pointers.

An object is a concatenation of gzip members, each holding whole lines of about `member_bytes` of
text, so any gzip reader sees one JSON Lines file while a reader holding (byte_offset, byte_length)
of one member can fetch and gunzip just that member.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

from isal import igzip


@dataclass(frozen=True, slots=True)
class EncodedObject:
    body: bytes
    # For line i: (byte_offset, byte_length) of the gzip member that holds it.
    pointers: list[tuple[int, int]]
    text_bytes: int


def encode_lines(lines: Sequence[bytes], member_bytes: int = 64 * 1024, level: int = 1) -> EncodedObject:
    """Pack `lines` (each without its trailing newline) into gzip members of ~member_bytes text."""
    chunks: list[bytes] = []
    pointers: list[tuple[int, int]] = []
    offset = 0
    text_total = 0
    start = 0
    n = len(lines)
    while start < n:
        size = 0
        end = start
        # A member closes once it reaches member_bytes; a single huge line still gets its own member.
        while end < n and (size == 0 or size + len(lines[end]) + 1 <= member_bytes):
            size += len(lines[end]) + 1
            end += 1
        text = b"\n".join(lines[start:end]) + b"\n"
        member = igzip.compress(text, compresslevel=level)
        pointer = (offset, len(member))
        pointers.extend([pointer] * (end - start))
        chunks.append(member)
        offset += len(member)
        text_total += len(text)
        start = end
    return EncodedObject(body=b"".join(chunks), pointers=pointers, text_bytes=text_total)


def object_key(organization_id: str, log_date: date, server_id: str | None, topic: str) -> str:
    """A key unique to this flush attempt: a late upload by a zombie can never overwrite a live object.

    The time prefix keeps a prefix listing in write order; the random suffix makes it unique.
    """
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    return (
        f"org/{organization_id}/date={log_date.isoformat()}/{server_id or '_'}/"
        f"{topic}-{stamp}-{secrets.token_hex(8)}.jsonl.gz"
    )


def object_uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def parse_object_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    if not bucket or not key:
        raise ValueError(f"not an s3://bucket/key URI: {uri!r}")
    return bucket, key
