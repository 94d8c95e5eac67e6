"""What `AggregateDeltasWriter.write` sends to PostgreSQL, against a per-event reference written the
plain way (dicts of keys, sets of users, days and sessions, one sketch per key from its values):
the same delta rows in the same order, the same new users, days and sessions counted, across
successive batches that share users and windows. The statements run on an in-memory stand-in
of the tables: delta inserts are recorded row by row, the set inserts keep ON CONFLICT DO NOTHING
RETURNING's meaning."""

from __future__ import annotations

import asyncio
import random
import re
import uuid
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from pipeline.contract import ValidationPolicy, ValidEvent, validate_event
from pipeline.sketch import QuantileSketch
from sinks.aggregate_parts import (
    DAY_S,
    HOUR_S,
    LOG_DELTAS,
    NO_METHOD,
    NO_PROJECT,
    NO_SERVER,
    SERVER_STATS_DELTAS,
    USAGE_DELTAS,
    USAGE_MONTHLY_DELTAS,
    USAGE_USER_DELTAS,
    Acc,
    AggregateDeltasWriter,
    insert_deltas,
    month_start,
    slot_of,
    usage_status,
    window_start,
)

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
POLICY = ValidationPolicy(timedelta(days=90), timedelta(hours=1))
ORGS = [str(uuid.UUID(int=i)) for i in (1, 2, 3)]
SERVERS = [None, NO_SERVER, *(str(uuid.UUID(int=30 + i)) for i in range(3))]
SESSIONS = [None, *(str(uuid.UUID(int=40 + i)) for i in range(3))]
# Across a minute, an hour, a day and a month boundary.
MOMENTS = [
    datetime(2026, 10, 31, 23, 59, 59, 999000, tzinfo=UTC),
    datetime(2026, 11, 1, 0, 0, tzinfo=UTC),
    datetime(2026, 11, 1, 0, 30, 0, 1000, tzinfo=UTC),
    datetime(2026, 11, 23, 10, 15, 30, tzinfo=UTC),
    datetime(2026, 11, 23, 10, 16, 1, tzinfo=UTC),
    datetime(2026, 11, 23, 11, 0, tzinfo=UTC),
]
WIDTH_S = 60

Row = tuple[Any, ...]


def make_events(rng: random.Random, count: int) -> list[ValidEvent]:
    events = []
    for _ in range(count):
        fields: dict[str, Any] = {
            "event_id": str(uuid.UUID(int=rng.getrandbits(128))),
            "organization_id": rng.choice(ORGS),
            "started_at": rng.choice(MOMENTS).isoformat().replace("+00:00", "Z"),
            "duration_ms": rng.choice((0, rng.randint(1, 300), rng.randint(0, 2**31 - 1))),
            "server_id": rng.choice(SERVERS),
            "session_id": rng.choice(SESSIONS),
            "rpc_method": rng.choice((None, "", "tools/call", "ping")),
            "error": rng.random() < 0.3,
            "bytes_in": rng.randint(0, 10**6),
            "bytes_out": rng.choice((0, 7, 2**40)),
        }
        if rng.random() < 0.6:
            fields |= {
                "model": rng.choice((None, "m1", "m2")),
                "user_id": rng.choice((None, "u1", "u2", "u3")),
                "project_id": rng.choice((None, str(uuid.UUID(int=50)))),
                "input_tokens": rng.choice((None, 0, 5, 2**31 - 1)),
                "status": rng.choice((None, "success", "error", "timeout")),
            }
        body = {k: v for k, v in fields.items() if v is not None}
        event = validate_event(orjson.dumps(body), NOW, POLICY)
        assert isinstance(event, ValidEvent), event
        events.append(event)
    return events


