//! The presence gate: how far the broker's CONNACKs may run ahead of the connects ingest
//! has committed.
//!
//! In a reconnect storm the handshakes finish faster than ingest writes the connects, and
//! the difference is how long the status page lags: a device has its CONNACK but shows
//! offline. The broker reports each connect it hands to ingest ([`PresenceGate::handed_over`]),
//! ingest reports the connects it has committed ([`PresenceGate::committed`]), and the
//! broker starts no new handshake while the connects not yet committed, plus the handshakes
//! it is already working on, fill the gate ([`PresenceGate::has_room`]). So the status lags
//! the CONNACKs by at most one gate's worth of ingest's work.
//!
//! Only connects count: telemetry queued behind them does not close the gate (ingest
//! commits connects ahead of it). While the store cannot take writes the gate stands open:
//! the connects wait for the store either way, and devices keep getting their CONNACK, as
//! they do without the gate.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::Notify;
use tokio::sync::futures::Notified;

/// Connects in flight (being handshaken, or not yet committed) at most, by default: about a
/// third of a second of ingest's connect rate on the 2-core machine, and room for the
/// handshakes to go on while ingest commits the batch before.
pub const PRESENCE_BACKLOG: usize = 512;

#[derive(Debug)]
pub struct PresenceGate {
    limit: usize,
    /// Connects handed to ingest and not yet committed by it.
    uncommitted: AtomicUsize,
    /// Set while the store cannot take writes.
    store_faulted: AtomicBool,
    /// Woken whenever connects are committed or the store's state changes.
    room: Notify,
}

impl PresenceGate {
    pub fn new(limit: usize) -> Self {
        PresenceGate {
            limit: limit.max(1),
            uncommitted: AtomicUsize::new(0),
            store_faulted: AtomicBool::new(false),
            room: Notify::new(),
        }
    }

    /// Whether a new handshake may start while `in_flight` others (admitted, not yet
    /// handed over) are under way.
    pub fn has_room(&self, in_flight: usize) -> bool {
        self.store_faulted.load(Ordering::Acquire)
            || self.uncommitted.load(Ordering::Acquire) + in_flight < self.limit
    }

    /// A future that completes at the next commit or change of the store's state. Made
    /// before [`PresenceGate::has_room`] is checked, it cannot miss one in between.
    pub fn changed(&self) -> Pin<Box<Notified<'_>>> {
        let mut notified = Box::pin(self.room.notified());
        // Registered now, not at its first poll.
        notified.as_mut().enable();
        notified
    }

    /// The broker hands a connect event to ingest.
    pub fn handed_over(&self) {
        self.uncommitted.fetch_add(1, Ordering::AcqRel);
    }

    /// Ingest committed `connects` connect events (or gave them up). More than were handed
    /// over is ignored, so connect events made elsewhere (a test, a replay) cannot widen the
    /// gate.
    pub fn committed(&self, connects: usize) {
        if connects == 0 {
            return;
        }
        let _ = self
            .uncommitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                Some(held.saturating_sub(connects))
            });
        self.room.notify_waiters();
    }

    /// Ingest found the store failing (`true`) or taking writes again (`false`).
    pub fn set_store_faulted(&self, faulted: bool) {
        if self.store_faulted.swap(faulted, Ordering::AcqRel) != faulted {
            self.room.notify_waiters();
        }
    }

    /// Connects handed to ingest and not yet committed.
    pub fn uncommitted(&self) -> usize {
        self.uncommitted.load(Ordering::Acquire)
    }
}

impl Default for PresenceGate {
    fn default() -> Self {
        PresenceGate::new(PRESENCE_BACKLOG)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn connects_not_yet_committed_and_handshakes_under_way_fill_the_gate() {
        let gate = PresenceGate::new(3);
        assert!(gate.has_room(2));
        assert!(
            !gate.has_room(3),
            "three handshakes under way fill a gate of 3"
        );
        gate.handed_over();
        gate.handed_over();
        assert!(gate.has_room(0));
        assert!(!gate.has_room(1));
        gate.committed(1);
        assert!(gate.has_room(1));
        // More commits than connects handed over do not make room beyond the limit.
        gate.committed(10);
        assert_eq!(gate.uncommitted(), 0);
        assert!(!gate.has_room(3));
    }

    #[test]
    fn a_failing_store_opens_the_gate() {
        let gate = PresenceGate::new(1);
        gate.handed_over();
        assert!(!gate.has_room(0));
        gate.set_store_faulted(true);
        assert!(gate.has_room(100));
        gate.set_store_faulted(false);
        assert!(!gate.has_room(0));
    }

    #[tokio::test]
    async fn a_waiter_is_woken_by_the_commit_that_makes_room() {
        let gate = Arc::new(PresenceGate::new(1));
        gate.handed_over();
        let waiter = {
            let gate = gate.clone();
            tokio::spawn(async move {
                loop {
                    let changed = gate.changed();
                    if gate.has_room(0) {
                        return;
                    }
                    changed.await;
                }
            })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        gate.committed(1);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the waiter saw the room the commit made")
            .expect("the waiter ran");
    }
}
