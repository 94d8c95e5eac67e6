-- Retention per organization (docs/operations.md "Retention").
--
-- organizations.log_retention_days: an explicit value wins; NULL means "the plan's default"
-- (free 7 d, pro 30 d, enterprise 365 d, sinks/retention.py). The seed's DEFAULT 7 would make
-- every new organization look explicit, so new rows now start at NULL and follow their plan
-- (a plan change then takes effect at the next `omnilog maintain`). Existing values are kept.
ALTER TABLE organizations ALTER COLUMN log_retention_days DROP DEFAULT;

-- `maintain` pages through one organization's expired objects; without this index each page
-- would scan every organization's old ledger rows.
CREATE INDEX IF NOT EXISTS idx_ingest_objects_org_date ON ingest_objects (organization_id, log_date);

-- A record of every deletion `maintain` makes (and of what a --dry-run would make): one row per
-- step and organization. organization_id is NULL for steps across organizations (partition
-- drops, expiry past the retention horizon, the orphan sweep).
CREATE TABLE retention_cleanup_logs (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id UUID NOT NULL,
    dry_run BOOLEAN NOT NULL,
    what TEXT NOT NULL CHECK (what IN ('organization', 'partitions', 'expired_objects', 'orphans', 'rollups')),
    organization_id UUID,
    cutoff DATE,
    index_rows BIGINT NOT NULL DEFAULT 0 CHECK (index_rows >= 0),
    usage_rows BIGINT NOT NULL DEFAULT 0 CHECK (usage_rows >= 0),
    aggregate_rows BIGINT NOT NULL DEFAULT 0 CHECK (aggregate_rows >= 0),
    objects BIGINT NOT NULL DEFAULT 0 CHECK (objects >= 0),
    bytes BIGINT NOT NULL DEFAULT 0 CHECK (bytes >= 0),
    failed_objects BIGINT NOT NULL DEFAULT 0 CHECK (failed_objects >= 0),
    detail TEXT,
    duration_ms BIGINT NOT NULL CHECK (duration_ms >= 0),
    error TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX idx_retention_cleanup_logs_org_time ON retention_cleanup_logs (organization_id, created_at DESC);

-- Tenant isolation as every table with an organization column (migration 0008): a tenant sees
-- its own organization's records, never the cross-organization ones (NULL matches nothing).
ALTER TABLE retention_cleanup_logs ENABLE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON retention_cleanup_logs
    USING (organization_id = NULLIF(current_setting('app.current_org', true), '')::uuid);
