-- Accounts: login sessions, activation tokens, failed-login throttling, the mail queue.
-- Tokens are stored only as SHA-256 hashes.
ALTER TABLE users ADD COLUMN failed_logins BIGINT NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN locked_until BIGINT;

CREATE TABLE auth_tokens (
    token_hash  TEXT PRIMARY KEY,
    user_id     BIGINT NOT NULL REFERENCES users(id),
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    revoked_at  BIGINT
);
CREATE INDEX auth_tokens_user ON auth_tokens (user_id);

CREATE TABLE activation_tokens (
    token_hash  TEXT PRIMARY KEY,
    user_id     BIGINT NOT NULL REFERENCES users(id),
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    used_at     BIGINT
);
CREATE INDEX activation_tokens_user ON activation_tokens (user_id);

CREATE TABLE mail_queue (
    id               BIGSERIAL PRIMARY KEY,
    kind             TEXT NOT NULL,
    recipient        TEXT NOT NULL,
    message          TEXT NOT NULL,
    created_at       BIGINT NOT NULL,
    next_attempt_at  BIGINT NOT NULL,
    attempts         BIGINT NOT NULL DEFAULT 0,
    last_error       TEXT,
    sent_at          BIGINT
);
CREATE INDEX mail_queue_pending ON mail_queue (next_attempt_at) WHERE sent_at IS NULL;
