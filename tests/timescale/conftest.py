"""The TimescaleDB tier: one PGlite-with-TimescaleDB server per pytest session (docs/schema.md,
"The TimescaleDB test tier").

- `timescale_server` (session): `node tests/timescale/server/server.mjs <port>` on a free loopback
  port, waited for until it answers a query, stopped (SIGTERM, then kill) at the end. Installed by
  `.ci/bootstrap-timescale`; missing, the tier fails saying so (it is never skipped silently).
- `timescale_url` (function): the server's URL with an empty `public` schema (what the previous
  test created is dropped) and the timescaledb extension installed, so the project's own probe
  picks TimescaleDB. The server has ONE database and serves one connection at a time: tests
  open one connection at a time and close it (a second one would wait in the server's queue).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

SERVER_DIR = Path(__file__).parent / "server"
START_TIMEOUT_S = 60.0

# Everything a previous test created in public, except the extensions' own objects. TimescaleDB
# cannot be dropped and created again in one backend ("already been loaded with another
# version"), and PGlite has a single backend, so the schema is emptied object by object instead.
_EMPTY_PUBLIC = r"""
DO $$
DECLARE statement text;
BEGIN
    -- Each list is built in full before the first drop: a cascade drops later entries too, hence
    -- IF EXISTS, and names are taken from the catalogs now, not rendered from OIDs after the drop.
    FOREACH statement IN ARRAY ARRAY(
        SELECT format('DROP MATERIALIZED VIEW IF EXISTS %I.%I CASCADE', view_schema, view_name)
        FROM timescaledb_information.continuous_aggregates
    ) || ARRAY(
        SELECT format('DROP %s IF EXISTS public.%I CASCADE',
                      CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW' ELSE 'TABLE' END,
                      c.relname)
        FROM pg_class c
        WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm')
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                          AND d.objid = c.oid AND d.deptype = 'e')
    ) || ARRAY(
        SELECT format('DROP FUNCTION IF EXISTS public.%I(%s) CASCADE', p.proname,
                      pg_get_function_identity_arguments(p.oid))
        FROM pg_proc p
        WHERE p.pronamespace = 'public'::regnamespace
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                          AND d.objid = p.oid AND d.deptype = 'e')
    ) || ARRAY(
        SELECT format('DROP TYPE IF EXISTS public.%I CASCADE', t.typname)
        FROM pg_type t
        WHERE t.typnamespace = 'public'::regnamespace AND t.typtype IN ('e', 'd')
          AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_type'::regclass
                          AND d.objid = t.oid AND d.deptype = 'e')
    ) LOOP
        EXECUTE statement;
    END LOOP;
END $$
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _url(port: int) -> str:
    # sslmode=disable: the server answers an SSL request with garbage instead of 'N'.
    return f"postgresql://postgres:postgres@127.0.0.1:{port}/postgres?sslmode=disable"


async def _answers(url: str) -> bool:
    try:
        conn = await asyncio.wait_for(asyncpg.connect(url), 5)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    try:
        return bool(await conn.fetchval("SELECT 1") == 1)
    finally:
        await conn.close()


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture(scope="session")
def timescale_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of the session's PGlite-with-TimescaleDB server."""
    node = shutil.which("node")
    if node is None or not (SERVER_DIR / "node_modules" / "@unni-craftsman" / "pglite").is_dir():
        pytest.fail("the TimescaleDB tier is not installed: run `bash .ci/bootstrap-timescale`")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("timescale") / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [node, "server.mjs", str(port)],
            cwd=SERVER_DIR,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "NODE_OPTIONS": ""},
        )
    try:
        url = _url(port)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not asyncio.run(_answers(url)):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the TimescaleDB test server did not start:\n{log_path.read_text()}")
            time.sleep(0.2)
        yield url
        if process.poll() is not None:
            # It died during the session (COPY crashes it, for one): say so with its log.
            pytest.fail(f"the TimescaleDB test server died:\n{log_path.read_text()}")
    finally:
        _stop(process)


async def _reset(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        await conn.execute(_EMPTY_PUBLIC)
    finally:
        await conn.close()


@pytest.fixture
async def timescale_url(timescale_server: str) -> str:
    await _reset(timescale_server)
    return timescale_server
