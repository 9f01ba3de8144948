//! Refused connection attempts that belong to no device, recorded per peer address.
//!
//! A device's own refusals live on its record (`connect_refusals`); what cannot be attributed
//! to a registered device — a client that rejected the server certificate before sending its
//! own, a stranger's certificate — is kept here, one row per (peer IP, reason), so the
//! operator sees who is failing to connect and why. Not here: deciding what is a stranger
//! (the broker does) or coalescing bursts (ingest does).

use crate::{Result, Store, query_err};

/// Attempts of one peer for one reason: coalesced by ingest (attempts since its last write),
/// or as the fleet view shows them (all attempts).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct PeerRefusal {
    pub peer_ip: String,
    /// The last attempt's address and port.
    pub peer_addr: String,
    pub reason: String,
    pub detail: String,
    pub first_at: i64,
    pub last_at: i64,
    pub attempts: i64,
}

/// Records of refused peers kept at most (the newest): each batch that writes some trims the
/// rest, so strangers with many addresses cannot grow the table.
pub const PEER_REFUSALS_KEPT: i64 = 1000;

/// Run after the upserts of a batch: everything older than the newest [`PEER_REFUSALS_KEPT`]
/// goes (nothing while there are fewer).
pub(crate) const TRIM: &str = "DELETE FROM peer_refusals WHERE last_at < \
     (SELECT last_at FROM peer_refusals ORDER BY last_at DESC LIMIT 1 OFFSET $1)";

/// The upsert ingest runs for each [`PeerRefusal`] (in its batch's transaction).
pub(crate) const UPSERT: &str = "INSERT INTO peer_refusals (peer_ip, reason, detail, peer_addr, first_at, last_at, attempts) \
     VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (peer_ip, reason) DO UPDATE SET \
     detail = excluded.detail, peer_addr = excluded.peer_addr, last_at = excluded.last_at, \
     attempts = peer_refusals.attempts + excluded.attempts";

impl Store {
    /// The most recently refused peers, newest first, at most `limit`.
    pub async fn peer_refusals(&self, limit: i64) -> Result<Vec<PeerRefusal>> {
        sqlx::query_as::<_, PeerRefusal>(
            "SELECT peer_ip, peer_addr, reason, detail, first_at, last_at, attempts FROM peer_refusals \
             ORDER BY last_at DESC, peer_ip, reason LIMIT $1",
        )
        .bind(limit)
        .fetch_all(self.pool())
        .await
        .map_err(query_err("reading refused peers"))
    }

    /// Deletes peer records last seen before `before`, and all but the `keep` newest.
    pub async fn prune_peer_refusals(&self, before: i64, keep: i64) -> Result<u64> {
        let old = sqlx::query("DELETE FROM peer_refusals WHERE last_at < $1")
            .bind(before)
            .execute(self.pool())
            .await
            .map_err(query_err("pruning refused peers"))?;
        let over = sqlx::query(
            "DELETE FROM peer_refusals WHERE last_at < (SELECT MIN(last_at) FROM \
             (SELECT last_at FROM peer_refusals ORDER BY last_at DESC LIMIT $1) AS newest)",
        )
        .bind(keep)
        .execute(self.pool())
        .await
        .map_err(query_err("pruning refused peers"))?;
        Ok(old.rows_affected() + over.rows_affected())
    }
}
