-- Ingest bookkeeping (ARCHITECTURE "One batch, end to end").
--
-- ingest_offsets is the source of truth for progress: a batch's index rows and the advance of
-- its partitions' next_offset commit in one transaction, the advance being a compare-and-set
-- (WHERE next_offset = <batch start>), which fences a revoked or zombie worker's late flush.
CREATE TABLE IF NOT EXISTS ingest_offsets (
    consumer_group TEXT NOT NULL,
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL CHECK (partition >= 0),
    next_offset BIGINT NOT NULL CHECK (next_offset >= 0),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);

-- One row per object a committed batch points at, written in the same transaction as the
-- log_index rows. An object in the bucket with no row here (older than the janitor's grace
-- period) is an orphan of a failed or fenced flush; retention deletes rows and objects together.
CREATE TABLE IF NOT EXISTS ingest_objects (
    object_uri TEXT PRIMARY KEY,
    organization_id UUID NOT NULL,
    log_date DATE NOT NULL,
    event_count INTEGER NOT NULL CHECK (event_count >= 0),
    byte_size BIGINT NOT NULL CHECK (byte_size >= 0),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS idx_ingest_objects_date ON ingest_objects (log_date);