class MemoryTables:
    """The statements' effect, kept in memory: delta rows in insert order, and the user, day and
    session sets (an insert returns only the rows the set did not have)."""

    def __init__(self) -> None:
        self.deltas: dict[str, list[Row]] = {}
        self.sets: dict[str, set[Row]] = {}

    async def execute(self, sql: str, *columns: Sequence[Any]) -> None:
        table = _table(sql)
        sums = slice(-1 - _SUM_COUNTS[table], -1)
        for row in zip(*columns, strict=True):
            # Sums arrive as int8 or as digits: both are the same NUMERIC in the table.
            self.deltas.setdefault(table, []).append(
                (*row[: sums.start], tuple(int(v) for v in row[sums]), row[-1])
            )

    async def fetch(self, sql: str, *columns: Sequence[Any]) -> list[dict[str, Any]]:
        table = _table(sql)
        rows = list(zip(*columns, strict=True))
        assert rows == sorted(rows), f"{table}: inserted out of lock order"
        have = self.sets.setdefault(table, set())
        new = [r for r in rows if r not in have]
        have.update(new)
        counted = re.search(r"RETURNING [^)]*\) SELECT (.*) FROM new GROUP BY", sql)
        if counted is None:  # RETURNING the new rows' leading columns
            return [dict(zip(_names(sql.split("RETURNING ")[1]), r, strict=False)) for r in new]
        # The new rows counted per their leading columns (the last output column is the count).
        *names, count = _names(counted[1])
        counts = Counter(r[: len(names)] for r in new)
        return [{**dict(zip(names, key, strict=True)), count: n} for key, n in counts.items()]


def _names(select_list: str) -> list[str]:
    return [c.split(" AS ")[-1].strip() for c in select_list.split(",")]


_SUM_COUNTS = {
    t.name: len(t.sum_names)
    for t in (LOG_DELTAS, USAGE_DELTAS, USAGE_USER_DELTAS, SERVER_STATS_DELTAS, USAGE_MONTHLY_DELTAS)
}


def _table(sql: str) -> str:
    found = re.search(r"INSERT INTO (\w+) ", sql)
    assert found, sql
    return found[1]


class Reference:
    """The delta rows of a batch computed event by event, with its own sets across batches."""

    def __init__(self) -> None:
        self.hour_users: set[Row] = set()
        self.day_users: set[Row] = set()
        self.month_users: set[Row] = set()
        self.active_days: set[Row] = set()
        self.sessions: set[Row] = set()

    def rows(self, events: list[ValidEvent]) -> dict[str, list[Row]]:
        log: dict[Row, tuple[list[int], list[int]]] = {}
        hourly: dict[Row, tuple[list[int], list[int]]] = {}
        daily: dict[Row, tuple[list[int], list[int]]] = {}
        monthly: dict[Row, tuple[list[int], list[int]]] = {}
        servers: dict[Row, tuple[list[int], list[int]]] = {}
        first_hour_of_day_user: dict[Row, int] = {}
        new_hour_users: set[Row] = set()
        new_month_users: set[Row] = set()
        new_days: set[Row] = set()
        new_sessions: set[Row] = set()
        for e in events:
            t = e.started_at.timestamp()
            hour, day, month = window_start(t, HOUR_S), window_start(t, DAY_S), month_start(e.started_at)
            org = e.organization_id
            _add(
                log,
                (hour, org, e.server_id or NO_SERVER, e.rpc_method or NO_METHOD),
                e.duration_ms,
                [1, int(e.error), e.bytes_in, e.bytes_out],
            )
            if e.server_id and e.server_id != NO_SERVER:
                window = window_start(t, WIDTH_S)
                _add(servers, (window, org, e.server_id, WIDTH_S), e.duration_ms, [1, int(e.error), 0])
                session = (window, org, e.server_id, e.session_id)
                if e.session_id and session not in self.sessions:
                    new_sessions.add(session)
            if not e.has_usage:
                continue
            key = (org, e.project_id or NO_PROJECT, e.model or "")
            status = usage_status(e)
            sums = [
                1,
                int(status == "success"),
                int(status == "error"),
                e.input_tokens or 0,
                e.output_tokens or 0,
                e.cache_read_tokens or 0,
                e.cost_cents or 0,
            ]
            _add(hourly, (hour, *key), e.duration_ms, [*sums, 0, 0])
            _add(daily, (day, *key, e.user_id or ""), e.duration_ms, sums)
            _add(monthly, (month, *key), e.duration_ms, [*sums, 0, 0])
            if (day, *key) not in self.active_days:
                new_days.add((day, *key))
            if e.user_id:
                user = (*key, e.user_id)
                if (hour, *user) not in self.hour_users:
                    new_hour_users.add((hour, *user))
                if (day, *user) not in self.day_users:
                    earliest = first_hour_of_day_user.get((day, *user), hour)
                    first_hour_of_day_user[(day, *user)] = min(earliest, hour)
                if (month, *user) not in self.month_users:
                    new_month_users.add((month, *user))
        # (window, org, project, model[, user]): the user is dropped, the window kept or replaced.
        for found in new_hour_users:
            hourly[found[:4]][0][-2] += 1
        for found, hour in first_hour_of_day_user.items():
            hourly[(hour, *found[1:4])][0][-1] += 1
        for found in new_month_users:
            monthly[found[:4]][0][-2] += 1
        for found in new_days:
            monthly[(month_start(datetime.fromtimestamp(found[0], UTC)), *found[1:])][0][-1] += 1
        for window, org, server, _ in new_sessions:
            servers[(window, org, server, WIDTH_S)][0][-1] += 1
        self.hour_users |= new_hour_users
        self.day_users |= set(first_hour_of_day_user)
        self.month_users |= new_month_users
        self.active_days |= new_days
        self.sessions |= new_sessions
        tables = (
            (LOG_DELTAS, log),
            (USAGE_DELTAS, hourly),
            (USAGE_USER_DELTAS, daily),
            (USAGE_MONTHLY_DELTAS, monthly),
            (SERVER_STATS_DELTAS, servers),
        )
        return {table.name: _delta_rows(parts, table.alpha) for table, parts in tables if parts}


