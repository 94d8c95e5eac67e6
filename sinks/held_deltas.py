"""A bounded life for the server_stats deltas held for a server nobody registered.

The merger folds a `server_stats_deltas` row only once its server is registered in `mcp_servers`
to the delta's organization (`SERVER_STATS_DELTAS.fold_when`, docs/aggregates.md §10); until then
the delta waits. A gateway that names servers it never registers would make them wait forever.

`omnilog maintain` drops the held deltas whose window is older than the accepted lateness
(`OMNILOG_MAX_EVENT_AGE_DAYS`) plus a day: the cutoff the merger already uses for the user and
session sets (`sinks.merger.prune_user_sets`). No accepted event can reach such a window any more,
and its session set is already gone, so the window is final everywhere else; a registration that
comes later still folds every younger delta. Each organization's count is returned, logged and
recorded by `maintain`.

Exactly once with the merger: the deletes run under the merger's own slot locks
(`pg_try_advisory_xact_lock(SLOT_LOCK_CLASS, slot)`), so a delta is either folded by a merge pass or
dropped here, never both; slots a merger holds at that moment are left to the next run.
"""

from __future__ import annotations

import logging
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Final

from pipeline.processing.flush import counted_since
from sinks.aggregate_parts import SERVER_STATS_DELTAS, SLOTS
from sinks.db import Connection
from sinks.merger import SLOT_LOCK_CLASS

log = logging.getLogger("omnilog.held_deltas")

# Rows per DELETE: bounds one statement's row locks and WAL burst, as the usage deletes do.
BATCH_ROWS: Final = 5000

_HELD = f"d.window_start < $1 AND d.slot = ANY($2::smallint[]) AND NOT ({SERVER_STATS_DELTAS.fold_when})"
_LOCK_SLOTS: Final = (
    "SELECT coalesce(array_agg(s ORDER BY s), '{}') FROM generate_series(0, $2 - 1) AS s "
    "WHERE pg_try_advisory_xact_lock($1, s)"
)
_DELETE: Final = (
    "DELETE FROM server_stats_deltas WHERE id IN "
    f"(SELECT d.id FROM server_stats_deltas d WHERE {_HELD} LIMIT {BATCH_ROWS}) "
    "RETURNING organization_id::text"
)
_COUNT: Final = (
    f"SELECT d.organization_id::text AS org, count(*) AS n FROM server_stats_deltas d WHERE {_HELD} "
    "GROUP BY 1"
)


def held_delta_cutoff(max_event_age_days: int, now: datetime | None = None) -> datetime:
    """The first window start still kept: the oldest started_at a flush accepts
    (pipeline/processing/flush.py `counted_since`); no accepted event can reach an older window."""
    return counted_since(now or datetime.now(UTC), timedelta(days=max_event_age_days))


async def expire_held_server_deltas(
    conn: Connection, before: datetime, *, dry_run: bool = False
) -> dict[str, int]:
    """Delete (with `dry_run`, count) the held server_stats deltas of windows before `before`;
    return how many per organization. Each batch is its own transaction under the slot locks."""
    dropped: Counter[str] = Counter()
    while True:
        async with conn.transaction():
            slots = list(await conn.fetchval(_LOCK_SLOTS, SLOT_LOCK_CLASS, SLOTS))
            if not slots:
                break
            if dry_run:
                dropped.update({r["org"]: r["n"] for r in await conn.fetch(_COUNT, before, slots)})
                break
            rows = await conn.fetch(_DELETE, before, slots)
        dropped.update(r["organization_id"] for r in rows)
        if len(rows) < BATCH_ROWS:
            break
    if not dry_run:
        for organization_id, count in sorted(dropped.items()):
            log.warning(
                "held server_stats deltas dropped: their server was never registered to the "
                "organization and their windows are past the accepted lateness",
                extra={"organization_id": organization_id, "deltas": count, "before": before.isoformat()},
            )
    return dict(dropped)
