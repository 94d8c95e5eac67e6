-- Customer-owned buckets (docs/storage.md): an organization whose event objects go to a bucket
-- of its own instead of the deployment's (OMNILOG_S3_BUCKET).
--
-- No secret is stored here. `profile` names a profile of the AWS shared config files the
-- processes read (AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE, e.g. mounted from a Secret):
-- static keys, or role_arn + source_profile / web_identity_token_file to assume the customer's
-- role. botocore's standard credential providers resolve it.
--
-- A row is never deleted while pointers may name its bucket: `omnilog buckets set` to another
-- bucket or `omnilog buckets remove` retires the current row (retired_at), so new objects go
-- elsewhere while old pointers still find the endpoint and profile of the bucket they name.
CREATE TABLE organization_buckets (
    organization_id UUID NOT NULL,
    bucket TEXT NOT NULL CHECK (bucket ~ '^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$'),
    endpoint_url TEXT CHECK (endpoint_url ~ '^https?://'),  -- NULL: AWS S3
    region TEXT,  -- NULL: the profile's region, else AWS_REGION
    profile TEXT NOT NULL CHECK (profile ~ '^[A-Za-z0-9_.+@-]{1,64}$'),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    retired_at TIMESTAMPTZ,
    PRIMARY KEY (organization_id, bucket)
);
-- At most one bucket receives an organization's new objects.
CREATE UNIQUE INDEX organization_buckets_current ON organization_buckets (organization_id)
    WHERE retired_at IS NULL;

-- Tenant isolation as every table with an organization column (migration 0008). The read API
-- reads its own organization's rows to reach the buckets its pointers name.
ALTER TABLE organization_buckets ENABLE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON organization_buckets
    USING (organization_id = NULLIF(current_setting('app.current_org', true), '')::uuid);
GRANT SELECT ON organization_buckets TO omnilog_api;
