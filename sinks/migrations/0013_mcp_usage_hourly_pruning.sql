-- mcp_usage_hourly on native PostgreSQL, rewritten so that a query on a range of `bucket` reads
-- only the day partitions of mcp_usage that range covers (docs/schema.md "mcp_usage_hourly").
--
-- The first definition (sinks/aggregate_timescale.py) grouped mcp_usage by date_trunc('hour', time):
-- a filter on `bucket` reached the table as `date_trunc('hour', time) >= ...`, which the planner
-- cannot turn into a bound on the partition key, so every query scanned every kept partition.
--
-- Here each hour is one lateral aggregate over `time >= bucket AND time < bucket + 1 hour`: a filter
-- on `bucket` first selects the hours, and each hour's scan of mcp_usage carries a bound on `time`,
-- so the executor prunes the partitions outside that hour (run-time pruning of a parameterised
-- Append). The hours come from the partitions' own bounds (every row lies in one), aligned with
-- date_trunc('hour', ...) in the session's time zone as the first definition was; an hour that
-- has no row yields no group, as before. The columns, their types and their values are unchanged
-- (proven against the first definition in tests/integration/test_mcp_usage_hourly.py).
--
-- Only a natively partitioned mcp_usage gets it: on TimescaleDB the rollup is a continuous
-- aggregate (or, with row security, the first view over a hypertable, whose chunks have no
-- partition bounds), and sinks/aggregate_timescale.py creates it there as before. Created here when
-- missing too, so the merger's `ensure_rollup_views` finds it and leaves it.
DO $migration$
BEGIN
    IF (SELECT relkind FROM pg_class WHERE oid = to_regclass('mcp_usage')) IS DISTINCT FROM 'p' THEN
        RETURN;
    END IF;
    IF (SELECT relkind FROM pg_class WHERE oid = to_regclass('mcp_usage_hourly')) IS DISTINCT FROM 'v'
       AND to_regclass('mcp_usage_hourly') IS NOT NULL THEN
        RETURN;  -- a continuous aggregate or a table someone made: not ours to replace
    END IF;
    CREATE OR REPLACE VIEW mcp_usage_hourly WITH (security_invoker = true) AS
    SELECT h.bucket, a.org_id, a.server_id, a.tool_name,
           a.calls, a.success_count, a.error_count, a.timeout_count, a.blocked_count,
           a.total_latency_ms, a.avg_latency_ms, a.total_input_size, a.total_output_size
    FROM (
        -- Every hour some partition covers. DISTINCT: in a time zone whose offset is not a whole
        -- hour, the last hour of one day's partition is the first of the next one's.
        SELECT DISTINCT generate_series(
                   date_trunc('hour', p.low), p.high - interval '1 microsecond', interval '1 hour'
               ) AS bucket
        FROM (
            -- A partition named by sinks/partitions.py (mcp_usage_pYYYYMMDD) holds that UTC day:
            -- its bounds come from the name. Deparsing a bound (pg_get_expr) costs about a
            -- millisecond a partition, paid by every query over a year of partitions; any other
            -- partition's bounds are still read that way, so no row is ever left out.
            SELECT CASE WHEN c.relname ~ '^mcp_usage_p[0-9]{8}$'
                        THEN to_date(right(c.relname, 8), 'YYYYMMDD')::timestamp AT TIME ZONE 'UTC'
                        ELSE substring(pg_get_expr(c.relpartbound, c.oid) FROM 'FROM \(''([^'']+)''\)')::timestamptz
                   END AS low,
                   CASE WHEN c.relname ~ '^mcp_usage_p[0-9]{8}$'
                        THEN (to_date(right(c.relname, 8), 'YYYYMMDD') + 1)::timestamp AT TIME ZONE 'UTC'
                        ELSE substring(pg_get_expr(c.relpartbound, c.oid) FROM 'TO \(''([^'']+)''\)')::timestamptz
                   END AS high
            FROM pg_inherits i
            JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = 'mcp_usage'::regclass
        ) p
    ) h
    CROSS JOIN LATERAL (
        SELECT org_id, server_id, tool_name,
               count(*) AS calls,
               count(*) FILTER (WHERE status = 'success') AS success_count,
               count(*) FILTER (WHERE status = 'error') AS error_count,
               count(*) FILTER (WHERE status = 'timeout') AS timeout_count,
               count(*) FILTER (WHERE status = 'blocked') AS blocked_count,
               sum(latency_ms) AS total_latency_ms,
               avg(latency_ms) AS avg_latency_ms,
               sum(input_size) AS total_input_size,
               sum(output_size) AS total_output_size
        FROM mcp_usage
        WHERE time >= h.bucket AND time < h.bucket + interval '1 hour'
        GROUP BY org_id, server_id, tool_name
    ) a;
END
$migration$;
