//! Ingest and the presence gate, on a real SQLite store: connects free their room when they
//! are committed, and a commit that hangs opens the gate until it ends, so a store that stops
//! answering (without refusing) cannot keep new devices out until the commit time-out.

#![expect(clippy::unwrap_used, reason = "test helpers fail the test loudly")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use tms_ingest::{AlarmSettings, Ingest, IngestSettings};
use tms_model::{BrokerEvent, DeviceSerial, PresenceGate, SystemClock};
use tms_store::Store;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn connected(serial: &str) -> BrokerEvent {
    BrokerEvent::Connected {
        serial: DeviceSerial::parse(serial).unwrap(),
        session_id: format!("s-{serial}").into(),
        peer: "127.0.0.1:5000".parse().unwrap(),
        cert_serial: "0a".into(),
        keep_alive_secs: 60,
        at_ms: 1_000,
    }
}

/// Waits until `done` holds, at most `within`; false if it never did.
async fn until(within: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    done()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_hangs_opens_the_gate_until_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let store = Store::open(&url).await.unwrap();
    // Every commit takes 3 s: a store that has stopped answering, for a while.
    store.set_write_delay(Duration::from_secs(3));
    let gate = Arc::new(PresenceGate::new(1));
    let (events, rx) = mpsc::channel(16);
    let ingest = Ingest::new(
        store.clone(),
        rx,
        IngestSettings {
            batch_max_rows: 100,
            flush_interval: Duration::ZERO,
            drain_timeout: Duration::from_secs(10),
            node_id: "n1".into(),
            alarms: AlarmSettings::default(),
            clock: SystemClock::shared(),
            presence: gate.clone(),
        },
    );
    let drain = CancellationToken::new();
    let running = tokio::spawn(ingest.run(drain.clone()));

    // One connect handed over fills a gate of one.
    let started = Instant::now();
    gate.handed_over();
    events.send(connected("RE4P0001")).await.unwrap();
    assert!(
        !gate.has_room(0),
        "a connect not yet committed fills the gate"
    );
    // The commit hangs: after about a second the gate opens, with the connect still
    // uncommitted.
    assert!(
        until(Duration::from_millis(2_500), || gate.has_room(0)).await,
        "the gate stayed closed behind a hanging commit"
    );
    assert!(
        started.elapsed() < Duration::from_millis(2_900),
        "opened by the commit's end, not by its stalling: {:?}",
        started.elapsed()
    );
    assert_eq!(gate.uncommitted(), 1, "the connect is not committed yet");
    // The commit ends: the connect's room is free, and the gate closes again when full.
    assert!(
        until(Duration::from_secs(10), || gate.uncommitted() == 0).await,
        "the committed connect freed its room"
    );
    gate.handed_over();
    assert!(
        !gate.has_room(0),
        "after the commit the gate counts connects again"
    );

    drain.cancel();
    drop(events);
    tokio::time::timeout(Duration::from_secs(20), running)
        .await
        .unwrap()
        .unwrap();
}
