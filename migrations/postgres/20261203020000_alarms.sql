-- UPS alarms (CONTRACT §7): one row per raise. At most one open alarm per device and code,
-- enforced by the partial unique index, so a raise is an INSERT … ON CONFLICT DO NOTHING
-- that can never duplicate (several nodes, a replayed batch, a restart mid-outage).
-- Notification state is kept per event (raised, cleared) and per channel (email, webhook):
-- a failing webhook never holds up or loses the email.
CREATE TABLE alarms (
    id               BIGSERIAL PRIMARY KEY,
    serial           TEXT NOT NULL,
    code             TEXT NOT NULL,
    severity         TEXT NOT NULL,
    raised_at        BIGINT NOT NULL,
    cleared_at       BIGINT,
    acknowledged_at  BIGINT,
    acknowledged_by  TEXT,
    detail           TEXT NOT NULL DEFAULT '{}',
    -- When the raise (and the clear) went into the mail queue.
    mailed_raise_at  BIGINT,
    mailed_clear_at  BIGINT,
    -- When the webhook took the raise (and the clear); a delivery in progress holds a claim
    -- until `hook_claim_until`; failed deliveries wait until `hook_next_at`.
    hooked_raise_at  BIGINT,
    hooked_clear_at  BIGINT,
    hook_claim       TEXT,
    hook_claim_until BIGINT,
    hook_attempts    BIGINT NOT NULL DEFAULT 0,
    hook_next_at     BIGINT NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX alarms_open ON alarms (serial, code) WHERE cleared_at IS NULL;
CREATE INDEX alarms_serial ON alarms (serial, raised_at);
CREATE INDEX alarms_raised ON alarms (raised_at);
CREATE INDEX alarms_unmailed ON alarms (id) WHERE mailed_raise_at IS NULL OR (cleared_at IS NOT NULL AND mailed_clear_at IS NULL);
CREATE INDEX alarms_unhooked ON alarms (id) WHERE hooked_raise_at IS NULL OR (cleared_at IS NOT NULL AND hooked_clear_at IS NULL);
