-- The retention horizon (docs/operations.md "Retention"): the first UTC day whose rows are still
-- kept. `omnilog maintain` advances it (never backwards) before dropping anything older, and every
-- batch transaction reads it under a share lock (sinks/retention.py), so once a day's partition
-- is dropped no batch can commit a row for that day, and no worker re-creates the partition.
--
-- Exactly one row, created here: the share lock of a batch needs a row to lock, and an absent row
-- could not hold back the first advance. first_kept_day NULL means no horizon yet (nothing was
-- dropped); every day is accepted.
CREATE TABLE retention_horizon (
    singleton BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    first_kept_day DATE,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
INSERT INTO retention_horizon (singleton, first_kept_day) VALUES (TRUE, NULL);
