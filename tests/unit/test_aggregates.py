"""Aggregate deltas and rollup math without a database: grouping, sentinels, levels, daily = merge
of hourly, the rows a delta adds to, slots and shards, row values, usage mappings, and the
generated SQL (parsed with pglast)."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import numpy as np
import orjson
import pglast
import pytest

from pipeline.contract import ValidationPolicy, ValidEvent, validate_event
from pipeline.sketch import QuantileSketch, SketchDecodeError
from sinks import merger
from sinks.aggregate_parts import (
    DELTA_TABLES,
    LOG_DELTAS,
    NO_METHOD,
    NO_MODEL,
    NO_PROJECT,
    NO_SERVER,
    NO_USER,
    SLOTS,
    Acc,
    fold,
    group,
    insert_sql,
    log_parts,
    slot_of,
    usage_parts,
    usage_status,
)
from sinks.merger import (
    Shard,
    daily_from_hourly,
    day_of,
    log_targets,
    log_values,
    org_level,
    server_level,
    shards_of,
    usage_values,
)
from sinks.usage import mcp_usage_row, usage_event_row

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
POLICY = ValidationPolicy(timedelta(days=90), timedelta(hours=1))
ORG = str(uuid.UUID(int=7))
SERVER = str(uuid.UUID(int=8))


def event(**fields: Any) -> ValidEvent:
    body: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "organization_id": ORG,
        "started_at": "2026-11-23T10:15:00Z",
        "duration_ms": 10,
    }
    body.update(fields)
    result = validate_event(orjson.dumps(body), NOW, POLICY)
    assert isinstance(result, ValidEvent), result
    return result


def within_contract(estimate: float, exact: float) -> bool:
    return abs(estimate - exact) <= max(0.01 * abs(exact), 1.0)


def test_log_parts_group_by_hour_org_server_method_with_exact_sums() -> None:
    rng = random.Random(3)
    events = [
        event(
            started_at=f"2026-11-23T{rng.choice(['09', '10'])}:{rng.randint(0, 59):02d}:00Z",
            server_id=rng.choice([None, SERVER]),
            rpc_method=rng.choice([None, "", "tools/call"]),
            duration_ms=rng.randint(0, 5000),
            status_code=rng.choice([200, 500]),
            bytes_in=rng.randint(0, 99),
            bytes_out=rng.randint(0, 999),
        )
        for _ in range(500)
    ]
    parts = log_parts(events)
    expected: dict[tuple[object, ...], list[ValidEvent]] = {}
    for e in events:
        hour = e.started_at.replace(minute=0, second=0, microsecond=0)
        expected.setdefault((hour, ORG, e.server_id or NO_SERVER, e.rpc_method or NO_METHOD), []).append(e)
    assert set(parts) == set(expected)
    for key, members in expected.items():
        acc = parts[key]
        assert acc.sums == [
            len(members),
            sum(e.error for e in members),
            sum(e.bytes_in for e in members),
            sum(e.bytes_out for e in members),
        ]
        assert acc.sketch.alpha == LOG_DELTAS.alpha
        assert acc.sketch == QuantileSketch.from_values([e.duration_ms for e in members], LOG_DELTAS.alpha)


def test_sentinels_never_collide_with_the_all_rows() -> None:
    parts = log_parts([event(), event(rpc_method=""), event(server_id=SERVER, rpc_method="x")])
    keys = set(parts)
    hour = datetime(2026, 11, 23, 10, tzinfo=UTC)
    # No server and no (or an empty) method share one key, and no key holds None ("all").
    assert keys == {(hour, ORG, NO_SERVER, NO_METHOD), (hour, ORG, SERVER, "x")}
    assert parts[(hour, ORG, NO_SERVER, NO_METHOD)].sums[0] == 2
    assert all(None not in key for key in keys)


def test_hour_and_day_boundaries() -> None:
    events = [
        event(started_at="2026-11-22T23:59:59.999Z"),
        event(started_at="2026-11-23T00:00:00Z"),
        event(started_at="2026-11-23T00:59:59.999999Z"),
        event(started_at="2026-11-23T03:00:00.000+03:00"),  # = 00:00 UTC
    ]
    parts = log_parts(events)
    counts: dict[datetime, int] = {key[0]: acc.sums[0] for key, acc in parts.items()}  # type: ignore[misc]
    assert counts == {
        datetime(2026, 11, 22, 23, tzinfo=UTC): 1,
        datetime(2026, 11, 23, 0, tzinfo=UTC): 3,
    }
    assert {day_of(w) for w in counts} == {
        datetime(2026, 11, 22, tzinfo=UTC),
        datetime(2026, 11, 23, tzinfo=UTC),
    }


def test_parts_merged_across_batches_equal_one_batch() -> None:
    rng = random.Random(5)
    events = [event(duration_ms=rng.randint(0, 10**6), rpc_method=rng.choice(["a", "b"])) for _ in range(300)]
    whole = log_parts(events)
    pieces = [log_parts(events[i : i + 37]) for i in range(0, len(events), 37)]
    merged = fold((key, acc) for piece in pieces for key, acc in piece.items())
    assert set(merged) == set(whole)
    for key in whole:
        assert merged[key].sums == whole[key].sums
        assert merged[key].sketch.to_bytes() == whole[key].sketch.to_bytes()


def _random_hourly(rng: np.random.Generator) -> tuple[dict[Any, Acc], dict[Any, list[int]]]:
    hourly: dict[Any, Acc] = {}
    values: dict[Any, list[int]] = {}
    for server in (NO_SERVER, SERVER):
        for method in ("a", NO_METHOD):
            for hour in range(0, 48, 5):
                x = rng.lognormal(4, 1.5, size=int(rng.integers(1, 200))).astype(np.int64)
                w = datetime(2026, 11, 21, tzinfo=UTC) + timedelta(hours=hour)
                key = (w, ORG, server, method)
                hourly[key] = Acc(
                    [len(x), int(x.size // 3), 1, 2], QuantileSketch.from_values(x, LOG_DELTAS.alpha)
                )
                values[key] = x.tolist()
    return hourly, values


def test_levels_and_daily_are_exact_merges() -> None:
    hourly, values = _random_hourly(np.random.default_rng(9))
    servers = server_level(hourly.items())
    orgs = org_level(servers.items())
    for (w, _o, s, m), acc in servers.items():
        assert m is None
        members = [k for k in values if k[0] == w and k[2] == s]
        exact = [v for k in members for v in values[k]]
        assert acc.sums[0] == len(exact)
        assert acc.sketch == QuantileSketch.from_values(exact, LOG_DELTAS.alpha)
    for (w, _o, s, m), acc in orgs.items():
        assert s is None and m is None
        exact = [v for k in values if k[0] == w for v in values[k]]
        assert acc.sketch == QuantileSketch.from_values(exact, LOG_DELTAS.alpha)
    # Daily rows at each level are the merge of that level's hourly rows of the day.
    every_level = {
        **hourly,
        **server_level(hourly.items()),
        **org_level(server_level(hourly.items()).items()),
    }
    daily = daily_from_hourly(every_level.items())
    for (d, _o, s, m), acc in daily.items():
        exact = [
            v
            for (w, _o, ks, km), xs in values.items()
            if day_of(w) == d and (s is None or ks == s) and (m is None or km == m)
            for v in xs
        ]
        assert acc.sums[0] == len(exact)
        assert acc.sketch.to_bytes() == QuantileSketch.from_values(exact, LOG_DELTAS.alpha).to_bytes()
        row = log_values(acc)
        for q, got in zip((0.5, 0.95, 0.99), (row.p50, row.p95, row.p99), strict=True):
            assert within_contract(got, float(np.quantile(exact, q, method="lower")))
        assert row.avg == pytest.approx(np.mean(exact), rel=1e-12)
    assert {k[2:] for k in daily} == {
        (NO_SERVER, "a"),
        (NO_SERVER, NO_METHOD),
        (SERVER, "a"),
        (SERVER, NO_METHOD),
        (NO_SERVER, None),
        (SERVER, None),
        (None, None),
    }


def test_log_values_reject_a_sketch_that_disagrees_with_the_count() -> None:
    acc = Acc([3, 0, 0, 0], QuantileSketch.from_values([1, 2], LOG_DELTAS.alpha))
    with pytest.raises(ValueError, match="2 durations for 3"):
        log_values(acc)


def test_usage_parts_users_and_status() -> None:
    project = str(uuid.UUID(int=11))
    events = [
        event(model="m", input_tokens=5, cost_cents=2, user_id="u1", project_id=project),
        event(model="m", output_tokens=7, user_id="u2", project_id=project, status="timeout"),
        event(model="m", user_id="u1", project_id=project, status_code=503),
        event(input_tokens=1),  # no model, project or user
        event(user_id="u9"),  # no usage fields: ignored
    ]
    parts = usage_parts(events)
    hour = datetime(2026, 11, 23, 10, tzinfo=UTC)
    day = datetime(2026, 11, 23, tzinfo=UTC)
    assert parts.hourly[(hour, ORG, project, "m")].sums == [3, 1, 1, 5, 7, 0, 2]
    assert parts.hourly[(hour, ORG, NO_PROJECT, NO_MODEL)].sums == [1, 1, 0, 1, 0, 0, 0]
    assert parts.daily_users[(day, ORG, project, "m", "u1")].sums[0] == 2
    assert parts.daily_users[(day, ORG, NO_PROJECT, NO_MODEL, NO_USER)].sums[0] == 1
    assert parts.hour_users == [(hour, ORG, project, "m", "u1"), (hour, ORG, project, "m", "u2")]
    assert parts.day_users == {(day, ORG, project, "m", "u1"): hour, (day, ORG, project, "m", "u2"): hour}
    assert [usage_status(e) for e in events[:3]] == ["success", "timeout", "error"]
    row = usage_values(parts.hourly[(hour, ORG, project, "m")], unique_users=2)
    assert row.unique_users == 2 and row.p50 == pytest.approx(10, rel=0.01)


def test_usage_and_mcp_rows() -> None:
    e = event(
        event_type="mcp_tool",
        server_id=SERVER,
        mcp_tool_name="search",
        status="rate_limited",
        bytes_in=2**40,
        duration_ms=33,
        model="m",
    )
    row = dict(
        zip(
            ("time", "org", "project", "user", "server", "tool", "request", "latency", "status", "in", "out"),
            mcp_usage_row(e),
            strict=True,
        )
    )
    assert row["status"] == "blocked" and row["tool"] == "search" and row["in"] == 2**31 - 1
    assert row["request"] == e.event_id and row["latency"] == 33
    usage = usage_event_row(e)
    assert usage[5] == e.event_id and usage[13] == 33 and usage[15] == SERVER and usage[17] == "rate_limited"
    plain = usage_event_row(event(model="m", server_id=SERVER))
    assert plain[15] is None  # mcp_server_id only for MCP tool calls


SQL = [
    *(insert_sql(t) for t in DELTA_TABLES),
    *(f(t) for t in DELTA_TABLES for f in (merger.select_sql, merger.delete_sql)),
    *(merger.read_log_sql(level) for level in ("method", "server", "org")),
    merger.READ_USAGE_HOURLY,
    merger.READ_USAGE_DAILY_ALL,
    merger.READ_USAGE_DAILY_USER,
    merger._LOCK_SLOTS,
    merger._ISOLATE,
]


@pytest.mark.parametrize("sql", SQL)
def test_generated_sql_parses(sql: str) -> None:
    assert len(pglast.parse_sql(sql)) == 1


def test_a_fold_reads_rollup_rows_by_their_unique_key_only() -> None:
    # Cost independent of history lives in these predicates: every stored row a fold reads is
    # matched with = or IS NULL on each unique-key column (an index probe), never a range.
    for sql in (*(merger.read_log_sql(level) for level in ("method", "server", "org")),):
        for column in ("organization_id", "window_type", "window_start", "server_id", "rpc_method"):
            assert f"a.{column} = k." in sql or f"a.{column} IS NULL" in sql, (column, sql)
    for sql in (merger.READ_USAGE_HOURLY, merger.READ_USAGE_DAILY_ALL, merger.READ_USAGE_DAILY_USER):
        assert " >= " not in sql and " < " not in sql and "DISTINCT" not in sql
    assert "ORDER BY d.id LIMIT $2 FOR UPDATE OF d SKIP LOCKED" in merger.select_sql(LOG_DELTAS)


def test_one_delta_adds_to_six_rollup_rows() -> None:
    sketch = QuantileSketch.from_values([4.0, 9.0], LOG_DELTAS.alpha)
    leaf = (datetime(2026, 11, 23, 23, tzinfo=UTC), ORG, SERVER, "m")
    other = (datetime(2026, 11, 24, 0, tzinfo=UTC), ORG, SERVER, "m")  # the next day
    targets = log_targets({leaf: Acc([2, 1, 10, 20], sketch), other: Acc([2, 0, 1, 1], sketch.copy())})
    day, next_day = datetime(2026, 11, 23, tzinfo=UTC), datetime(2026, 11, 24, tzinfo=UTC)
    assert set(targets) == {
        (window_type, (start, ORG, server, method))
        for window_type, start in (
            ("hourly", leaf[0]),
            ("daily", day),
            ("hourly", other[0]),
            ("daily", next_day),
        )
        for server, method in ((SERVER, "m"), (SERVER, None), (None, None))
    }
    assert targets[("daily", (day, ORG, None, None))].sums == [2, 1, 10, 20]
    assert targets[("daily", (next_day, ORG, None, None))].sums == [2, 0, 1, 1]


def test_slots_are_stable_and_shards_partition_them() -> None:
    orgs = [str(uuid.UUID(int=random.Random(i).getrandbits(128))) for i in range(2000)]
    slots = [slot_of(o) for o in orgs]
    assert all(0 <= s < SLOTS for s in slots) and len(set(slots)) == SLOTS  # all slots used
    assert slot_of(ORG) == slot_of(str(uuid.UUID(ORG)))  # the canonical text, every time
    for count in (1, 2, 3, 7, 64):
        owned = [s for shard in shards_of(count, None) for s in shard.slots]
        assert sorted(owned) == list(range(SLOTS))  # each slot in exactly one shard
    assert shards_of(4, 2) == [Shard(2, 4)]
    for bad in ((0, 0), (65, 0), (4, 4), (4, -1)):
        with pytest.raises(ValueError):
            Shard(bad[1], bad[0])


# ---- sums that cannot overflow ---------------------------------------------------------------


def test_group_sums_past_int64_are_exact() -> None:
    # numpy's int64 adds wrap silently: 4 values of 2^62 sum to a negative number there.
    rng = np.random.default_rng(5)
    n = 4000
    sums = rng.integers(2**61, 2**63 - 1, size=(n, 4), dtype=np.int64)
    sums[:, 0] = 1  # a count column stays small
    keys = [(3600 * int(rng.integers(0, 3)), f"k{int(rng.integers(0, 5))}") for _ in range(n)]
    values = rng.integers(0, 10_000, size=n).astype(np.float64)
    parts = group(keys, values, sums, LOG_DELTAS.alpha)
    expected: dict[tuple[object, ...], list[int]] = {}
    for key, row in zip(keys, sums.tolist(), strict=True):
        column_sums = expected.setdefault(key, [0, 0, 0, 0])
        for j, v in enumerate(row):
            column_sums[j] += v
    got = {(_epoch(k[0]), k[1]): acc.sums for k, acc in parts.items()}
    assert got == expected
    assert max(max(s) for s in got.values()) > 2**63  # the case numpy would have wrapped
    assert all(isinstance(v, int) for s in got.values() for v in s)


def _epoch(window: object) -> int:
    assert isinstance(window, datetime)
    return int(window.timestamp())


def test_group_fast_path_still_exact_near_its_limit() -> None:
    # 2^22 * 2^40 < 2^63: the int64 path is taken and must agree with Python's sums.
    n = 1000
    sums = np.full((n, 4), 2**40 - 1, dtype=np.int64)
    parts = group([(0, "k")] * n, np.ones(n), sums, LOG_DELTAS.alpha)
    assert next(iter(parts.values())).sums == [n * (2**40 - 1)] * 4


def test_sums_from_numeric_columns_are_exact_and_fractions_refused() -> None:
    from decimal import Decimal

    from sinks.aggregate_parts import exact_int

    sketch = QuantileSketch.from_values([5.0]).to_bytes()
    acc = Acc.decode([Decimal(1), Decimal(0), Decimal(2**70 + 1), Decimal("12")], sketch)
    assert acc.sums == [1, 0, 2**70 + 1, 12]
    assert exact_int(Decimal("1E+3")) == 1000
    with pytest.raises(ValueError, match="not an integer"):
        exact_int(Decimal("2.5"))


def test_rollup_values_carry_sums_past_int64() -> None:
    sketch = QuantileSketch.from_values([10.0] * 3, alpha=LOG_DELTAS.alpha)
    a = Acc([3, 1, 2**63 + 5, 2**64], sketch)
    b = Acc([3, 0, 2**63, 7], sketch.copy())
    total = fold([("k", a), ("k", b)])["k"]
    values = log_values(total)
    assert (values.total, values.errors, values.bytes_in, values.bytes_out) == (6, 1, 2**64 + 5, 2**64 + 7)


# ---- one bad key never stops a merge pass (bisection, without a database) ---------------------


class _Savepoints:
    """Just enough of a connection for the bisection: savepoints and the isolation insert."""

    def __init__(self) -> None:
        self.savepoints = 0
        self.isolated: list[tuple[Any, ...]] = []

    def transaction(self) -> Any:
        self.savepoints += 1
        return _AsyncNull()

    async def execute(self, sql: str, *args: Any) -> str:
        assert sql == merger._ISOLATE
        self.isolated.append(args)
        return "INSERT 0 1"


class _AsyncNull:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


def _merge_failing_on(bad: set[PartKeyT], merged: list[PartKeyT], error: Exception) -> Any:
    async def merge(conn: Any, keys: list[PartKeyT], stats: merger.MergeStats) -> None:
        if bad.intersection(keys):
            raise error
        merged.extend(keys)
        stats.deltas_read += len(keys)

    return merge


PartKeyT = tuple[object, ...]
HOUR = datetime(2026, 11, 23, 10, tzinfo=UTC)


@pytest.mark.parametrize("bad_count", [0, 1, 3])
def test_bisection_isolates_exactly_the_failing_keys(bad_count: int) -> None:
    keys: list[PartKeyT] = [(HOUR, ORG, str(uuid.UUID(int=i)), "m") for i in range(1000)]
    bad = set(random.Random(bad_count).sample(keys, bad_count))
    merged: list[PartKeyT] = []
    conn = _Savepoints()
    stats = merger.MergeStats()
    corrupt = SketchDecodeError("crc mismatch")
    asyncio.run(
        merger._merge_isolating(conn, LOG_DELTAS, keys, _merge_failing_on(bad, merged, corrupt), stats)  # type: ignore[arg-type]
    )
    assert sorted(merged, key=str) == sorted(set(keys) - bad, key=str)  # every good key, once
    assert stats.deltas_read == len(keys) - bad_count
    assert {i.key for i in stats.isolated} == bad
    assert [(a[0], a[1], a[2]) for a in conn.isolated] == [
        ("log_aggregate_deltas", k[0], [str(v) for v in k[1:]]) for k in (i.key for i in stats.isolated)
    ]
    assert all("SketchDecodeError: crc mismatch" in i.error for i in stats.isolated)
    # one savepoint when nothing fails; about 2·log2(n) more per bad key
    assert conn.savepoints <= 1 + bad_count * 2 * 10
    if not bad:
        assert conn.savepoints == 1


def test_errors_not_about_data_fail_the_pass_instead_of_isolating() -> None:
    keys: list[PartKeyT] = [(HOUR, ORG, str(uuid.UUID(int=i)), "m") for i in range(8)]
    for error in (asyncpg.exceptions.UndefinedTableError("gone"), asyncpg.exceptions.SerializationError("x")):
        merge = _merge_failing_on({keys[3]}, [], error)
        with pytest.raises(type(error)):
            asyncio.run(merger._merge_isolating(_Savepoints(), LOG_DELTAS, keys, merge, merger.MergeStats()))  # type: ignore[arg-type]
    assert merger.attributable_to_keys(asyncpg.exceptions.NumericValueOutOfRangeError("x"))
    assert merger.attributable_to_keys(SketchDecodeError("x"))
    assert not merger.attributable_to_keys(ConnectionResetError())


def test_an_isolation_record_survives_a_hostile_error_message() -> None:
    keys: list[PartKeyT] = [(HOUR, ORG, str(uuid.UUID(int=i)), "m") for i in range(4)]
    conn = _Savepoints()
    merge = _merge_failing_on({keys[1]}, [], ValueError("bad \x00 byte \udc80 and " + "x" * 5000))
    asyncio.run(merger._merge_isolating(conn, LOG_DELTAS, keys, merge, merger.MergeStats()))  # type: ignore[arg-type]
    (_table, _window, _key, error) = conn.isolated[0]
    assert "\x00" not in error and len(error) == 2000
    error.encode("utf-8")  # no lone surrogate left
    assert error.startswith("ValueError: bad \\x00 byte \\udc80")


def test_too_many_failing_keys_is_not_a_few_bad_keys() -> None:
    keys: list[PartKeyT] = [(HOUR, ORG, str(uuid.UUID(int=i)), "m") for i in range(300)]
    merge = _merge_failing_on(set(keys), [], ValueError("every key fails: a bug, not data"))
    with pytest.raises(merger.TooManyIsolatedKeys):
        asyncio.run(merger._merge_isolating(_Savepoints(), LOG_DELTAS, keys, merge, merger.MergeStats()))  # type: ignore[arg-type]


def test_numeric_delta_sums_travel_as_text_and_come_back_exact() -> None:
    from decimal import Decimal

    from sinks.aggregate_parts import exact_int
    from sinks.aggregates import _plain_rows

    assert "d.sums::text[] AS sums" in merger.select_sql(LOG_DELTAS)
    assert "$7::text[]" in insert_sql(LOG_DELTAS) and "]::numeric[]" in insert_sql(LOG_DELTAS)
    assert exact_int(str(2**70)) == 2**70
    for bad in ("2.5", "1e3", ""):
        with pytest.raises(ValueError):
            exact_int(bad)
    rows = _plain_rows([{"total_bytes_in": Decimal(2**65), "avg": 1.5, "name": "x"}])  # type: ignore[list-item]
    assert rows == [{"total_bytes_in": 2**65, "avg": 1.5, "name": "x"}]
    assert isinstance(rows[0]["total_bytes_in"], int)
