-- Incremental aggregates (docs/aggregates.md §2-§3): insert-only deltas folded once by a sharded
-- merger, replacing the per-partition parts of 0004 that every merge pass re-read in full.
--
-- A batch transaction INSERTs one delta row per (key, batch) for the events it indexed for the
-- first time, and reads nothing. The merger takes a shard's deltas in id order
-- (`FOR UPDATE SKIP LOCKED`), adds them to the rollup rows they touch (hourly and daily, every
-- level) and DELETEs them in the same transaction: each delta counts exactly once, and a pass costs
-- what its deltas cost, whatever the history.
--
-- `slot` is a fixed hash of the organization (0..63, sinks/aggregate_parts.py): a merger shard is a
-- set of slots and holds one advisory lock per slot while it folds them, so all rollup rows of an
-- organization are written by one merger at a time however many run.
--
-- Sums keep the NUMERIC layout of 0005 (exact past 2^63) and the key sentinels of 0004 (never NULL).

-- The parts tables go. The project has no production data; a database upgraded with unmerged parts
-- loses their not-yet-merged events from the rollups (run `omnilog aggregates merge` with the old
-- release first to avoid it). The rollup rows themselves are kept, and the user sets below are
-- seeded from the old hour-users table, so windows spanning the upgrade keep exact unique users.
CREATE TABLE usage_day_users (
    window_start TIMESTAMPTZ NOT NULL,  -- UTC day
    org_id UUID NOT NULL,
    project_id UUID NOT NULL,
    model VARCHAR(50) NOT NULL,
    user_id VARCHAR(255) NOT NULL,
    PRIMARY KEY (window_start, org_id, project_id, model, user_id)
);
INSERT INTO usage_day_users
SELECT DISTINCT date_trunc('day', window_start AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', org_id, project_id, model,
       user_id
FROM usage_hour_users;

CREATE TABLE usage_hour_users_0007 (
    window_start TIMESTAMPTZ NOT NULL,  -- UTC hour
    org_id UUID NOT NULL,
    project_id UUID NOT NULL,
    model VARCHAR(50) NOT NULL,
    user_id VARCHAR(255) NOT NULL,
    PRIMARY KEY (window_start, org_id, project_id, model, user_id)
);
INSERT INTO usage_hour_users_0007
SELECT DISTINCT window_start, org_id, project_id, model, user_id FROM usage_hour_users;

DROP TABLE usage_hour_users, log_aggregate_parts, usage_parts, usage_user_parts;
ALTER TABLE usage_hour_users_0007 RENAME TO usage_hour_users;
ALTER INDEX usage_hour_users_0007_pkey RENAME TO usage_hour_users_pkey;

-- sums: total_requests, error_requests, total_bytes_in, total_bytes_out (durations: the sketch)
CREATE TABLE log_aggregate_deltas (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    slot SMALLINT NOT NULL CHECK (slot BETWEEN 0 AND 63),
    window_start TIMESTAMPTZ NOT NULL,  -- UTC hour
    organization_id UUID NOT NULL,
    server_id UUID NOT NULL,
    rpc_method VARCHAR(100) NOT NULL,
    sums NUMERIC[] NOT NULL,
    sketch BYTEA NOT NULL
);
CREATE INDEX idx_log_aggregate_deltas_slot ON log_aggregate_deltas (slot, id);

-- sums: request_count, success_count, error_count, total_input_tokens, total_output_tokens,
--       total_cache_read_tokens, total_cost_cents, then the users this batch saw first in the hour
--       and in the day (from usage_hour_users / usage_day_users); latency: the sketch
CREATE TABLE usage_deltas (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    slot SMALLINT NOT NULL CHECK (slot BETWEEN 0 AND 63),
    window_start TIMESTAMPTZ NOT NULL,  -- UTC hour
    org_id UUID NOT NULL,
    project_id UUID NOT NULL,
    model VARCHAR(50) NOT NULL,
    sums NUMERIC[] NOT NULL,
    sketch BYTEA NOT NULL
);
CREATE INDEX idx_usage_deltas_slot ON usage_deltas (slot, id);

-- The per-user daily rows of usage_daily; the first seven sums of usage_deltas.
CREATE TABLE usage_user_deltas (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    slot SMALLINT NOT NULL CHECK (slot BETWEEN 0 AND 63),
    window_start TIMESTAMPTZ NOT NULL,  -- UTC day
    org_id UUID NOT NULL,
    project_id UUID NOT NULL,
    model VARCHAR(50) NOT NULL,
    user_id VARCHAR(255) NOT NULL,
    sums NUMERIC[] NOT NULL,
    sketch BYTEA NOT NULL
);
CREATE INDEX idx_usage_user_deltas_slot ON usage_user_deltas (slot, id);

-- Isolated keys now name a deltas table; the old entries named parts that no longer exist.
DELETE FROM aggregate_isolated_keys;
ALTER TABLE aggregate_isolated_keys DROP CONSTRAINT aggregate_isolated_keys_parts_table_check;
ALTER TABLE aggregate_isolated_keys ADD CONSTRAINT aggregate_isolated_keys_parts_table_check
    CHECK (parts_table IN ('log_aggregate_deltas', 'usage_deltas', 'usage_user_deltas'));

-- A fold updates sums, percentiles and the sketch, never an indexed column: with free room in the
-- page the update is HOT (no index writes). Applies to pages written from now on.
ALTER TABLE log_aggregates SET (fillfactor = 80);
ALTER TABLE usage_hourly SET (fillfactor = 80);
ALTER TABLE usage_daily SET (fillfactor = 80);
