-- Aggregate parts (ARCHITECTURE "Aggregates that merge correctly", docs/aggregates.md).
--
-- Ingest workers never write log_aggregates or the usage rollups: inside each batch transaction
-- they merge the batch into *parts* keyed by (window, key, source_partition). A Kafka partition
-- has one owner at a time (fenced by the offset compare-and-set of the same transaction), so a
-- part row is written by one worker only. The merger (one at a time, advisory lock) recomputes
-- the rollup rows of every key whose parts changed.
--
-- Every part keeps exact sums (`sums`, a fixed order per table, below) and a mergeable quantile
-- sketch (pipeline/sketch.py encoding). `version` is bumped by every write and `merged_version`
-- is set by the merger to the version it read: a part written after the merger read it stays
-- dirty (version <> merged_version) and is merged again on the next pass.
--
-- Key sentinels: NULL means "all" in the rollup tables, so a missing value is stored as a
-- sentinel and never as NULL: server / project 00000000-0000-0000-0000-000000000000, rpc_method /
-- model / user_id '' (an empty string and an absent value are the same key).

-- sums: total_requests, error_requests, total_bytes_in, total_bytes_out (durations: the sketch)
CREATE TABLE log_aggregate_parts (
    window_start TIMESTAMPTZ NOT NULL,  -- UTC hour
    organization_id UUID NOT NULL,
    server_id UUID NOT NULL,
    rpc_method VARCHAR(100) NOT NULL,
    source_partition INTEGER NOT NULL,
    sums BIGINT[] NOT NULL,
    sketch BYTEA NOT NULL,
    version BIGINT NOT NULL,
    merged_version BIGINT NOT NULL DEFAULT 0,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (window_start, organization_id, server_id, rpc_method, source_partition)
);
CREATE INDEX idx_log_aggregate_parts_dirty ON log_aggregate_parts (window_start)
    WHERE version <> merged_version;

-- sums: request_count, success_count, error_count, total_input_tokens, total_output_tokens,
--       total_cache_read_tokens, total_cost_cents (latency: the sketch)
CREATE TABLE usage_parts (
    window_start TIMESTAMPTZ NOT NULL,  -- UTC hour
    org_id UUID NOT NULL,
    project_id UUID NOT NULL,
    model VARCHAR(50) NOT NULL,
    source_partition INTEGER NOT NULL,
    sums BIGINT[] NOT NULL,
    sketch BYTEA NOT NULL,
    version BIGINT NOT NULL,
    merged_version BIGINT NOT NULL DEFAULT 0,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (window_start, org_id, project_id, model, source_partition)
);
CREATE INDEX idx_usage_parts_dirty ON usage_parts (window_start) WHERE version <> merged_version;

-- The per-user daily rows of usage_daily; same sums as usage_parts.
CREATE TABLE usage_user_parts (
    window_start TIMESTAMPTZ NOT NULL,  -- UTC day
    org_id UUID NOT NULL,
    project_id UUID NOT NULL,
    model VARCHAR(50) NOT NULL,
    user_id VARCHAR(255) NOT NULL,
    source_partition INTEGER NOT NULL,
    sums BIGINT[] NOT NULL,
    sketch BYTEA NOT NULL,
    version BIGINT NOT NULL,
    merged_version BIGINT NOT NULL DEFAULT 0,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (window_start, org_id, project_id, model, user_id, source_partition)
);
CREATE INDEX idx_usage_user_parts_dirty ON usage_user_parts (window_start)
    WHERE version <> merged_version;

-- Which users were active in an hour: exact unique_users (hourly and daily) as a COUNT(DISTINCT).
-- Only events with a user; keyed by source partition too, so two workers never wait on a row.
-- A new user always changes the hour's usage_parts row in the same transaction, which is what
-- makes the merger look at it.
CREATE TABLE usage_hour_users (
    window_start TIMESTAMPTZ NOT NULL,
    org_id UUID NOT NULL,
    project_id UUID NOT NULL,
    model VARCHAR(50) NOT NULL,
    user_id VARCHAR(255) NOT NULL,
    source_partition INTEGER NOT NULL,
    PRIMARY KEY (window_start, org_id, project_id, model, user_id, source_partition)
);
