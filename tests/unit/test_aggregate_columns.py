"""The batch's vectorised grouping (sinks/aggregate_parts.py, one set of columns per batch) against
a per-event reference written the plain way: same keys in the same order, same exact sums, same
sketches, same user / day / session sets."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.contract import ValidationPolicy, ValidEvent, validate_event
from sinks.aggregate_parts import (
    DAY_S,
    HOUR_S,
    LOG_DELTAS,
    NO_METHOD,
    NO_SERVER,
    USAGE_DELTAS,
    USAGE_MONTHLY_DELTAS,
    USAGE_USER_DELTAS,
    BatchColumns,
    PartKey,
    group,
    log_parts_of,
    month_parts_of,
    month_start,
    server_parts_of,
    usage_key,
    usage_parts_of,
    usage_status,
    window_start,
)

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
POLICY = ValidationPolicy(timedelta(days=90), timedelta(hours=1))
ORGS = [str(uuid.UUID(int=i)) for i in (1, 2)]
SERVERS = [None, NO_SERVER, str(uuid.UUID(int=30)), str(uuid.UUID(int=31))]
SESSIONS = [None, str(uuid.UUID(int=40)), str(uuid.UUID(int=41))]
# Across an hour, a day and a month boundary (October 31st to November 1st), and the end of a year
# is out of the accepted window: the month arithmetic is checked by `month_start` below.
MOMENTS = [
    datetime(2026, 10, 31, 23, 59, 59, 999000, tzinfo=UTC),
    datetime(2026, 11, 1, 0, 0, tzinfo=UTC),
    datetime(2026, 11, 1, 0, 30, 0, 1000, tzinfo=UTC),
    datetime(2026, 11, 23, 10, 15, tzinfo=UTC),
    datetime(2026, 11, 23, 11, 0, tzinfo=UTC),
]

event_fields = st.fixed_dictionaries(
    {
        "organization_id": st.sampled_from(ORGS),
        "started_at": st.sampled_from(MOMENTS),
        "duration_ms": st.one_of(st.integers(0, 300), st.integers(0, 2**31 - 1)),
        "server_id": st.sampled_from(SERVERS),
        "session_id": st.sampled_from(SESSIONS),
        "rpc_method": st.sampled_from([None, "", "tools/call", "ping"]),
        "error": st.booleans(),
        "bytes_in": st.integers(0, 10**6),
        "bytes_out": st.sampled_from([0, 7, 2**40]),
        "model": st.sampled_from([None, "m1", "m2"]),
        "user_id": st.sampled_from([None, "u1", "u2"]),
        "project_id": st.sampled_from([None, str(uuid.UUID(int=50))]),
        "input_tokens": st.sampled_from([None, 0, 5, 2**31 - 1]),
        "status": st.sampled_from([None, "success", "error", "timeout"]),
    }
)


def make_event(fields: dict[str, Any]) -> ValidEvent:
    body = {k: v for k, v in fields.items() if v is not None}
    body["event_id"] = str(uuid.uuid4())
    body["started_at"] = fields["started_at"].isoformat().replace("+00:00", "Z")
    result = validate_event(orjson.dumps(body), NOW, POLICY)
    assert isinstance(result, ValidEvent), result
    return result


batches = st.lists(event_fields, min_size=0, max_size=40).map(lambda fs: [make_event(f) for f in fs])
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _usage_sums(used: Sequence[ValidEvent]) -> np.ndarray:
    return np.array(
        [
            (
                1,
                int(usage_status(e) == "success"),
                int(usage_status(e) == "error"),
                e.input_tokens or 0,
                e.output_tokens or 0,
                e.cache_read_tokens or 0,
                e.cost_cents or 0,
            )
            for e in used
        ],
        dtype=np.int64,
    ).reshape(len(used), 7)


def _dated(keys: Sequence[tuple[Any, ...]]) -> list[PartKey]:
    return [(datetime.fromtimestamp(w, UTC), *rest) for w, *rest in keys]


@SETTINGS
@given(batches)
def test_vectorised_parts_equal_the_per_event_reference(events: list[ValidEvent]) -> None:
    batch = BatchColumns.of(events)
    durations = [e.duration_ms for e in events]

    log_keys = [
        (
            window_start(e.started_at.timestamp(), HOUR_S),
            e.organization_id,
            e.server_id or NO_SERVER,
            e.rpc_method or NO_METHOD,
        )
        for e in events
    ]
    log_sums = np.array([(1, int(e.error), e.bytes_in, e.bytes_out) for e in events], dtype=np.int64)
    expected = group(log_keys, durations, log_sums.reshape(len(events), 4), LOG_DELTAS.alpha)
    assert list(log_parts_of(batch).items()) == list(expected.items())

    used = [e for e in events if e.has_usage]
    latency = [e.duration_ms for e in used]
    sums = _usage_sums(used)
    hour_keys = [(window_start(e.started_at.timestamp(), HOUR_S), *usage_key(e)) for e in used]
    day_keys = [(window_start(e.started_at.timestamp(), DAY_S), *usage_key(e), e.user_id or "") for e in used]
    usage = usage_parts_of(batch)
    assert list(usage.hourly.items()) == list(group(hour_keys, latency, sums, USAGE_DELTAS.alpha).items())
    assert list(usage.daily_users.items()) == list(
        group(day_keys, latency, sums, USAGE_USER_DELTAS.alpha).items()
    )
    hour_users = sorted({(*k, e.user_id) for k, e in zip(hour_keys, used, strict=True) if e.user_id})
    assert usage.hour_users == _dated(hour_users)
    first_hour: dict[tuple[Any, ...], int] = {}
    for hour, *rest in hour_users:
        first_hour.setdefault((window_start(hour, DAY_S), *rest), hour)
    assert list(usage.day_users.items()) == [
        (_dated([k])[0], datetime.fromtimestamp(h, UTC)) for k, h in sorted(first_hour.items())
    ]

    month_keys = [(month_start(e.started_at), *usage_key(e)) for e in used]
    month_sums = np.hstack([sums, np.zeros((len(used), 2), dtype=np.int64)])
    months = month_parts_of(batch)
    expected_months = group(month_keys, latency, month_sums, USAGE_MONTHLY_DELTAS.alpha)
    assert list(months.months.items()) == list(expected_months.items())
    assert months.users == _dated(
        sorted({(*k, e.user_id) for k, e in zip(month_keys, used, strict=True) if e.user_id})
    )
    assert months.days == _dated(
        sorted({(window_start(e.started_at.timestamp(), DAY_S), *usage_key(e)) for e in used})
    )

    named = [e for e in events if e.server_id and e.server_id != NO_SERVER]
    windows = [window_start(e.started_at.timestamp(), 60) for e in named]
    server_keys = [(w, e.organization_id, e.server_id, 60) for w, e in zip(windows, named, strict=True)]
    server_sums = np.array([(1, int(e.error), 0) for e in named], dtype=np.int64).reshape(len(named), 3)
    servers = server_parts_of(batch, 60)
    expected_servers = group(server_keys, [e.duration_ms for e in named], server_sums, 0.008)
    assert list(servers.windows.items()) == list(expected_servers.items())
    sessions = {
        (w, e.organization_id, e.server_id, e.session_id) for w, e in zip(windows, named, strict=True)
    }
    assert servers.sessions == _dated(sorted(k for k in sessions if k[-1]))
