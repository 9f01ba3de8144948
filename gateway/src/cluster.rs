//! What nodes sharing one PostgreSQL database agree on (CONTRACT §6, docs/cluster.md): the
//! one CA, and the change log through which a node learns, when woken by a `NOTIFY` or
//! within a poll interval, that a
//! device it holds connected again through another node (the older session is closed,
//! `taken_over`). Revocations need no entry of their own: every node already reads the
//! shared revocation set (`revocation.rs`).
//!
//! On SQLite (one node) the CA stays in the data directory exactly as before and nothing here
//! runs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tms_broker::{Broker, DisconnectReason};
use tms_certs::Ca;
use tms_model::SharedClock;
use tms_store::{ClusterEvent, EVENT_CONNECTED, SharedCa, Store};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::data_dir::absolute;

/// Loads the CA all nodes share, creating it when this is the first node. The first node
/// creates it (or offers the CA already in its data directory) while it holds the row lock
/// of `cluster_ca`, so nodes starting at the same instant wait for it and then read the
/// same CA. The key is stored encrypted with `TMS_CA_KEY_PASSPHRASE`; without one it stays
/// only in the first node's data directory and the other nodes refuse to start, saying so.
pub async fn shared_ca(
    store: &Store,
    ca_dir: &Path,
    passphrase: Option<String>,
    node_id: &str,
    clock: &SharedClock,
) -> Result<(Ca, bool)> {
    let lock = store
        .lock_shared_ca()
        .await
        .context("locking the shared CA")?;
    let local_fingerprint = local_fingerprint(ca_dir);
    let Some(found) = lock.found().cloned() else {
        let dir = ca_dir.to_owned();
        let phrase = passphrase.clone();
        let now = clock.now_utc();
        let (ca, created, key_pem) = tokio::task::spawn_blocking(move || {
            let (ca, created) = Ca::open(&dir, now, phrase.as_deref())?;
            let key = match phrase {
                Some(_) => Some(Ca::stored_key(&dir)?),
                None => None,
            };
            Ok::<_, tms_certs::CertError>((ca, created, key))
        })
        .await
        .context("CA task")?
        .context("loading the CA")?;
        let shared = SharedCa {
            cert_pem: ca.cert_pem().to_owned(),
            key_pem,
            fingerprint: ca.info().sha256_fingerprint.clone(),
            created_by: node_id.to_owned(),
        };
        lock.store(&shared, clock.now_ms())
            .await
            .context("storing the shared CA")?;
        tracing::info!(
            fingerprint = %shared.fingerprint,
            key_in_database = shared.key_pem.is_some(),
            "this node's CA is now the CA of every node sharing the database"
        );
        return Ok((ca, created));
    };
    if let Some(local) = &local_fingerprint
        && *local != found.fingerprint
    {
        lock.release().await.ok();
        bail!(
            "{} holds a CA (SHA-256 {local}) other than the one the nodes sharing this database \
             use (SHA-256 {}, made by node {}); devices it issued would be refused by the other \
             nodes. Move that ca/ directory away to join with the shared CA",
            absolute(ca_dir).display(),
            found.fingerprint,
            found.created_by
        );
    }
    let dir = ca_dir.to_owned();
    let phrase = passphrase.clone();
    let result = match (&found.key_pem, local_fingerprint.is_some()) {
        // The node that made the CA without a passphrase: its own files. When a passphrase is
        // set now, the key is encrypted in place and offered to the others below.
        (None, true) => {
            let loaded = tokio::task::spawn_blocking(move || {
                Ca::load_with(&dir, phrase.as_deref())
                    .and_then(|ca| Ok((ca, phrase.map(|_| Ca::stored_key(&dir)).transpose()?)))
            })
            .await
            .context("CA task")?
            .context("loading the CA");
            match loaded {
                Ok((ca, Some(key_pem))) => {
                    let shared = SharedCa {
                        key_pem: Some(key_pem),
                        ..found.clone()
                    };
                    lock.store(&shared, clock.now_ms())
                        .await
                        .context("storing the shared CA's key")?;
                    tracing::info!(
                        "the CA key is now in the database, encrypted with TMS_CA_KEY_PASSPHRASE: every node can sign"
                    );
                    return Ok((ca, false));
                }
                Ok((ca, None)) => Ok(ca),
                Err(e) => Err(e),
            }
        }
        (None, false) => Err(anyhow::anyhow!(
            "the CA of the nodes sharing this database was made by node {} without \
             TMS_CA_KEY_PASSPHRASE, so its key is only in that node's data directory and this \
             node cannot sign with it. Set the same TMS_CA_KEY_PASSPHRASE on every node and \
             restart node {} first (it then stores the key in the database, encrypted), then \
             this one. (Without a passphrase the key never leaves the first node's disk.)",
            found.created_by,
            found.created_by
        )),
        (Some(_), _) if passphrase.is_none() => Err(anyhow::anyhow!(
            "the CA key of the nodes sharing this database is stored encrypted: set \
             TMS_CA_KEY_PASSPHRASE on this node, the same as on node {}",
            found.created_by
        )),
        (Some(key_pem), _) => {
            let key_pem = key_pem.clone();
            let cert_pem = found.cert_pem.clone();
            tokio::task::spawn_blocking(move || {
                Ca::install(&dir, &cert_pem, &key_pem, phrase.as_deref())
            })
            .await
            .context("CA task")?
            .context("loading the shared CA from the database")
        }
    };
    lock.release().await.ok();
    Ok((result?, false))
}

