-- The Omnimesh gateway schema (seed 000) plus what Omnilog adds to log_index.
-- Every deviation from the seed is listed, with its reason, in docs/schema.md.
--
-- A comment of the form /* omnilog:partitioned <table> */ marks where a time-partitioned table's
-- partitioning goes. The runner (sinks/migrate.py) replaces it with PARTITION BY RANGE (<column>)
-- on plain PostgreSQL, or removes it and turns the table into a TimescaleDB hypertable; the
-- table's time column and chunk size are registered in sinks/partitions.py (TIME_PARTITIONED).

CREATE EXTENSION IF NOT EXISTS "uuid-ossp";
CREATE EXTENSION IF NOT EXISTS "pgcrypto";
CREATE EXTENSION IF NOT EXISTS "citext";

-- Enums -------------------------------------------------------------------------------------
CREATE TYPE protocol_enum AS ENUM ('stdio', 'http', 'https', 'websocket', 'sse');
CREATE TYPE server_status_enum AS ENUM ('active', 'inactive', 'unhealthy', 'maintenance');
CREATE TYPE session_status_enum AS ENUM ('initializing', 'active', 'closed', 'error');
CREATE TYPE proc_status_enum AS ENUM ('starting', 'running', 'stopped', 'error');
CREATE TYPE health_status_enum AS ENUM ('healthy', 'unhealthy', 'timeout', 'error');
CREATE TYPE storage_provider_enum AS ENUM ('s3', 'gcs', 'azure', 'cloudwatch', 'loki', 'elastic', 'clickhouse');
CREATE TYPE log_level_enum AS ENUM ('trace', 'debug', 'info', 'warn', 'error', 'fatal');
CREATE TYPE plan_type_enum AS ENUM ('free', 'pro', 'enterprise');
CREATE TYPE rate_limit_scope_enum AS ENUM ('global', 'server', 'user', 'ip');
CREATE TYPE aggregation_window_enum AS ENUM ('hourly', 'daily');
CREATE TYPE adapter_type_enum AS ENUM ('REST', 'GraphQL', 'gRPC', 'SOAP');

CREATE OR REPLACE FUNCTION set_updated_at()
RETURNS trigger AS $$
BEGIN NEW.updated_at = NOW(); RETURN NEW; END; $$ LANGUAGE plpgsql;

-- Core tables -------------------------------------------------------------------------------
CREATE TABLE organizations (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    name VARCHAR(255) NOT NULL,
    slug CITEXT UNIQUE NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    updated_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    is_active BOOLEAN DEFAULT true,
    plan_type plan_type_enum DEFAULT 'free',
    max_servers INTEGER DEFAULT 10,
    max_sessions INTEGER DEFAULT 100,
    log_retention_days INTEGER DEFAULT 7,
    CONSTRAINT valid_log_retention CHECK (log_retention_days > 0 AND log_retention_days <= 3650)
);
CREATE TRIGGER organizations_updated_at
    BEFORE UPDATE ON organizations
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();

CREATE TABLE mcp_servers (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id UUID NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    name VARCHAR(255) NOT NULL,
    description TEXT,
    protocol protocol_enum NOT NULL,
    url VARCHAR(500),
    command VARCHAR(255),
    args TEXT[],
    environment TEXT[],  -- secret references ('vault:...'), never raw values
    working_dir VARCHAR(500),
    version VARCHAR(50),
    weight INTEGER DEFAULT 100,
    timeout_seconds INTEGER DEFAULT 300,
    max_retries INTEGER DEFAULT 3,
    status server_status_enum DEFAULT 'active',
    health_check_url VARCHAR(500),
    is_active BOOLEAN DEFAULT true,
    metadata JSONB DEFAULT '{}',
    tags TEXT[],
    created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    updated_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    UNIQUE (organization_id, name),
    CONSTRAINT valid_timeout CHECK (timeout_seconds > 0 AND timeout_seconds <= 3600),
    CONSTRAINT valid_weight CHECK (weight >= 0 AND weight <= 1000)
);
CREATE TRIGGER mcp_servers_updated_at
    BEFORE UPDATE ON mcp_servers
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();

CREATE TABLE mcp_sessions (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id UUID NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    server_id UUID NOT NULL REFERENCES mcp_servers(id) ON DELETE CASCADE,
    status session_status_enum DEFAULT 'initializing',
    protocol protocol_enum NOT NULL,
    client_id UUID,
    connection_id UUID,
    process_pid INTEGER,
    process_status proc_status_enum,
    process_exit_code INTEGER,
    process_error TEXT,
    started_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    last_activity TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    ended_at TIMESTAMP WITH TIME ZONE,
    metadata JSONB DEFAULT '{}',
    user_id VARCHAR(255) DEFAULT 'default-user',
    created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    updated_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    CONSTRAINT valid_session_timing CHECK (ended_at IS NULL OR ended_at >= started_at)
);
CREATE TRIGGER mcp_sessions_updated_at
    BEFORE UPDATE ON mcp_sessions
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();