def _add(parts: dict[Row, tuple[list[int], list[int]]], key: Row, value: int, sums: list[int]) -> None:
    have = parts.setdefault(key, ([0] * len(sums), []))
    for i, s in enumerate(sums):
        have[0][i] += s
    have[1].append(value)


def _delta_rows(parts: dict[Row, tuple[list[int], list[int]]], alpha: float) -> list[Row]:
    return [
        (
            slot_of(org),
            datetime.fromtimestamp(window, UTC),
            org,
            *rest,
            tuple(sums),
            QuantileSketch.from_values(values, alpha).to_bytes(),
        )
        for (window, org, *rest), (sums, values) in parts.items()
    ]


@pytest.mark.parametrize("seed", range(12))
def test_written_rows_equal_the_per_event_reference_across_batches(seed: int) -> None:
    rng = random.Random(seed)
    tables, reference, writer = MemoryTables(), Reference(), AggregateDeltasWriter(WIDTH_S)
    for size in (rng.randint(0, 5), rng.randint(1, 300), rng.randint(1, 300)):
        events = make_events(rng, size)
        tables.deltas.clear()
        asyncio.run(writer.write(tables, events, 0))  # type: ignore[arg-type]
        assert tables.deltas == reference.rows(events)


def test_sums_past_int64_travel_as_text() -> None:
    sketch = QuantileSketch.from_values([1.0], LOG_DELTAS.alpha)
    big = {(NOW, ORGS[0], NO_SERVER, NO_METHOD): Acc([2**70, -(2**63) - 1, 0, 1], sketch)}
    sent: list[tuple[str, tuple[Sequence[Any], ...]]] = []

    class Recording(MemoryTables):
        async def execute(self, sql: str, *columns: Sequence[Any]) -> None:
            sent.append((sql, columns))
            await super().execute(sql, *columns)

    recording = Recording()
    asyncio.run(insert_deltas(recording, LOG_DELTAS, big))  # type: ignore[arg-type]
    sql, columns = sent[0]
    assert "$6::text[]" in sql and columns[5] == [str(2**70)] and columns[6] == [str(-(2**63) - 1)]
    assert recording.deltas[LOG_DELTAS.name][0][-2] == (2**70, -(2**63) - 1, 0, 1)
    small = {(NOW, ORGS[0], NO_SERVER, NO_METHOD): Acc([2**63 - 1, -(2**63), 0, 1], sketch)}
    asyncio.run(insert_deltas(recording, LOG_DELTAS, small))  # type: ignore[arg-type]
    assert "$6::int8[]" in sent[1][0] and sent[1][1][5] == [2**63 - 1]
