-- Organization API keys and row-level security for the read API (docs/security.md).
--
-- The API connects as a role that owns nothing and cannot bypass row security (omnilog_api,
-- NOLOGIN: a deployment creates its login user IN ROLE omnilog_api). Each request sets
-- app.current_org, transaction-local, from the authenticated key; every tenant table's policy
-- compares its organization column with that setting. The ingest worker and `omnilog maintain`
-- keep connecting as the tables' owner, which row security does not apply to (it is not FORCEd).
--
-- An unset or empty app.current_org matches no row (fail closed): the policies read it with
-- missing_ok and NULLIF, so a connection that never set it sees nothing instead of an error.

-- Keys ---------------------------------------------------------------------------------------
-- Only the SHA-256 of a key is stored, with a short random prefix (part of the key itself) to
-- find its row; the key is printed once by `omnilog keys create`. A plain hash is enough: the key
-- is 256 random bits, so there is nothing to brute-force that a slow hash would protect.
-- No foreign key to organizations, as for log_index: events (and so tenants) may name
-- organizations that were never registered in Postgres.
CREATE TABLE api_keys (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id UUID NOT NULL,
    name VARCHAR(255) NOT NULL DEFAULT '',
    prefix VARCHAR(32) NOT NULL UNIQUE,
    key_hash BYTEA NOT NULL CHECK (octet_length(key_hash) = 32),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_used_at TIMESTAMPTZ,
    revoked_at TIMESTAMPTZ
);
CREATE INDEX idx_api_keys_org ON api_keys (organization_id, created_at);

-- The API role ----------------------------------------------------------------------------------
-- Roles belong to the cluster, not the database: created once, shared by every database of the
-- server (each database grants it its own privileges below).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'omnilog_api') THEN
        CREATE ROLE omnilog_api NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
    END IF;
EXCEPTION
    -- Another database of the same server migrating at the same moment created it first.
    WHEN duplicate_object OR unique_violation THEN NULL;
END
$$;

