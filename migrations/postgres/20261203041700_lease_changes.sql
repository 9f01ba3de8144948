-- Lease changes (a renewal adds months): until now only the lease's current end was kept, so
-- the device timeline (CONTRACT §8, `lease_changed`) could not say when or by how much it
-- changed. One row per change, written in the same transaction as the change itself.
-- Times are Unix milliseconds.
CREATE TABLE lease_changes (
    id                BIGSERIAL PRIMARY KEY,
    serial            TEXT NOT NULL,
    changed_at        BIGINT NOT NULL,
    months_added      BIGINT NOT NULL,
    lease_months      BIGINT NOT NULL,
    previous_ends_at  BIGINT NOT NULL,
    lease_ends_at     BIGINT NOT NULL
);
CREATE INDEX lease_changes_serial ON lease_changes (serial, changed_at);
