-- Commands to devices (CONTRACT §9). One row per command; its state only moves forward
-- through conditional UPDATEs, so two nodes never both deliver it:
--   queued -> sending (claimed by the node holding the device's session; shown as queued)
--   sending -> delivered (the device PUBACKed it) | queued (the session ended first)
--   sending/delivered -> succeeded | failed (the device's reply)
--   queued -> expired (expires_at passed before delivery)
-- `args` and `reply` are JSON objects as text; times are Unix milliseconds.
CREATE TABLE device_commands (
    id            TEXT PRIMARY KEY,
    serial        TEXT NOT NULL,
    name          TEXT NOT NULL,
    args          TEXT NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('queued', 'sending', 'delivered', 'succeeded', 'failed', 'expired')),
    created_at    BIGINT NOT NULL,
    created_by    TEXT NOT NULL,
    expires_at    BIGINT NOT NULL,
    node_id       TEXT,
    claimed_at    BIGINT,
    delivered_at  BIGINT,
    replied_at    BIGINT,
    reply         TEXT
);
CREATE INDEX device_commands_serial ON device_commands (serial, created_at);
CREATE INDEX device_commands_pending ON device_commands (state, expires_at) WHERE state IN ('queued', 'sending');
