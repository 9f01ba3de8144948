//! Keeps the broker's revoked-certificate set equal to the store's, so a revocation made by
//! any process or node (API, CLI, another gateway on the same PostgreSQL) is enforced within
//! a poll interval (at once when a PostgreSQL `NOTIFY` wakes it): new handshakes fail and live sessions with those certificates are closed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tms_broker::{Broker, DisconnectReason, RevokedSet};
use tms_store::Store;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub(crate) const POLL: Duration = Duration::from_millis(200);

/// Loads the full revoked set into `revoked`; returns the serials that were not in it before.
pub(crate) async fn reload(
    store: &Store,
    revoked: &RevokedSet,
) -> Result<HashSet<String>, tms_store::StoreError> {
    let all: HashMap<String, bool> = store
        .revocations()
        .await?
        .into_iter()
        .map(|(serial, _, reason)| (serial, reason.as_deref() == Some("superseded")))
        .collect();
    let before = revoked.load();
    let added = all
        .keys()
        .filter(|s| !before.contains_key(*s))
        .cloned()
        .collect();
    revoked.store(Arc::new(all));
    Ok(added)
}

/// How often rotation overlaps are ended and sessions with expired certificates closed.
const SWEEP: Duration = Duration::from_secs(5);
/// How often session history (and refused peers, quarantine, cleared alarms) past
/// `presence.history_retention_days` is deleted.
const PRUNE: Duration = Duration::from_secs(3600);

#[expect(
    clippy::too_many_arguments,
    reason = "the one caller (app.rs) names each; a struct for them is the app.rs split's job"
)]
pub(crate) async fn watch(
    store: Store,
    revoked: RevokedSet,
    broker: Arc<Broker>,
    changed: Arc<Notify>,
    rotation_overlap: Duration,
    history_retention: Duration,
    poll: Option<Duration>,
    clock: tms_model::SharedClock,
    stop: CancellationToken,
) {
    let poll = poll.unwrap_or(POLL);
    let mut marker = None;
    let mut last_sweep = tokio::time::Instant::now() - SWEEP;
    let mut last_prune: Option<tokio::time::Instant> = None;
    loop {
        // The sweep keeps its own pace whatever `poll` is; waking for it alone reads no marker.
        let sweep_only = tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(poll) => false,
            // A revocation made in this process, or another node's (its NOTIFY), or the
            // wake-up listener reconnected: apply it now, not at the next poll.
            _ = changed.notified() => false,
            _ = tokio::time::sleep_until(last_sweep + SWEEP) => marker.is_some(),
        };
        if last_sweep.elapsed() >= SWEEP {
            last_sweep = tokio::time::Instant::now();
            let now = clock.now_ms();
            let cutoff = now - i64::try_from(rotation_overlap.as_millis()).unwrap_or(i64::MAX);
            match store.end_overlaps(cutoff, now).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    certificates = n,
                    "rotation overlap ended; older certificates superseded"
                ),
                Err(e) => tracing::warn!(error = %e, "cannot end rotation overlaps"),
            }
            if last_prune.is_none_or(|p| p.elapsed() >= PRUNE) {
                last_prune = Some(tokio::time::Instant::now());
                let before = now - i64::try_from(history_retention.as_millis()).unwrap_or(i64::MAX);
                match store.prune_sessions(before).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(sessions = n, "pruned session history past its retention")
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot prune session history"),
                }
                match store
                    .prune_peer_refusals(before, tms_store::PEER_REFUSALS_KEPT)
                    .await
                {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(peers = n, "pruned records of refused peers"),
                    Err(e) => tracing::warn!(error = %e, "cannot prune refused peers"),
                }
                match store.prune_quarantine(before).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(
                        payloads = n,
                        "pruned quarantined payloads past their retention"
                    ),
                    Err(e) => tracing::warn!(error = %e, "cannot prune quarantine"),
                }
                // Only cleared alarms whose notices went out: an open alarm, or one still
                // waiting to be told, stays however old it is.
                match store.prune_alarms(before).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(alarms = n, "pruned cleared alarms past their retention")
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot prune alarms"),
                }
            }
            let closed = broker.close_expired(now / 1000);
            if closed > 0 {
                tracing::info!(
                    sessions = closed,
                    "closed sessions whose certificate expired"
                );
            }
        }
        if sweep_only {
            continue;
        }
        let current = match store.revocation_marker().await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read revocations; keeping the current set");
                continue;
            }
        };
        if marker == Some(current) {
            continue;
        }
        match reload(&store, &revoked).await {
            Ok(added) => {
                marker = Some(current);
                if !added.is_empty() {
                    let closed =
                        broker.close_sessions_with_certs(&added, DisconnectReason::Revoked);
                    tracing::info!(
                        revoked = added.len(),
                        sessions_closed = closed,
                        "revocations applied"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot reload revocations; keeping the current set")
            }
        }
    }
}