/// The fingerprint of the CA certificate in `ca_dir`, if there is a readable one.
fn local_fingerprint(ca_dir: &Path) -> Option<String> {
    let pem = std::fs::read_to_string(ca_dir.join("ca.pem")).ok()?;
    let der = tms_certs::parse_certificates(&pem)
        .ok()?
        .into_iter()
        .next()?;
    Some(tms_certs::fingerprint_sha256(&der))
}

/// How often the change log is read unless `node.poll_ms` says otherwise. Far below the 1 s
/// the contract allows, and one indexed range read that usually finds nothing; on PostgreSQL
/// a `NOTIFY` wakes the follower sooner.
const POLL: Duration = Duration::from_millis(100);
/// An id the sequence handed out but that is not yet visible is waited for this long: the
/// transaction that took it may still commit (ids are taken at insert, seen at commit).
const GAP_WAIT: Duration = Duration::from_secs(10);
/// Entries read at most per poll.
const BATCH: i64 = 1000;
/// What the follower remembers about a device's sessions, at most this long.
const REMEMBER: Duration = Duration::from_secs(600);
/// Change log entries are deleted this long after they were written.
const KEEP: Duration = Duration::from_secs(3600);
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Follows the change log from its current end and applies it to this node's broker.
pub(crate) struct Follower {
    store: Store,
    broker: Arc<Broker>,
    node_id: String,
    /// The next id not yet seen.
    next: i64,
    /// Ids below `next` not seen yet, with when they were first missed.
    gaps: BTreeMap<i64, Instant>,
    /// The newest connect of each device: (entry id, session id).
    owner: HashMap<String, (i64, String, Instant)>,
    /// The entry id of each of this node's connects.
    ours: HashMap<String, (i64, Instant)>,
    /// Devices whose local session's own entry is not visible yet: decided when it is.
    pending: HashSet<String>,
    last_forget: Instant,
    /// Dates the change-log pruning.
    clock: SharedClock,
}

impl Follower {
    pub(crate) async fn start(
        store: Store,
        broker: Arc<Broker>,
        node_id: String,
        clock: SharedClock,
    ) -> Result<Self> {
        let next = store
            .last_cluster_event()
            .await
            .context("reading the change log")?
            + 1;
        Ok(Follower {
            store,
            broker,
            node_id,
            next,
            gaps: BTreeMap::new(),
            owner: HashMap::new(),
            ours: HashMap::new(),
            pending: HashSet::new(),
            last_forget: Instant::now(),
            clock,
        })
    }

