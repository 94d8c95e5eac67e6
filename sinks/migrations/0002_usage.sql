-- MindWeave usage tables (seed 001, sections 4.1-4.3): raw usage_events and mcp_usage, and the
-- hourly and daily usage rollups as plain tables written by the aggregates merger.
-- Deviations from the seed (docs/schema.md): no foreign keys to MindWeave's users / projects /
-- api_keys (Omnilog has none of those tables), user_id is VARCHAR(255) as in the event contract
-- (CONTRACT §1) instead of UUID, and the columns the contract makes optional are nullable.

-- One row per indexed event that carries usage fields; written in the same transaction as the
-- event's log_index row and only for events seen for the first time, so no unique key is needed.
CREATE TABLE usage_events (
    time TIMESTAMPTZ NOT NULL,
    org_id UUID NOT NULL,
    project_id UUID,
    user_id VARCHAR(255),
    api_key_id UUID,
    request_id UUID NOT NULL,  -- the event's event_id (= log_index.id)
    event_type VARCHAR(20)
        CHECK (event_type IN ('api_call', 'mcp_tool', 'streaming')),
    model VARCHAR(50),
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    cache_read_tokens INTEGER NOT NULL DEFAULT 0,
    cache_write_tokens INTEGER NOT NULL DEFAULT 0,
    cost_cents INTEGER NOT NULL DEFAULT 0,
    latency_ms INTEGER,
    time_to_first_token_ms INTEGER,
    mcp_server_id UUID,
    mcp_tool_name VARCHAR(255),
    status VARCHAR(20) NOT NULL DEFAULT 'success'
        CHECK (status IN ('success', 'error', 'timeout', 'rate_limited')),
    error_code VARCHAR(50),
    error_message TEXT,
    metadata JSONB NOT NULL DEFAULT '{}'
) /* omnilog:partitioned usage_events */;
CREATE INDEX idx_usage_events_org_time ON usage_events (org_id, time DESC);
CREATE INDEX idx_usage_events_project_time ON usage_events (project_id, time DESC);
CREATE INDEX idx_usage_events_user_time ON usage_events (user_id, time DESC) WHERE user_id IS NOT NULL;
CREATE INDEX idx_usage_events_model ON usage_events (model, time DESC);
CREATE INDEX idx_usage_events_mcp ON usage_events (mcp_server_id, time DESC) WHERE mcp_server_id IS NOT NULL;

CREATE TABLE mcp_usage (
    time TIMESTAMPTZ NOT NULL,
    org_id UUID NOT NULL,
    project_id UUID,
    user_id VARCHAR(255),
    server_id UUID NOT NULL,
    tool_name VARCHAR(255) NOT NULL,
    request_id UUID NOT NULL,
    parent_request_id UUID,
    latency_ms INTEGER,
    status VARCHAR(20) NOT NULL
        CHECK (status IN ('success', 'error', 'timeout', 'blocked')),
    error_message TEXT,
    input_size INTEGER,
    output_size INTEGER,
    metadata JSONB NOT NULL DEFAULT '{}'
) /* omnilog:partitioned mcp_usage */;
CREATE INDEX idx_mcp_usage_server ON mcp_usage (server_id, time DESC);
CREATE INDEX idx_mcp_usage_tool ON mcp_usage (server_id, tool_name, time DESC);
CREATE INDEX idx_mcp_usage_project ON mcp_usage (project_id, time DESC);

-- Rollups. The seed's continuous aggregates become tables because percentiles cannot be rolled
-- up from stored percentiles: each row keeps a mergeable latency sketch (pipeline/sketch.py)
-- from which the merger recomputes p50/p95/p99. NULL in a key column means "all" (as in
-- log_aggregates), so the keys are UNIQUE NULLS NOT DISTINCT and upsertable.
CREATE TABLE usage_hourly (
    bucket TIMESTAMPTZ NOT NULL,
    org_id UUID NOT NULL,
    project_id UUID,
    model VARCHAR(50),
    request_count BIGINT NOT NULL DEFAULT 0,
    success_count BIGINT NOT NULL DEFAULT 0,
    error_count BIGINT NOT NULL DEFAULT 0,
    total_input_tokens BIGINT NOT NULL DEFAULT 0,
    total_output_tokens BIGINT NOT NULL DEFAULT 0,
    total_cache_read_tokens BIGINT NOT NULL DEFAULT 0,
    total_cost_cents BIGINT NOT NULL DEFAULT 0,
    avg_latency_ms DOUBLE PRECISION,
    p50_latency_ms DOUBLE PRECISION,
    p95_latency_ms DOUBLE PRECISION,
    p99_latency_ms DOUBLE PRECISION,
    unique_users BIGINT NOT NULL DEFAULT 0,
    latency_sketch BYTEA,
    CONSTRAINT usage_hourly_key UNIQUE NULLS NOT DISTINCT (bucket, org_id, project_id, model)
);
CREATE INDEX idx_usage_hourly_org_bucket ON usage_hourly (org_id, bucket DESC);

-- The seed's daily rollup is keyed by user as well; a row with user_id NULL is the all-users
-- total of its (bucket, org, project, model), the one that hourly rows fold into.
CREATE TABLE usage_daily (
    bucket TIMESTAMPTZ NOT NULL,
    org_id UUID NOT NULL,
    project_id UUID,
    model VARCHAR(50),
    user_id VARCHAR(255),
    request_count BIGINT NOT NULL DEFAULT 0,
    success_count BIGINT NOT NULL DEFAULT 0,
    error_count BIGINT NOT NULL DEFAULT 0,
    total_input_tokens BIGINT NOT NULL DEFAULT 0,
    total_output_tokens BIGINT NOT NULL DEFAULT 0,
    total_cache_read_tokens BIGINT NOT NULL DEFAULT 0,
    total_cost_cents BIGINT NOT NULL DEFAULT 0,
    avg_latency_ms DOUBLE PRECISION,
    p50_latency_ms DOUBLE PRECISION,
    p95_latency_ms DOUBLE PRECISION,
    p99_latency_ms DOUBLE PRECISION,
    unique_users BIGINT NOT NULL DEFAULT 0,
    latency_sketch BYTEA,
    CONSTRAINT usage_daily_key UNIQUE NULLS NOT DISTINCT (bucket, org_id, project_id, model, user_id)
);
CREATE INDEX idx_usage_daily_org_bucket ON usage_daily (org_id, bucket DESC);
