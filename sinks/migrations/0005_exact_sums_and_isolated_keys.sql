-- Sums that cannot overflow, and aggregate keys held aside (docs/aggregates.md, "Sums that cannot
-- overflow" and "A key that cannot be merged").
--
-- An accepted event may carry bytes_in / bytes_out up to 2^40 and tokens / cost up to 2^31 - 1, so
-- 2^23 events of one organization-day (or 2^32 for tokens) are enough to pass 2^63 - 1: a BIGINT
-- sum would then fail the batch transaction that writes the part, or every merge pass, for every
-- tenant. Value sums become NUMERIC(38,0): exact integers up to 10^38, far above the most any
-- BIGINT count of events times the largest accepted value can reach (2^63 * 2^40 < 10^32).
-- Counts (requests, successes, errors, unique users) stay BIGINT: they grow by at most one per
-- event, and 2^63 events cannot happen. The parts' `sums` arrays hold both, so they become
-- NUMERIC[] (one type per array); the merger and the parts writer use Python integers throughout.

ALTER TABLE log_aggregate_parts ALTER COLUMN sums TYPE NUMERIC[];
ALTER TABLE usage_parts ALTER COLUMN sums TYPE NUMERIC[];
ALTER TABLE usage_user_parts ALTER COLUMN sums TYPE NUMERIC[];

ALTER TABLE log_aggregates
    ALTER COLUMN total_bytes_in TYPE NUMERIC(38, 0),
    ALTER COLUMN total_bytes_out TYPE NUMERIC(38, 0);

ALTER TABLE usage_hourly
    ALTER COLUMN total_input_tokens TYPE NUMERIC(38, 0),
    ALTER COLUMN total_output_tokens TYPE NUMERIC(38, 0),
    ALTER COLUMN total_cache_read_tokens TYPE NUMERIC(38, 0),
    ALTER COLUMN total_cost_cents TYPE NUMERIC(38, 0);

ALTER TABLE usage_daily
    ALTER COLUMN total_input_tokens TYPE NUMERIC(38, 0),
    ALTER COLUMN total_output_tokens TYPE NUMERIC(38, 0),
    ALTER COLUMN total_cache_read_tokens TYPE NUMERIC(38, 0),
    ALTER COLUMN total_cost_cents TYPE NUMERIC(38, 0);

-- Keys whose merge failed with an error attributable to them alone (a corrupt sketch, a value a
-- rollup column rejects): the merger skips their dirty parts so every other key goes on, and an
-- operator releases them (`omnilog aggregates release`, or DELETE a row here) once the cause is
-- fixed. Releasing is enough: the key's parts were never marked merged, so the next pass retries
-- them. `key_values` are the part table's key columns after window_start, as text (UUIDs in
-- their canonical lower-case form), e.g. {organization_id, server_id, rpc_method}.
CREATE TABLE aggregate_isolated_keys (
    parts_table TEXT NOT NULL
        CHECK (parts_table IN ('log_aggregate_parts', 'usage_parts', 'usage_user_parts')),
    window_start TIMESTAMPTZ NOT NULL,
    key_values TEXT[] NOT NULL,
    error TEXT NOT NULL,
    isolated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (parts_table, window_start, key_values)
);
