-- server_stats (the seed's table, 0001) and usage_monthly, kept by the merger from insert-only
-- deltas like the other rollups (docs/aggregates.md §10-§11): a batch inserts one delta per key for
-- the events it indexed for the first time, the merger folds each delta once and deletes it.

-- server_stats -----------------------------------------------------------------------------------
-- sums: total_requests, error_requests, sessions new to the window (from server_window_sessions);
-- durations: the sketch (exact count, sum, min and max; alpha 0.008).
-- window_seconds is part of the key: a window is never merged with one of another width.
CREATE TABLE server_stats_deltas (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    slot SMALLINT NOT NULL CHECK (slot BETWEEN 0 AND 63),
    window_start TIMESTAMPTZ NOT NULL,
    organization_id UUID NOT NULL,
    server_id UUID NOT NULL,
    window_seconds INTEGER NOT NULL CHECK (window_seconds > 0),
    sums NUMERIC[] NOT NULL,
    sketch BYTEA NOT NULL
);
CREATE INDEX idx_server_stats_deltas_slot ON server_stats_deltas (slot, id);

-- Who was active in each server window: an insert-only set, so a session is counted once per
-- window however many batches, workers or re-sends carry it.
CREATE TABLE server_window_sessions (
    window_start TIMESTAMPTZ NOT NULL,
    organization_id UUID NOT NULL,
    server_id UUID NOT NULL,
    session_id UUID NOT NULL,
    PRIMARY KEY (window_start, organization_id, server_id, session_id)
);

-- The merged sketch beside the seed's columns: min, max and avg come from it, exactly.
ALTER TABLE server_stats ADD COLUMN duration_sketch BYTEA;
ALTER TABLE server_stats SET (fillfactor = 80);

-- usage_monthly ----------------------------------------------------------------------------------
-- A month of (org, project, model), consistent with usage_daily: its sums are the sums of the
-- month's all-users usage_daily rows, active_days is how many of those rows exist, unique_users
-- the distinct users of the month.
CREATE TABLE usage_monthly (
    month TIMESTAMPTZ NOT NULL,  -- first instant of the UTC month
    org_id UUID NOT NULL,
    project_id UUID NOT NULL,
    model VARCHAR(50) NOT NULL,
    request_count BIGINT NOT NULL,
    success_count BIGINT NOT NULL,
    error_count BIGINT NOT NULL,
    total_input_tokens NUMERIC(38, 0) NOT NULL,
    total_output_tokens NUMERIC(38, 0) NOT NULL,
    total_cache_read_tokens NUMERIC(38, 0) NOT NULL,
    total_cost_cents NUMERIC(38, 0) NOT NULL,
    unique_users BIGINT NOT NULL,
    active_days INTEGER NOT NULL,
    avg_latency_ms DOUBLE PRECISION,
    p50_latency_ms DOUBLE PRECISION,
    p95_latency_ms DOUBLE PRECISION,
    p99_latency_ms DOUBLE PRECISION,
    latency_sketch BYTEA NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT usage_monthly_key PRIMARY KEY (month, org_id, project_id, model)
) WITH (fillfactor = 80);

-- sums: the seven usage sums, then the users new to the month and the days new to the month.
CREATE TABLE usage_monthly_deltas (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    slot SMALLINT NOT NULL CHECK (slot BETWEEN 0 AND 63),
    window_start TIMESTAMPTZ NOT NULL,  -- UTC month
    org_id UUID NOT NULL,
    project_id UUID NOT NULL,
    model VARCHAR(50) NOT NULL,
    sums NUMERIC[] NOT NULL,
    sketch BYTEA NOT NULL
);
CREATE INDEX idx_usage_monthly_deltas_slot ON usage_monthly_deltas (slot, id);

CREATE TABLE usage_month_users (
    window_start TIMESTAMPTZ NOT NULL,  -- UTC month
    org_id UUID NOT NULL,
    project_id UUID NOT NULL,
    model VARCHAR(50) NOT NULL,
    user_id VARCHAR(255) NOT NULL,
    PRIMARY KEY (window_start, org_id, project_id, model, user_id)
);

CREATE TABLE usage_active_days (
    window_start TIMESTAMPTZ NOT NULL,  -- UTC day
    org_id UUID NOT NULL,
    project_id UUID NOT NULL,
    model VARCHAR(50) NOT NULL,
    PRIMARY KEY (window_start, org_id, project_id, model)
);

ALTER TABLE aggregate_isolated_keys DROP CONSTRAINT aggregate_isolated_keys_parts_table_check;
ALTER TABLE aggregate_isolated_keys ADD CONSTRAINT aggregate_isolated_keys_parts_table_check
    CHECK (parts_table IN ('log_aggregate_deltas', 'usage_deltas', 'usage_user_deltas',
                           'server_stats_deltas', 'usage_monthly_deltas'));

-- Row security, as migration 0008 gives every tenant table (none of these is compressed).
DO $$
DECLARE
    current_org CONSTANT TEXT := 'NULLIF(current_setting(''app.current_org'', true), '''')';
    tenant RECORD;
BEGIN
    FOR tenant IN
        SELECT * FROM (VALUES
            ('server_stats_deltas', 'organization_id'),
            ('server_window_sessions', 'organization_id'),
            ('usage_monthly', 'org_id'),
            ('usage_monthly_deltas', 'org_id'),
            ('usage_month_users', 'org_id'),
            ('usage_active_days', 'org_id')
        ) AS t(name, org_column)
    LOOP
        EXECUTE format('ALTER TABLE public.%I ENABLE ROW LEVEL SECURITY', tenant.name);
        EXECUTE format('CREATE POLICY org_isolation ON public.%I USING (%I = %s::uuid)',
                       tenant.name, tenant.org_column, current_org);
    END LOOP;
END
$$;
