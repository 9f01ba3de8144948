//! Several nodes on one database (CONTRACT §6): the node table (who holds which node id,
//! heartbeats, node loss), the one shared CA, and the ordered change log nodes coordinate
//! through. Deciding when to call these (timers, what to do with an event) is the gateway's.
//!
//! The CA row and the change log exist on PostgreSQL only; on SQLite (one node) the node table
//! is all there is.

use sqlx::Row;

use crate::{Backend, Result, Store, StoreError, query_err};

/// A node as the node table has it, with the devices it holds online.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct NodeRecord {
    pub id: String,
    pub started_at: i64,
    pub last_heartbeat_at: i64,
    /// `alive` or `dead` as recorded; a stale `alive` not yet swept is still `alive` here.
    pub state: String,
    pub devices_online: i64,
}

/// Why a node id could not be taken at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeBusy {
    /// The other process's heartbeat (Unix ms).
    pub last_heartbeat_at: i64,
}

/// What a heartbeat found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heartbeat {
    /// Written.
    Alive,
    /// Another node marked this one dead (its sessions are ended as `node_lost`); the row is
    /// alive again now, and the sessions this process still holds must be reconnected.
    Revived,
    /// Another process holds the node id now.
    Replaced,
}

/// A node declared dead by this call, and how many devices it left offline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostNode {
    pub id: String,
    pub last_heartbeat_at: i64,
    pub devices: u64,
}

/// The shared CA as stored: its certificate, and its key when it is kept encrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedCa {
    pub cert_pem: String,
    /// PKCS#8 PEM encrypted with `TMS_CA_KEY_PASSPHRASE`; `None`: the first node had no
    /// passphrase and keeps the key in its own data directory.
    pub key_pem: Option<String>,
    pub fingerprint: String,
    pub created_by: String,
}

/// One entry of the change log.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ClusterEvent {
    pub id: i64,
    pub kind: String,
    pub serial: String,
    /// JSON object.
    pub payload: String,
    pub created_at: i64,
}

/// The change log's kind for "device `serial` connected as session S on node N" (payload
/// `{"session": S, "node": N}`), written in the transaction that records the connect.
pub const EVENT_CONNECTED: &str = "connected";

/// Held while a starting node decides on the shared CA: the `cluster_ca` row locked `FOR
/// UPDATE`, so nodes starting at the same instant take turns and only the first creates it.
pub struct CaLock {
    tx: sqlx::Transaction<'static, sqlx::Any>,
    found: Option<SharedCa>,
}

impl CaLock {
    /// The CA another node stored, if one did.
    pub fn found(&self) -> Option<&SharedCa> {
        self.found.as_ref()
    }

    /// Stores the CA this node created and releases the lock.
    pub async fn store(mut self, ca: &SharedCa, at: i64) -> Result<()> {
        const OP: &str = "storing the shared CA";
        sqlx::query(
            "UPDATE cluster_ca SET cert_pem = $1, key_pem = $2, fingerprint = $3, created_by = $4, \
             created_at = $5 WHERE id = 1",
        )
        .bind(&ca.cert_pem)
        .bind(ca.key_pem.as_deref())
        .bind(&ca.fingerprint)
        .bind(&ca.created_by)
        .bind(at)
        .execute(&mut *self.tx)
        .await
        .map_err(query_err(OP))?;
        self.tx.commit().await.map_err(query_err(OP))
    }

    /// Releases the lock without changing anything.
    pub async fn release(self) -> Result<()> {
        self.tx
            .rollback()
            .await
            .map_err(query_err("releasing the shared CA"))
    }
}

impl Store {
    /// Takes the node id `id` for this process (`instance`, random per start): refused while
    /// another process holds it and heartbeats (last heartbeat at or after `alive_since`),
    /// unless that process was `previous` (an earlier run on this data directory, which the
    /// data-directory lock proves has ended). One statement, so two processes starting at
    /// once with the same id cannot both succeed.
    pub async fn claim_node(
        &self,
        id: &str,
        instance: &str,
        previous: Option<&str>,
        now: i64,
        alive_since: i64,
    ) -> Result<Result<(), NodeBusy>> {
        const OP: &str = "claiming the node id";
        let done = sqlx::query(
            "INSERT INTO nodes (id, instance, state, started_at, last_heartbeat_at) \
             VALUES ($1, $2, 'alive', $3, $3) ON CONFLICT (id) DO UPDATE SET \
             instance = excluded.instance, state = 'alive', started_at = excluded.started_at, \
             last_heartbeat_at = excluded.last_heartbeat_at \
             WHERE nodes.state <> 'alive' OR nodes.last_heartbeat_at < $4 OR nodes.instance = $5",
        )
        .bind(id)
        .bind(instance)
        .bind(now)
        .bind(alive_since)
        .bind(previous.unwrap_or(""))
        .execute(self.pool())
        .await
        .map_err(query_err(OP))?;
        if done.rows_affected() == 1 {
            return Ok(Ok(()));
        }
        let row = sqlx::query("SELECT last_heartbeat_at FROM nodes WHERE id = $1")
            .bind(id)
            .fetch_one(self.pool())
            .await
            .map_err(query_err(OP))?;
        Ok(Err(NodeBusy {
            last_heartbeat_at: row.try_get(0).map_err(query_err(OP))?,
        }))
    }

