"""The TimescaleDB branch of migration 0008, run on plain PostgreSQL: TimescaleDB refuses to
compress a table with row security, so a compressed hypertable gets a filtering view in schema
omnilog_tenant instead of a policy, and the API role reads the view, never the table.

TimescaleDB is not installable here; the branch only consults `timescaledb_information.hypertables`,
so a stand-in view of that catalog (log_index and usage_events compressed, as sinks/partitions.py
configures them) makes the real migration take it.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import asyncpg
import pytest

from pipeline.api.tenancy import SEARCH_PATH
from sinks.migrate import migrate
from sinks.partitions import ensure_day_partitions

pytestmark = pytest.mark.asyncio(loop_scope="session")

_FAKE_CATALOG = """
CREATE SCHEMA timescaledb_information;
CREATE VIEW timescaledb_information.hypertables AS
SELECT 'public'::name AS hypertable_schema, t.name::name AS hypertable_name, true AS compression_enabled
FROM (VALUES ('log_index'), ('usage_events')) AS t(name)
"""


async def test_compressed_hypertables_are_read_through_filtering_views(fresh_database_url: str) -> None:
    owner = await asyncpg.connect(fresh_database_url)
    login = f"api_ts_{uuid.uuid4().hex[:8]}"
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    try:
        await owner.execute(_FAKE_CATALOG)
        await migrate(fresh_database_url)
        now = datetime.now(UTC)
        await ensure_day_partitions(owner, "log_index", [now.date()])
        for org in (a, b, a):
            await owner.execute(
                "INSERT INTO log_index (id, organization_id, started_at, storage_provider, object_uri, "
                "byte_length) VALUES ($1, $2::uuid, $3, 's3', 's3://b/k', 1)",
                uuid.uuid4(),
                org,
                now,
            )
        tables = {
            r["relname"]: r
            for r in await owner.fetch(
                "SELECT c.relname, n.nspname, c.relrowsecurity, c.reloptions, "
                "has_table_privilege('omnilog_api', c.oid, 'SELECT') AS api_reads "
                "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relname IN ('log_index', 'usage_events', 'log_aggregates') AND n.nspname IN "
                "('public', 'omnilog_tenant') ORDER BY n.nspname"
            )
            if r["nspname"] == "public"
        }
        assert not tables["log_index"]["relrowsecurity"], "a compressed table cannot have row security"
        assert not tables["log_index"]["api_reads"], "the API role reads the view, not the table"
        assert tables["log_aggregates"]["relrowsecurity"], "uncompressed tables keep their policy"
        views = {
            r["relname"]: r["reloptions"]
            for r in await owner.fetch(
                "SELECT c.relname, c.reloptions FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'omnilog_tenant' AND c.relkind = 'v'"
            )
        }
        assert set(views) == {"log_index", "usage_events"}
        assert "security_barrier=true" in views["log_index"]

        await owner.execute(f'CREATE ROLE "{login}" LOGIN IN ROLE omnilog_api')
        api_url = fresh_database_url.replace("omnilog@", f"{login}@", 1)
        api = await asyncpg.connect(api_url, server_settings={"search_path": SEARCH_PATH})
        try:
            assert await api.fetchval("SELECT count(*) FROM log_index") == 0, "no setting, no rows"
            for org, expected in ((a, 2), (b, 1)):
                async with api.transaction(readonly=True):
                    await api.execute("SELECT set_config('app.current_org', $1, true)", org)
                    orgs = await api.fetch("SELECT organization_id::text AS o FROM log_index")
                    assert [r["o"] for r in orgs] == [org] * expected
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await api.fetch("SELECT * FROM public.log_index")
        finally:
            await api.close()
    finally:
        # The login role holds no privilege of its own (only its membership), so it drops at once.
        await owner.execute(f'DROP ROLE IF EXISTS "{login}"')
        await owner.close()
