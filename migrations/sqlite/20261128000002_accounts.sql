-- Accounts: login sessions, activation tokens, failed-login throttling, the mail queue.
-- Tokens are stored only as SHA-256 hashes.
ALTER TABLE users ADD COLUMN failed_logins INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN locked_until INTEGER;

CREATE TABLE auth_tokens (
    token_hash  TEXT PRIMARY KEY,
    user_id     INTEGER NOT NULL REFERENCES users(id),
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);
CREATE INDEX auth_tokens_user ON auth_tokens (user_id);

CREATE TABLE activation_tokens (
    token_hash  TEXT PRIMARY KEY,
    user_id     INTEGER NOT NULL REFERENCES users(id),
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    used_at     INTEGER
);
CREATE INDEX activation_tokens_user ON activation_tokens (user_id);

CREATE TABLE mail_queue (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    kind             TEXT NOT NULL,
    recipient        TEXT NOT NULL,
    message          TEXT NOT NULL,
    created_at       INTEGER NOT NULL,
    next_attempt_at  INTEGER NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    last_error       TEXT,
    sent_at          INTEGER
);
CREATE INDEX mail_queue_pending ON mail_queue (next_attempt_at) WHERE sent_at IS NULL;