    /// Polls every `poll` (default [`POLL`]), and at once when `woken` is notified: by the
    /// wake-up listener when another node wrote an entry (PostgreSQL `NOTIFY`), or when that
    /// listener reconnected and the log must be read in case one was missed.
    pub(crate) async fn run(
        mut self,
        stop: CancellationToken,
        woken: Arc<Notify>,
        poll: Option<Duration>,
    ) -> Result<()> {
        let poll = poll.unwrap_or(POLL);
        let mut last_prune = Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep(poll) => {}
                _ = woken.notified() => {}
            }
            if let Err(e) = self.poll_once().await {
                tracing::warn!(error = %e, "cannot read the change log; retrying");
            }
            if last_prune.elapsed() >= PRUNE_EVERY {
                last_prune = Instant::now();
                let before = self.clock.now_ms() - crate::node::millis(KEEP);
                match self.store.prune_cluster_events(before).await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(entries = n, "pruned the change log"),
                    Err(e) => tracing::warn!(error = %e, "cannot prune the change log"),
                }
            }
        }
    }

    /// Reads what is new in the change log and closes the local sessions it says were
    /// replaced by a newer connect elsewhere. Returns how many it closed.
    pub(crate) async fn poll_once(&mut self) -> Result<usize> {
        let now = Instant::now();
        self.gaps
            .retain(|_, since| now.duration_since(*since) < GAP_WAIT);
        let from = self
            .gaps
            .keys()
            .next()
            .copied()
            .unwrap_or(self.next)
            .min(self.next);
        let entries = self.store.cluster_events(from, BATCH).await?;
        let mut touched: HashSet<String> = std::mem::take(&mut self.pending);
        for entry in entries {
            if entry.id < self.next && self.gaps.remove(&entry.id).is_none() {
                continue;
            }
            if entry.id >= self.next {
                for missing in self.next..entry.id {
                    self.gaps.insert(missing, now);
                }
                self.next = entry.id + 1;
            }
            if let Some(serial) = self.learn(&entry, now) {
                touched.insert(serial);
            }
        }
        let mut closed = 0;
        for serial in touched {
            let Some(local) = self.broker.session_of(&serial) else {
                continue;
            };
            let Some((owner_id, owner_session, _)) = self.owner.get(&serial) else {
                continue;
            };
            if **owner_session == *local {
                continue;
            }
            match self.ours.get(&*local) {
                Some((ours, _)) if ours < owner_id => {
                    if self
                        .broker
                        .close_session(&serial, &local, DisconnectReason::TakenOver)
                    {
                        closed += 1;
                        tracing::info!(device.serial = %serial, "the device connected through another node; closed its older session here (taken_over)");
                    }
                }
                Some(_) => {}
                // Our own connect is not visible yet: which is newer is known once it is.
                None => {
                    self.pending.insert(serial);
                }
            }
        }
        if now.duration_since(self.last_forget) >= REMEMBER / 10 {
            self.last_forget = now;
            self.owner
                .retain(|_, (_, _, at)| now.duration_since(*at) < REMEMBER);
            self.ours
                .retain(|_, (_, at)| now.duration_since(*at) < REMEMBER);
        }
        Ok(closed)
    }

    /// Takes in one entry; returns the device it may concern.
    fn learn(&mut self, entry: &ClusterEvent, now: Instant) -> Option<String> {
        if entry.kind != EVENT_CONNECTED {
            return None;
        }
        #[derive(serde::Deserialize)]
        struct Connected {
            session: String,
            node: String,
        }
        let connected: Connected = match serde_json::from_str(&entry.payload) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(entry = entry.id, error = %e, "unreadable change log entry; skipped");
                return None;
            }
        };
        if connected.node == self.node_id {
            self.ours.insert(connected.session.clone(), (entry.id, now));
        }
        let newer = self
            .owner
            .get(&entry.serial)
            .is_none_or(|(id, _, _)| *id < entry.id);
        if newer {
            self.owner
                .insert(entry.serial.clone(), (entry.id, connected.session, now));
        }
        Some(entry.serial.clone())
    }
}
