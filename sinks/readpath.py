"""The read path: find events in the Postgres index, fetch their bodies from object storage.

`get_event` costs one index lookup and one ranged GET of one gzip member (docs/contract.md §4).
`query` pages by keyset on (started_at, id) so deep pages cost the same as the first.
"""

from __future__ import annotations

import asyncio
import base64
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
import orjson
from botocore.exceptions import BotoCoreError, ClientError

from pipeline.processing.layout import parse_object_uri
from sinks.buckets import UnknownBucket
from sinks.db import Connection
from sinks.objects import ObjectWriter


class NotFound(Exception):
    """No such event: not in the index, or not in the member its index row points at."""


class UnreadableBody(Exception):
    """The object an index row points at is there but its bytes are not a gzip member."""


@dataclass(frozen=True)
class QueryFilter:
    organization_id: str | None = None
    server_id: str | None = None
    session_id: str | None = None
    rpc_method: str | None = None
    level: str | None = None
    user_id: str | None = None
    status_code: int | None = None
    errors_only: bool = False
    since: datetime | None = None
    until: datetime | None = None


_ROW_COLUMNS = (
    "id, organization_id, server_id, session_id, rpc_method, level, started_at, duration_ms, "
    "status_code, error_flag, user_id, remote_ip, object_uri, byte_offset, byte_length"
)


def encode_cursor(started_at: datetime, event_id: str) -> str:
    raw = orjson.dumps([started_at.isoformat(), event_id])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        started, event_id = orjson.loads(base64.urlsafe_b64decode(padded))
        return datetime.fromisoformat(started), str(event_id)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"invalid --cursor {cursor!r}") from exc


async def query_index(
    conn: Connection, flt: QueryFilter, limit: int, cursor: str | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """Newest first. Returns the rows and the cursor of the next page (None on the last page)."""
    where: list[str] = []
    args: list[Any] = []

    def add(sql: str, value: Any) -> None:
        args.append(value)
        where.append(sql.format(f"${len(args)}"))

    if flt.organization_id:
        add("organization_id = {}::uuid", flt.organization_id)
    if flt.server_id:
        add("server_id = {}::uuid", flt.server_id)
    if flt.session_id:
        add("session_id = {}::uuid", flt.session_id)
    if flt.rpc_method:
        add("rpc_method = {}", flt.rpc_method)
    if flt.level:
        add("level = {}::log_level_enum", flt.level)
    if flt.user_id is not None:
        add("user_id = {}", flt.user_id)
    if flt.status_code is not None:
        add("status_code = {}", flt.status_code)
    if flt.errors_only:
        where.append("error_flag")
    if flt.since:
        add("started_at >= {}", flt.since)
    if flt.until:
        add("started_at < {}", flt.until)
    if cursor:
        started, event_id = decode_cursor(cursor)
        args.extend([started, event_id])
        where.append(f"(started_at, id) < (${len(args) - 1}, ${len(args)}::uuid)")
    args.append(limit + 1)
    sql = (
        f"SELECT {_ROW_COLUMNS} FROM log_index"
        + (" WHERE " + " AND ".join(where) if where else "")
        + f" ORDER BY started_at DESC, id DESC LIMIT ${len(args)}"
    )
    rows = [dict(r) for r in await conn.fetch(sql, *args)]
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        next_cursor = encode_cursor(last["started_at"], str(last["id"]))
    return rows, next_cursor


def member_lines(member: bytes, where: str) -> list[bytes]:
    """The lines of one gzip member (`where` names it in the error)."""
    try:
        text = zlib.decompress(member, wbits=31)
    except zlib.error as exc:
        raise UnreadableBody(f"{where}: not a readable gzip member ({exc})") from None
    return text.split(b"\n")


def find_line(lines: Sequence[bytes], event_id: str) -> bytes:
    """The stored line of `event_id` (canonical lower-case text) among one member's lines.

    A line is the value as the gateway sent it, so its `event_id` may be upper or mixed case, or
    written with JSON escapes (`"\\u0030190..."`), and the JSON need not be compact: a line is
    parsed when it holds the id in any case, or any escape, and its `event_id` compared the way
    the worker canonicalised it (lower-cased), so the first line that is the event is found.
    """
    needle = event_id.encode()
    for line in lines:
        if needle not in line.lower() and b"\\u" not in line:
            continue
        try:
            candidate = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # not an event line (the worker stores only lines that parse)
        if isinstance(candidate, dict):
            stored_id = candidate.get("event_id")
            if isinstance(stored_id, str) and stored_id.lower() == event_id:
                return line
    raise NotFound(f"event {event_id} is not in the gzip member its index row points at")


@dataclass(frozen=True)
class BodyError:
    """Why one event's stored body could not be read (the other rows of a page still print)."""

    reason: str


# What reading one object can fail with: S3 (botocore wraps most transport errors, aiohttp's
# can surface from the body stream), a pointer that names no object or a bucket no route reaches
# (a customer bucket's row removed by hand), a member that is not gzip.
_READ_ERRORS = (
    UnknownBucket,
    BotoCoreError,
    ClientError,
    aiohttp.ClientError,
    OSError,
    ValueError,
    UnreadableBody,
    NotFound,
)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (UnreadableBody, NotFound)):
        return str(exc)
    return f"object storage: {type(exc).__name__}: {exc}"


