-- Several nodes on one database (CONTRACT §6, docs/cluster.md).

-- One row per node id: which process holds it (instance, random per start) and whether it
-- is alive. A node whose heartbeat is older than node.dead_after_secs is marked dead, once,
-- by whichever node sees it first (a conditional UPDATE on this row).
CREATE TABLE nodes (
    id                 TEXT PRIMARY KEY,
    instance           TEXT NOT NULL,
    state              TEXT NOT NULL,
    started_at         BIGINT NOT NULL,
    last_heartbeat_at  BIGINT NOT NULL
);

-- The one CA of all nodes. The row exists from the start so that a starting node can lock
-- it (SELECT … FOR UPDATE): the first fills it, the others wait and then read it.
CREATE TABLE cluster_ca (
    id           BIGINT PRIMARY KEY CHECK (id = 1),
    cert_pem     TEXT,
    -- PKCS#8 encrypted with TMS_CA_KEY_PASSPHRASE; NULL when the first node had none (the
    -- key then stays in that node's data directory only).
    key_pem      TEXT,
    fingerprint  TEXT,
    created_by   TEXT,
    created_at   BIGINT
);
INSERT INTO cluster_ca (id) VALUES (1);

-- The ordered change log nodes coordinate through (polled; LISTEN/NOTIFY only wakes up).
CREATE TABLE cluster_events (
    id          BIGSERIAL PRIMARY KEY,
    kind        TEXT NOT NULL,
    serial      TEXT NOT NULL,
    payload     TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE INDEX cluster_events_created ON cluster_events (created_at);

-- A node's devices: counted for GET /api/v1/nodes, ended together when the node is lost.
CREATE INDEX device_status_node ON device_status (node_id, state);
