-- Initial schema (SQLite). Times are Unix milliseconds (INTEGER); JSON is TEXT.
CREATE TABLE companies (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL
);

CREATE TABLE users (
    id                    INTEGER PRIMARY KEY AUTOINCREMENT,
    email                 TEXT NOT NULL UNIQUE,
    role                  TEXT NOT NULL CHECK (role IN ('admin', 'provider', 'customer')),
    password_hash         TEXT NOT NULL,
    first_name            TEXT,
    last_name             TEXT,
    phone                 TEXT,
    company_id            INTEGER REFERENCES companies(id),
    active                INTEGER NOT NULL DEFAULT 0,
    must_change_password  INTEGER NOT NULL DEFAULT 0,
    created_at            INTEGER NOT NULL
);

CREATE TABLE devices (
    serial                        TEXT PRIMARY KEY,
    mac                           TEXT NOT NULL UNIQUE,
    company_id                    INTEGER NOT NULL REFERENCES companies(id),
    device_type                   TEXT NOT NULL,
    lease_months                  INTEGER NOT NULL,
    start_date                    TEXT NOT NULL,
    lease_ends_at                 INTEGER NOT NULL,
    lease_notice_sent_at          INTEGER,
    ups_model                     TEXT,
    ups_model_number              TEXT,
    ups_serial                    TEXT,
    ups_ship_date                 TEXT,
    sales_order                   TEXT,
    service_contract_sales_order  TEXT,
    registered_by                 INTEGER REFERENCES users(id),
    created_at                    INTEGER NOT NULL
);
CREATE INDEX devices_company ON devices (company_id);

CREATE TABLE certificates (
    serial_number       TEXT PRIMARY KEY,
    device_serial       TEXT NOT NULL REFERENCES devices(serial),
    sha256_fingerprint  TEXT NOT NULL,
    not_before          INTEGER NOT NULL,
    not_after           INTEGER NOT NULL,
    issued_at           INTEGER NOT NULL,
    revoked_at          INTEGER,
    revocation_reason   TEXT
);
CREATE INDEX certificates_device ON certificates (device_serial);
CREATE INDEX certificates_revoked ON certificates (revoked_at) WHERE revoked_at IS NOT NULL;

-- One row per device that ever connected or was refused; no row means never_connected.
-- No foreign keys on the ingest tables: a batch must never fail on one row.
CREATE TABLE device_status (
    serial                  TEXT PRIMARY KEY,
    state                   TEXT NOT NULL,
    since                   INTEGER,
    last_seen               INTEGER,
    peer_addr               TEXT,
    session_id              TEXT,
    keep_alive_secs         INTEGER,
    cert_serial             TEXT,
    node_id                 TEXT,
    last_disconnect_reason  TEXT,
    reported_status         TEXT,
    last_telemetry_at       INTEGER,
    telemetry_interval_ms   INTEGER,
    reported_status_at      INTEGER,
    last_connect_error      TEXT,
    last_connect_error_detail TEXT,
    last_connect_error_at   INTEGER
);

CREATE TABLE connect_refusals (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    serial      TEXT NOT NULL,
    reason      TEXT NOT NULL,
    detail      TEXT NOT NULL,
    peer_addr   TEXT,
    first_at    INTEGER NOT NULL,
    last_at     INTEGER NOT NULL,
    attempts    INTEGER NOT NULL
);
CREATE INDEX connect_refusals_serial ON connect_refusals (serial, last_at);

CREATE TABLE telemetry (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    serial              TEXT NOT NULL,
    ts                  INTEGER NOT NULL,
    received_at         INTEGER NOT NULL,
    mode                TEXT,
    load_pct            REAL,
    battery_charge_pct  REAL,
    payload             TEXT NOT NULL
);
CREATE INDEX telemetry_serial_ts ON telemetry (serial, ts);

-- Every source's last location is kept; the best one wins (device > operator > registration).
CREATE TABLE locations (
    serial      TEXT NOT NULL,
    source      TEXT NOT NULL,
    lat         REAL NOT NULL,
    lon         REAL NOT NULL,
    accuracy_m  REAL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (serial, source)
);

-- Availability history: one row per session, its start, end and end reason.
CREATE TABLE device_sessions (
    session_id  TEXT PRIMARY KEY,
    serial      TEXT NOT NULL,
    node_id     TEXT NOT NULL,
    peer_addr   TEXT,
    started_at  INTEGER NOT NULL,
    ended_at    INTEGER,
    end_reason  TEXT
);
CREATE INDEX device_sessions_serial ON device_sessions (serial, started_at);
CREATE INDEX device_sessions_open ON device_sessions (node_id) WHERE ended_at IS NULL;

CREATE TABLE device_info (
    serial       TEXT PRIMARY KEY,
    system_name  TEXT,
    firmware     TEXT,
    -- 1 when system_name does not name the registered UPS model and serial, 0 when it does.
    identity_mismatch INTEGER,
    payload      TEXT NOT NULL,
    updated_at   INTEGER NOT NULL
);

CREATE TABLE quarantine (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    serial       TEXT NOT NULL,
    topic        TEXT NOT NULL,
    payload      BLOB NOT NULL,
    error        TEXT NOT NULL,
    received_at  INTEGER NOT NULL
);
CREATE INDEX quarantine_serial ON quarantine (serial, received_at);
