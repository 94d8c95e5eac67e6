-- The raw usage tables keep only the indexes a query reads (docs/schema.md "Usage indexes":
-- measured with bench/index_cost.py). Every secondary index is paid by every row a batch writes,
-- and the seed's indexes on these tables served questions the rollups answer instead
-- (usage_hourly, usage_daily, usage_monthly, mcp_usage_hourly group by project, model, user,
-- server and tool).
--
-- What reads the raw rows: an organization's retention delete (sinks/janitor.py,
-- `org_id = $1 AND time < $2` on both tables) and, on native PostgreSQL, the mcp_usage_hourly
-- view, which the dashboards filter by org_id. Both lead with the organization.

-- usage_events: idx_usage_events_org_time stays; nothing filters by project, user, model or
-- MCP server without the organization.
DROP INDEX IF EXISTS idx_usage_events_project_time;
DROP INDEX IF EXISTS idx_usage_events_user_time;
DROP INDEX IF EXISTS idx_usage_events_model;
DROP INDEX IF EXISTS idx_usage_events_mcp;

-- mcp_usage: none of the seed's three indexes starts with org_id, so the retention delete and
-- the view scanned whole partitions. One (org_id, time) index replaces them.
-- Building it takes a SHARE lock on mcp_usage until this migration commits, which holds back
-- the batches that write MCP calls: on a large existing table, first build it per partition
-- with CREATE INDEX CONCURRENTLY (docs/operations.md "PostgreSQL for ingest"); this statement
-- then attaches those instead of building.
CREATE INDEX IF NOT EXISTS idx_mcp_usage_org_time ON mcp_usage (org_id, time DESC);
DROP INDEX IF EXISTS idx_mcp_usage_server;
DROP INDEX IF EXISTS idx_mcp_usage_tool;
DROP INDEX IF EXISTS idx_mcp_usage_project;
