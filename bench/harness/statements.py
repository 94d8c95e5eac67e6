"""Per-statement database time of a drain, from pg_stat_statements.

The embedded stack preloads the module (pipeline/devtools/stack/postgres.py). The harness creates
the extension in the drain's database, resets the counters when the drain's clock starts and
reads them when it ends, for that database only. Where the module is not loaded (a reused stack
without it, no superuser), the result says "unavailable" and why: never a made-up number.

The harness's own polling statements carry the comment `/* bench-harness */` and are reported
with `by: harness`, so they are not mistaken for the pipeline's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg

HARNESS_TAG = "/* bench-harness */"

_READ = f"""
{HARNESS_TAG} SELECT s.query, s.calls, s.rows, s.total_exec_time + s.total_plan_time AS total_ms,
       s.shared_blks_hit, s.shared_blks_read, s.blk_read_time + s.blk_write_time AS io_ms
FROM pg_stat_statements s
JOIN pg_database d ON d.oid = s.dbid
WHERE d.datname = current_database()
"""


async def prepare(conn: asyncpg.Connection) -> str | None:
    """Make the counters readable in this database; None if they are, else the reason why not."""
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await conn.fetchval("SELECT count(*) FROM pg_stat_statements")
    except asyncpg.PostgresError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


async def reset(conn: asyncpg.Connection) -> None:
    """Zero the counters of this database (every user, every query)."""
    dbid = await conn.fetchval(
        f"{HARNESS_TAG} SELECT oid FROM pg_database WHERE datname = current_database()"
    )
    await conn.execute(f"{HARNESS_TAG} SELECT pg_stat_statements_reset(0, $1::oid, 0)", dbid)


async def read(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    return [dict(r) for r in await conn.fetch(_READ)]


def summarize(rows: Sequence[Mapping[str, Any]], events: int, top: int = 12) -> dict[str, Any]:
    """The top statements by total time, each with calls, rows, total ms, µs per row and µs per
    event of the drain, plus the database's total over all statements."""
    ordered = sorted(rows, key=lambda r: float(r["total_ms"]), reverse=True)
    total_ms = sum(float(r["total_ms"]) for r in rows)
    statements = []
    for r in ordered[:top]:
        ms = float(r["total_ms"])
        n_rows = int(r["rows"])
        statements.append(
            {
                "query": _one_line(str(r["query"])),
                "by": "harness" if HARNESS_TAG in str(r["query"]) else "pipeline",
                "calls": int(r["calls"]),
                "rows": n_rows,
                "total_ms": round(ms, 1),
                "share": round(ms / total_ms, 3) if total_ms else None,
                "us_per_row": round(ms * 1000 / n_rows, 2) if n_rows else None,
                "us_per_event": round(ms * 1000 / events, 2) if events else None,
                "io_ms": round(float(r["io_ms"]), 1),
            }
        )
    return {
        "available": True,
        "statements_seen": len(rows),
        "total_ms": round(total_ms, 1),
        "total_us_per_event": round(total_ms * 1000 / events, 2) if events else None,
        "top": statements,
    }


def unavailable(reason: str) -> dict[str, Any]:
    return {"available": False, "reason": reason}


def _one_line(query: str, limit: int = 240) -> str:
    text = " ".join(query.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