    /// Writes this node's heartbeat.
    pub async fn heartbeat(&self, id: &str, instance: &str, now: i64) -> Result<Heartbeat> {
        const OP: &str = "writing the node heartbeat";
        const ALIVE: &str = "UPDATE nodes SET last_heartbeat_at = $1 WHERE id = $2 AND instance = $3 AND state = 'alive'";
        const REVIVE: &str = "UPDATE nodes SET last_heartbeat_at = $1, state = 'alive' WHERE id = $2 AND instance = $3";
        let beat = |sql: &'static str| {
            sqlx::query(sql)
                .bind(now)
                .bind(id)
                .bind(instance)
                .execute(self.pool())
        };
        if beat(ALIVE).await.map_err(query_err(OP))?.rows_affected() == 1 {
            return Ok(Heartbeat::Alive);
        }
        // Not alive under this instance: declared dead by another node, or taken over.
        if beat(REVIVE).await.map_err(query_err(OP))?.rows_affected() == 1 {
            Ok(Heartbeat::Revived)
        } else {
            Ok(Heartbeat::Replaced)
        }
    }

    /// Marks this node stopped (a clean shutdown: its sessions ended as `server_shutdown`).
    pub async fn leave_node(&self, id: &str, instance: &str, now: i64) -> Result<()> {
        sqlx::query(
            "UPDATE nodes SET state = 'dead', last_heartbeat_at = $1 WHERE id = $2 AND instance = $3",
        )
        .bind(now)
        .bind(id)
        .bind(instance)
        .execute(self.pool())
        .await
        .map_err(query_err("marking the node stopped"))?;
        Ok(())
    }

    /// Declares dead every node but `me` whose heartbeat is older than `cutoff`, and ends the
    /// sessions each still has open with reason `node_lost` (status offline). Each node in
    /// one transaction that starts with a conditional update of its row: when several nodes
    /// sweep at once, only the first to change the row ends its sessions, so each session is
    /// ended once.
    pub async fn sweep_lost_nodes(&self, me: &str, cutoff: i64) -> Result<Vec<LostNode>> {
        const OP: &str = "ending the sessions of a lost node";
        let stale = sqlx::query(
            "SELECT id, last_heartbeat_at FROM nodes WHERE state = 'alive' AND last_heartbeat_at < $1 AND id <> $2",
        )
        .bind(cutoff)
        .bind(me)
        .fetch_all(self.pool())
        .await
        .map_err(query_err(OP))?;
        let mut lost = Vec::new();
        for row in stale {
            let id: String = row.try_get(0).map_err(query_err(OP))?;
            let last: i64 = row.try_get(1).map_err(query_err(OP))?;
            let mut tx = self.begin_write(OP).await?;
            let marked = sqlx::query(
                "UPDATE nodes SET state = 'dead' WHERE id = $1 AND state = 'alive' AND last_heartbeat_at < $2",
            )
            .bind(&id)
            .bind(cutoff)
            .execute(&mut *tx)
            .await
            .map_err(query_err(OP))?;
            if marked.rows_affected() == 0 {
                // Another node was first, or it came back.
                tx.rollback().await.map_err(query_err(OP))?;
                continue;
            }
            // The last moment the node was known alive is when its devices were last known
            // connected.
            let devices = sqlx::query(
                "UPDATE device_status SET state = 'offline', since = $1, last_disconnect_reason = 'node_lost' \
                 WHERE state = 'online' AND node_id = $2",
            )
            .bind(last)
            .bind(&id)
            .execute(&mut *tx)
            .await
            .map_err(query_err(OP))?
            .rows_affected();
            sqlx::query(
                "UPDATE device_sessions SET ended_at = $1, end_reason = 'node_lost' \
                 WHERE node_id = $2 AND ended_at IS NULL",
            )
            .bind(last)
            .bind(&id)
            .execute(&mut *tx)
            .await
            .map_err(query_err(OP))?;
            tx.commit().await.map_err(query_err(OP))?;
            lost.push(LostNode {
                id,
                last_heartbeat_at: last,
                devices,
            });
        }
        Ok(lost)
    }

    /// Every node, by id, with the devices each holds online. A node recorded alive whose
    /// heartbeat is older than `dead_before` is reported `dead` (it is, even if no node has
    /// swept it yet).
    pub async fn nodes(&self, dead_before: i64) -> Result<Vec<NodeRecord>> {
        sqlx::query_as::<_, NodeRecord>(
            "SELECT n.id, n.started_at, n.last_heartbeat_at, \
             CASE WHEN n.state = 'alive' AND n.last_heartbeat_at >= $1 THEN 'alive' ELSE 'dead' END AS state, \
             (SELECT COUNT(*) FROM device_status s WHERE s.node_id = n.id AND s.state = 'online') AS devices_online \
             FROM nodes n ORDER BY n.id",
        )
        .bind(dead_before)
        .fetch_all(self.pool())
        .await
        .map_err(query_err("listing the nodes"))
    }

    /// Locks the shared CA row (PostgreSQL only) and reads it; other nodes calling this wait
    /// until the returned lock is stored or released.
    pub async fn lock_shared_ca(&self) -> Result<CaLock> {
        const OP: &str = "locking the shared CA";
        if self.backend() != Backend::Postgres {
            return Err(StoreError::NotFound {
                what: "shared CA (PostgreSQL only)",
            });
        }
        let mut tx = self.pool().begin().await.map_err(query_err(OP))?;
        let row = sqlx::query(
            "SELECT cert_pem, key_pem, fingerprint, created_by FROM cluster_ca WHERE id = 1 FOR UPDATE",
        )
        .fetch_one(&mut *tx)
        .await
        .map_err(query_err(OP))?;
        let cert_pem: Option<String> = row.try_get(0).map_err(query_err(OP))?;
        let found = match cert_pem {
            Some(cert_pem) => Some(SharedCa {
                cert_pem,
                key_pem: row.try_get(1).map_err(query_err(OP))?,
                fingerprint: row
                    .try_get::<Option<String>, _>(2)
                    .map_err(query_err(OP))?
                    .unwrap_or_default(),
                created_by: row
                    .try_get::<Option<String>, _>(3)
                    .map_err(query_err(OP))?
                    .unwrap_or_default(),
            }),
            None => None,
        };
        Ok(CaLock { tx, found })
    }

    /// The shared CA without locking (PostgreSQL; `None` on SQLite or before a node made it).
    pub async fn shared_ca(&self) -> Result<Option<SharedCa>> {
        if self.backend() != Backend::Postgres {
            return Ok(None);
        }
        let lock = self.lock_shared_ca().await?;
        let found = lock.found.clone();
        lock.release().await?;
        Ok(found)
    }

    /// The change log's newest id (0 when empty or on SQLite): where a starting node begins.
    pub async fn last_cluster_event(&self) -> Result<i64> {
        if self.backend() != Backend::Postgres {
            return Ok(0);
        }
        const OP: &str = "reading the change log";
        let row = sqlx::query("SELECT COALESCE(MAX(id), 0) FROM cluster_events")
            .fetch_one(self.pool())
            .await
            .map_err(query_err(OP))?;
        row.try_get(0).map_err(query_err(OP))
    }

    /// Change log entries with `id >= from`, in id order, at most `limit`.
    pub async fn cluster_events(&self, from: i64, limit: i64) -> Result<Vec<ClusterEvent>> {
        if self.backend() != Backend::Postgres {
            return Ok(Vec::new());
        }
        sqlx::query_as::<_, ClusterEvent>(
            "SELECT id, kind, serial, payload, created_at FROM cluster_events WHERE id >= $1 ORDER BY id LIMIT $2",
        )
        .bind(from)
        .bind(limit)
        .fetch_all(self.pool())
        .await
        .map_err(query_err("reading the change log"))
    }

    /// Deletes change log entries older than `before`; returns how many.
    pub async fn prune_cluster_events(&self, before: i64) -> Result<u64> {
        if self.backend() != Backend::Postgres {
            return Ok(0);
        }
        Ok(
            sqlx::query("DELETE FROM cluster_events WHERE created_at < $1")
                .bind(before)
                .execute(self.pool())
                .await
                .map_err(query_err("pruning the change log"))?
                .rows_affected(),
        )
    }
}