async def fetch_bodies(
    objects: ObjectWriter, rows: Sequence[dict[str, Any]], concurrency: int = 16
) -> dict[str, bytes | BodyError]:
    """Event id -> stored line, or why it could not be read; each distinct gzip member read once."""
    by_member: dict[tuple[str, int, int], list[str]] = {}
    for row in rows:
        key = (row["object_uri"], row["byte_offset"], row["byte_length"])
        by_member.setdefault(key, []).append(str(row["id"]))
    slots = asyncio.Semaphore(concurrency)
    found: dict[str, bytes | BodyError] = {}

    async def one(uri: str, offset: int, length: int, ids: list[str]) -> None:
        try:
            bucket, key = parse_object_uri(uri)
            async with slots:
                member = await objects.get_range(bucket, key, offset, length)
            lines = member_lines(member, f"{uri} bytes {offset}+{length}")
        except _READ_ERRORS as exc:
            for event_id in ids:
                found[event_id] = BodyError(_describe(exc))
            return
        for event_id in ids:
            try:
                found[event_id] = find_line(lines, event_id)
            except NotFound as exc:
                found[event_id] = BodyError(str(exc))

    async with asyncio.TaskGroup() as group:
        for (uri, offset, length), ids in by_member.items():
            group.create_task(one(uri, offset, length, ids))
    return found


async def find_pointer(conn: Connection, event_id: str) -> dict[str, Any]:
    """The index row's pointer of `event_id`: object_uri, byte_offset, byte_length."""
    row = await conn.fetchrow(
        "SELECT object_uri, byte_offset, byte_length FROM log_index WHERE id = $1::uuid LIMIT 1", event_id
    )
    if row is None:
        raise NotFound(f"no event {event_id} in log_index")
    return dict(row)


async def read_event(objects: ObjectWriter, pointer: dict[str, Any], event_id: str) -> bytes:
    """The stored line of `event_id`: one ranged GET of the gzip member `pointer` names."""
    uri, offset, length = pointer["object_uri"], pointer["byte_offset"], pointer["byte_length"]
    bucket, key = parse_object_uri(uri)
    member = await objects.get_range(bucket, key, offset, length)
    return find_line(member_lines(member, f"{uri} bytes {offset}+{length}"), event_id)


async def get_event(conn: Connection, objects: ObjectWriter, event_id: str) -> bytes:
    return await read_event(objects, await find_pointer(conn, event_id), event_id)