CREATE TABLE virtual_servers (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id UUID NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    name VARCHAR(255) NOT NULL,
    description TEXT,
    adapter_type adapter_type_enum NOT NULL DEFAULT 'REST',
    tools JSONB NOT NULL DEFAULT '[]',
    is_active BOOLEAN DEFAULT true,
    metadata JSONB DEFAULT '{}',
    created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    updated_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    UNIQUE (organization_id, name),
    CONSTRAINT valid_tools_format CHECK (jsonb_typeof(tools) = 'array')
);
CREATE TRIGGER virtual_servers_updated_at
    BEFORE UPDATE ON virtual_servers
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();

-- Health and monitoring ---------------------------------------------------------------------
-- Partitioned by month on checked_at (the seed's own suggestion); partitions are created ahead
-- and dropped after 30 days by sinks/partitions.py, which replaces the seed's cleanup DELETE.
CREATE TABLE health_checks (
    id UUID NOT NULL DEFAULT gen_random_uuid(),
    server_id UUID NOT NULL REFERENCES mcp_servers(id) ON DELETE CASCADE,
    status health_status_enum NOT NULL,
    response_time_ms INTEGER,
    response_body TEXT,
    error_message TEXT,
    checked_at TIMESTAMP WITH TIME ZONE NOT NULL DEFAULT NOW(),
    PRIMARY KEY (id, checked_at)
) /* omnilog:partitioned health_checks */;
CREATE INDEX idx_health_checks_server_time ON health_checks (server_id, checked_at DESC);

CREATE TABLE server_stats (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    server_id UUID NOT NULL REFERENCES mcp_servers(id) ON DELETE CASCADE,
    total_requests BIGINT DEFAULT 0,
    success_requests BIGINT DEFAULT 0,
    error_requests BIGINT DEFAULT 0,
    active_sessions INTEGER DEFAULT 0,
    avg_response_time_ms FLOAT DEFAULT 0,
    min_response_time_ms INTEGER DEFAULT 0,
    max_response_time_ms INTEGER DEFAULT 0,
    window_start TIMESTAMP WITH TIME ZONE NOT NULL,
    window_end TIMESTAMP WITH TIME ZONE NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    updated_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    UNIQUE (server_id, window_start),
    CONSTRAINT valid_window_order CHECK (window_end > window_start)
);
CREATE TRIGGER server_stats_updated_at
    BEFORE UPDATE ON server_stats
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();

-- Logging and audit -------------------------------------------------------------------------
-- id = the event's event_id (CONTRACT §4). Partitioned by day on started_at, so the primary key
-- has to include started_at: a re-sent event carries the same started_at and is still caught by
-- ON CONFLICT on (id, started_at). No foreign keys: events may name organizations, servers and
-- sessions that were never registered in Postgres, and the hot path cannot afford the lookups.
CREATE TABLE log_index (
    id UUID NOT NULL DEFAULT gen_random_uuid(),
    organization_id UUID NOT NULL,
    server_id UUID,
    session_id UUID,
    rpc_method VARCHAR(100),
    level log_level_enum NOT NULL DEFAULT 'info',
    started_at TIMESTAMP WITH TIME ZONE NOT NULL,
    duration_ms INTEGER,
    status_code INTEGER,
    error_flag BOOLEAN DEFAULT false,
    storage_provider storage_provider_enum NOT NULL,
    object_uri TEXT NOT NULL,
    byte_offset BIGINT,
    byte_length INTEGER NOT NULL,
    user_id VARCHAR(255) DEFAULT 'default-user',
    remote_ip INET,
    client_id UUID,
    connection_id UUID,
    redaction_version INTEGER,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    PRIMARY KEY (id, started_at)
) /* omnilog:partitioned log_index */;
-- Secondary indexes: chosen by measured insert cost against the seed's query patterns
-- (docs/schema.md, "log_index indexes"; bench/index_cost.py).
-- Kept: organization + time (the listing every tenant query starts from; level and method
-- filters ride on it), server + time, session, errors and client_id correlation (as the seed).
CREATE INDEX idx_log_index_org_time ON log_index (organization_id, started_at DESC);
CREATE INDEX idx_log_index_server_time ON log_index (server_id, started_at DESC) WHERE server_id IS NOT NULL;
CREATE INDEX idx_log_index_session ON log_index (session_id, started_at DESC) WHERE session_id IS NOT NULL;
CREATE INDEX idx_log_index_errors ON log_index (organization_id, started_at DESC) WHERE error_flag = true;
CREATE INDEX idx_log_index_client_id ON log_index (client_id) WHERE client_id IS NOT NULL;
-- Not in the seed: time-range scans without an organization filter, at no measurable insert cost.
CREATE INDEX idx_log_index_started_brin ON log_index USING brin (started_at);
-- Dropped (each cost 15-23 % of insert throughput): idx_log_index_method_time,
-- idx_log_index_org_level_time, idx_log_index_org_method_time; idx_log_index_cleanup is
-- replaced by dropping day partitions.

CREATE TABLE audit_logs (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id UUID NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    action VARCHAR(100) NOT NULL,
    resource_type VARCHAR(50) NOT NULL,
    resource_id UUID,
    actor_id VARCHAR(255) DEFAULT 'system',
    actor_ip INET,
    old_values JSONB,
    new_values JSONB,
    metadata JSONB DEFAULT '{}',
    created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW()
);
CREATE INDEX idx_audit_logs_org_time ON audit_logs (organization_id, created_at DESC);
CREATE INDEX idx_audit_logs_resource ON audit_logs (resource_type, resource_id, created_at DESC);

CREATE TABLE rate_limits (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id UUID NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    scope rate_limit_scope_enum NOT NULL,
    scope_id VARCHAR(255),
    requests_per_minute INTEGER NOT NULL,
    requests_per_hour INTEGER,
    requests_per_day INTEGER,
    burst_limit INTEGER,
    is_active BOOLEAN DEFAULT true,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    updated_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    UNIQUE (organization_id, scope, scope_id),
    CONSTRAINT valid_rate_limits CHECK (
        requests_per_minute > 0 AND
        (requests_per_hour IS NULL OR requests_per_hour >= requests_per_minute) AND
        (requests_per_day IS NULL OR requests_per_day >= COALESCE(requests_per_hour, requests_per_minute))
    )
);
CREATE TRIGGER rate_limits_updated_at
    BEFORE UPDATE ON rate_limits
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();

CREATE TABLE rate_limit_usage (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id UUID NOT NULL REFERENCES organizations(id) ON DELETE CASCADE,
    rate_limit_id UUID NOT NULL REFERENCES rate_limits(id) ON DELETE CASCADE,
    identifier VARCHAR(255) NOT NULL,
    window_start TIMESTAMP WITH TIME ZONE NOT NULL,
    request_count INTEGER DEFAULT 0,
    expires_at TIMESTAMP WITH TIME ZONE NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    updated_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    UNIQUE (rate_limit_id, identifier, window_start)
);
CREATE TRIGGER rate_limit_usage_updated_at
    BEFORE UPDATE ON rate_limit_usage
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();

-- Aggregates --------------------------------------------------------------------------------
-- NULL server_id / rpc_method mean "all"; UNIQUE NULLS NOT DISTINCT makes those rows upsertable.
-- No foreign keys: aggregates are written from events, which may name unregistered orgs/servers.
CREATE TABLE log_aggregates (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id UUID NOT NULL,
    server_id UUID,
    window_type aggregation_window_enum NOT NULL,
    window_start TIMESTAMP WITH TIME ZONE NOT NULL,
    rpc_method VARCHAR(100),
    total_requests BIGINT DEFAULT 0,
    success_requests BIGINT DEFAULT 0,
    error_requests BIGINT DEFAULT 0,
    p50_duration_ms INTEGER,
    p95_duration_ms INTEGER,
    p99_duration_ms INTEGER,
    avg_duration_ms FLOAT,
    total_bytes_in BIGINT DEFAULT 0,
    total_bytes_out BIGINT DEFAULT 0,
    duration_sketch BYTEA,  -- mergeable quantile sketch (pipeline/sketch.py encoding)
    created_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    updated_at TIMESTAMP WITH TIME ZONE DEFAULT NOW(),
    CONSTRAINT log_aggregates_key UNIQUE NULLS NOT DISTINCT
        (organization_id, server_id, rpc_method, window_type, window_start)
);
CREATE TRIGGER log_aggregates_updated_at
    BEFORE UPDATE ON log_aggregates
    FOR EACH ROW EXECUTE FUNCTION set_updated_at();
CREATE INDEX idx_log_aggregates_org_window ON log_aggregates (organization_id, window_type, window_start DESC);
CREATE INDEX idx_log_aggregates_server_window ON log_aggregates (server_id, window_type, window_start DESC)
    WHERE server_id IS NOT NULL;

-- Indexes of the seed's "Indexes" section (log_index's own are above) -----------------------
CREATE INDEX idx_mcp_servers_org_active ON mcp_servers (organization_id, is_active);
CREATE INDEX idx_mcp_servers_org_status ON mcp_servers (organization_id, status);
CREATE INDEX idx_mcp_sessions_server_status ON mcp_sessions (server_id, status);
CREATE INDEX idx_mcp_sessions_org_active ON mcp_sessions (organization_id, status) WHERE status = 'active';
CREATE INDEX idx_virtual_servers_org_active ON virtual_servers (organization_id, is_active);
CREATE INDEX idx_virtual_servers_adapter_type ON virtual_servers (adapter_type);
CREATE INDEX idx_virtual_servers_name ON virtual_servers (organization_id, name);
-- The seed's cleanup indexes use NOW() in their predicate, which PostgreSQL rejects ("functions
-- in index predicate must be marked IMMUTABLE"). health_checks and log_index are cleaned by
-- dropping partitions, so they need none; rate_limit_usage gets a plain index on expires_at,
-- which serves the seed's "DELETE ... WHERE expires_at < NOW()".
CREATE INDEX idx_rate_limit_usage_cleanup ON rate_limit_usage (expires_at);
CREATE INDEX idx_log_aggregates_dashboard ON log_aggregates (organization_id, window_type, window_start DESC)
    WHERE rpc_method IS NULL;