-- Authentication runs before the organization is known, so it cannot go through row security:
-- two SECURITY DEFINER functions (owned by the tables' owner) are the API role's only way to
-- the keys. The first returns the candidate row of a prefix (the caller compares hashes in
-- constant time); the second records a use, at most once a minute per key, so a busy key does
-- not turn every read into a write.
CREATE FUNCTION api_key_lookup(key_prefix TEXT)
RETURNS TABLE (key_id UUID, organization_id UUID, key_hash BYTEA)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
    SELECT id, organization_id, key_hash FROM public.api_keys
    WHERE prefix = key_prefix AND revoked_at IS NULL
$$;

CREATE FUNCTION api_key_touch(used_key UUID)
RETURNS VOID
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
    UPDATE public.api_keys SET last_used_at = now()
    WHERE id = used_key AND revoked_at IS NULL
      AND (last_used_at IS NULL OR last_used_at < now() - INTERVAL '1 minute')
$$;

REVOKE ALL ON FUNCTION api_key_lookup(TEXT) FROM PUBLIC;
REVOKE ALL ON FUNCTION api_key_touch(UUID) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION api_key_lookup(TEXT) TO omnilog_api;
GRANT EXECUTE ON FUNCTION api_key_touch(UUID) TO omnilog_api;

-- Row security on every tenant table ------------------------------------------------------------
-- The seed's org_isolation policies are replaced (theirs fail on an unset setting and cover only
-- the seed tables). Tables are listed with the predicate that ties a row to its organization;
-- health_checks and server_stats have no organization column and belong to the organization of
-- their server (the subquery on mcp_servers is itself filtered by mcp_servers' policy).
--
-- TimescaleDB refuses to compress a table with row security. A compressed hypertable keeps its
-- compression and gets no policy; instead a security-barrier view of the same name in schema
-- omnilog_tenant filters it with the same predicate, and the API puts omnilog_tenant first on
-- its search_path, so the same SQL reads the filtered view there and the protected table here.
-- The API role is granted the view, never the table.
CREATE SCHEMA IF NOT EXISTS omnilog_tenant;

DO $$
DECLARE
    current_org CONSTANT TEXT := 'NULLIF(current_setting(''app.current_org'', true), '''')';
    tenant RECORD;
    compressed BOOLEAN;
BEGIN
    FOR tenant IN
        SELECT * FROM (VALUES
            ('organizations', 'id = ' || current_org || '::uuid'),
            ('mcp_servers', 'organization_id = ' || current_org || '::uuid'),
            ('mcp_sessions', 'organization_id = ' || current_org || '::uuid'),
            ('virtual_servers', 'organization_id = ' || current_org || '::uuid'),
            ('health_checks', 'server_id IN (SELECT id FROM mcp_servers)'),
            ('server_stats', 'server_id IN (SELECT id FROM mcp_servers)'),
            ('log_index', 'organization_id = ' || current_org || '::uuid'),
            ('audit_logs', 'organization_id = ' || current_org || '::uuid'),
            ('rate_limits', 'organization_id = ' || current_org || '::uuid'),
            ('rate_limit_usage', 'organization_id = ' || current_org || '::uuid'),
            ('log_aggregates', 'organization_id = ' || current_org || '::uuid'),
            ('log_aggregate_parts', 'organization_id = ' || current_org || '::uuid'),
            ('usage_events', 'org_id = ' || current_org || '::uuid'),
            ('mcp_usage', 'org_id = ' || current_org || '::uuid'),
            ('usage_hourly', 'org_id = ' || current_org || '::uuid'),
            ('usage_daily', 'org_id = ' || current_org || '::uuid'),
            ('usage_parts', 'org_id = ' || current_org || '::uuid'),
            ('usage_user_parts', 'org_id = ' || current_org || '::uuid'),
            ('usage_hour_users', 'org_id = ' || current_org || '::uuid'),
            -- The insert-only deltas of migration 0007 (the parts above are gone after it).
            ('log_aggregate_deltas', 'organization_id = ' || current_org || '::uuid'),
            ('usage_deltas', 'org_id = ' || current_org || '::uuid'),
            ('usage_user_deltas', 'org_id = ' || current_org || '::uuid'),
            ('usage_day_users', 'org_id = ' || current_org || '::uuid'),
            ('ingest_objects', 'organization_id = ' || current_org || '::uuid'),
            ('aggregate_isolated_keys', 'key_values[1] = ' || current_org),
            ('api_keys', 'organization_id = ' || current_org || '::uuid')
        ) AS t(name, predicate)
    LOOP
        -- A table a later redesign dropped or renamed is skipped; the test that every table with
        -- an organization column has a policy catches what is left uncovered.
        CONTINUE WHEN to_regclass('public.' || tenant.name) IS NULL;
        compressed := false;
        IF to_regclass('timescaledb_information.hypertables') IS NOT NULL THEN
            EXECUTE 'SELECT EXISTS (SELECT 1 FROM timescaledb_information.hypertables '
                    'WHERE hypertable_schema = ''public'' AND hypertable_name = $1 AND compression_enabled)'
                INTO compressed USING tenant.name;
        END IF;
        EXECUTE format('DROP POLICY IF EXISTS org_isolation ON public.%I', tenant.name);
        IF compressed THEN
            EXECUTE format(
                'CREATE OR REPLACE VIEW omnilog_tenant.%I WITH (security_barrier) AS '
                'SELECT * FROM public.%I WHERE %s', tenant.name, tenant.name, tenant.predicate);
        ELSE
            EXECUTE format('ALTER TABLE public.%I ENABLE ROW LEVEL SECURITY', tenant.name);
            EXECUTE format('CREATE POLICY org_isolation ON public.%I USING (%s)', tenant.name, tenant.predicate);
        END IF;
    END LOOP;
END
$$;

-- The seed's views read as their caller (PostgreSQL 15), so the callers' row security applies
-- to the tables under them; as the owner's views they would read every organization.
ALTER VIEW active_sessions SET (security_invoker = true);
ALTER VIEW server_health_summary SET (security_invoker = true);

-- What the API may read -------------------------------------------------------------------------
-- Only the read surface, and SELECT only. Partitions (created later by the worker) get no grant:
-- the API role reads them through their parent, where row security applies.
GRANT USAGE ON SCHEMA public TO omnilog_api;
GRANT USAGE ON SCHEMA omnilog_tenant TO omnilog_api;
DO $$
DECLARE
    readable TEXT;
BEGIN
    FOREACH readable IN ARRAY ARRAY['log_index', 'log_aggregates', 'usage_hourly', 'usage_daily'] LOOP
        IF to_regclass('omnilog_tenant.' || readable) IS NOT NULL THEN
            EXECUTE format('GRANT SELECT ON omnilog_tenant.%I TO omnilog_api', readable);
        ELSIF to_regclass('public.' || readable) IS NOT NULL THEN
            EXECUTE format('GRANT SELECT ON public.%I TO omnilog_api', readable);
        END IF;
    END LOOP;
END
$$;
