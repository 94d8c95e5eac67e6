-- Two more steps of `omnilog maintain` recorded in retention_cleanup_logs (docs/operations.md
-- "Retention"): `dead_letters`, the whole values of oversized dead letters expired under
-- OMNILOG_DLQ_OBJECT_PREFIX, and `held_server_deltas`, one row per organization whose server_stats
-- deltas were held for a server never registered and dropped past the accepted lateness.
ALTER TABLE retention_cleanup_logs
    DROP CONSTRAINT retention_cleanup_logs_what_check,
    ADD CONSTRAINT retention_cleanup_logs_what_check CHECK (what IN (
        'organization', 'partitions', 'expired_objects', 'orphans', 'rollups',
        'dead_letters', 'held_server_deltas'
    ));
