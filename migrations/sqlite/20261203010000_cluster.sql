-- The node of a single-node gateway (CONTRACT §6): its id, start and heartbeat, for
-- GET /api/v1/nodes and for refusing a second live process with the same node id. The
-- shared CA and the change log are PostgreSQL's only (docs/cluster.md).
CREATE TABLE nodes (
    id                 TEXT PRIMARY KEY,
    instance           TEXT NOT NULL,
    state              TEXT NOT NULL,
    started_at         BIGINT NOT NULL,
    last_heartbeat_at  BIGINT NOT NULL
);

-- A node's devices: counted for GET /api/v1/nodes, ended together when the node is lost.
CREATE INDEX device_status_node ON device_status (node_id, state);
