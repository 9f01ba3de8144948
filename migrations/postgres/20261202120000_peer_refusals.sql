-- Refused connection attempts that belong to no device: a client that gave up on the server
-- certificate before showing its own (server_name_mismatch), a certificate not issued by our
-- CA, no certificate at all. One row per peer address and reason, coalesced; bounded by
-- housekeeping (newest rows kept, the rest pruned), so strangers cannot grow it.
CREATE TABLE peer_refusals (
    peer_ip TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    peer_addr TEXT NOT NULL,
    first_at BIGINT NOT NULL,
    last_at BIGINT NOT NULL,
    attempts BIGINT NOT NULL,
    PRIMARY KEY (peer_ip, reason)
);
CREATE INDEX peer_refusals_last ON peer_refusals (last_at);