CREATE INDEX idx_mcp_sessions_client_id ON mcp_sessions (client_id) WHERE client_id IS NOT NULL;

-- Virtual server support in audit logs (the seed's ALTER) -----------------------------------
ALTER TABLE audit_logs ADD COLUMN virtual_server_id UUID REFERENCES virtual_servers(id) ON DELETE SET NULL;
CREATE INDEX idx_audit_logs_virtual_server ON audit_logs (virtual_server_id, created_at DESC)
    WHERE virtual_server_id IS NOT NULL;

-- Row level security: policies exist, RLS stays disabled (the seed's OSS mode). A commercial
-- deployment enables it per table with ALTER TABLE ... ENABLE ROW LEVEL SECURITY and sets
-- app.current_org per connection.
CREATE POLICY org_isolation ON organizations USING (id = current_setting('app.current_org')::uuid);
CREATE POLICY org_isolation ON mcp_servers USING (organization_id = current_setting('app.current_org')::uuid);
CREATE POLICY org_isolation ON mcp_sessions USING (organization_id = current_setting('app.current_org')::uuid);
CREATE POLICY org_isolation ON virtual_servers USING (organization_id = current_setting('app.current_org')::uuid);
CREATE POLICY org_isolation ON log_index USING (organization_id = current_setting('app.current_org')::uuid);
CREATE POLICY org_isolation ON audit_logs USING (organization_id = current_setting('app.current_org')::uuid);
CREATE POLICY org_isolation ON rate_limits USING (organization_id = current_setting('app.current_org')::uuid);
CREATE POLICY org_isolation ON rate_limit_usage USING (organization_id = current_setting('app.current_org')::uuid);
CREATE POLICY org_isolation ON log_aggregates USING (organization_id = current_setting('app.current_org')::uuid);

-- Views -------------------------------------------------------------------------------------
CREATE VIEW active_sessions AS
SELECT
    s.id,
    s.organization_id,
    s.server_id,
    srv.name AS server_name,
    srv.protocol,
    s.status,
    s.started_at,
    s.last_activity,
    EXTRACT(EPOCH FROM (NOW() - s.started_at)) AS duration_seconds
FROM mcp_sessions s
JOIN mcp_servers srv ON s.server_id = srv.id
WHERE s.status = 'active';

CREATE VIEW server_health_summary AS
SELECT
    s.id,
    s.organization_id,
    s.name,
    s.status,
    hc.status AS last_health_status,
    hc.response_time_ms AS last_response_time,
    hc.checked_at AS last_health_check,
    COALESCE(ss.active_sessions, 0) AS active_sessions,
    COALESCE(ss.total_requests, 0) AS total_requests
FROM mcp_servers s
LEFT JOIN LATERAL (
    SELECT status, response_time_ms, checked_at
    FROM health_checks
    WHERE server_id = s.id
    ORDER BY checked_at DESC
    LIMIT 1
) hc ON true
LEFT JOIN LATERAL (
    SELECT active_sessions, total_requests
    FROM server_stats
    WHERE server_id = s.id
    ORDER BY window_end DESC
    LIMIT 1
) ss ON true;

-- Default data (single-tenant mode) ---------------------------------------------------------
INSERT INTO organizations (id, name, slug, plan_type, max_servers, max_sessions, log_retention_days)
VALUES ('00000000-0000-0000-0000-000000000000', 'Default Organization', 'default-org', 'enterprise',
        1000, 10000, 365);

INSERT INTO rate_limits (organization_id, scope, requests_per_minute, requests_per_hour, requests_per_day)
VALUES ('00000000-0000-0000-0000-000000000000', 'global', 1000, 10000, 100000);
