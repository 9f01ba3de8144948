//! What ingest writes in a batch, on every backend (see `common`): telemetry, quarantine
//! and location together, device refusals and refused peers, coalesced.

#![expect(clippy::unwrap_used, reason = "test helpers fail the test loudly")]

mod common;
#[path = "common/status.rs"]
mod status;

use common::{add_device, backends};
use status::write_status;
use tms_model::ConnState;
use tms_store::*;

#[tokio::test]
async fn telemetry_quarantine_and_location_are_stored_in_one_batch() {
    for store in backends().await.stores {
        add_device(&store, "RE4A1", "00:1B:2C:3D:4E:5F").await;
        let telemetry = (0..450)
            .map(|i| TelemetryRow {
                serial: "RE4A1".into(),
                ts: 1_000 + i,
                received_at: 2_000 + i,
                mode: Some("online".into()),
                load_pct: Some(i as f64),
                battery_charge_pct: None,
                payload: format!("{{\"load_pct\":{i}}}"),
            })
            .collect();
        let batch = WriteBatch {
            telemetry,
            quarantine: vec![QuarantineRow {
                serial: "RE4A1".into(),
                topic: "tms/RE4A1/telemetry".into(),
                payload: b"{not json".to_vec(),
                error: "expected value".into(),
                received_at: 5,
            }],
            locations: vec![LocationRow {
                serial: "RE4A1".into(),
                lat: 29.76,
                lon: -95.37,
                accuracy_m: Some(10.0),
                source: "device".into(),
                at: 7,
            }],
            ..Default::default()
        };
        store.write_batch(&batch).await.unwrap();
        assert_eq!(store.telemetry_count("RE4A1").await.unwrap(), 450);
        let newest = store.telemetry("RE4A1", 2).await.unwrap();
        assert_eq!(newest[0].ts, 1_449);
        assert_eq!(newest[0].payload["load_pct"], 449);
        assert_eq!(newest[1].ts, 1_448);
        let q = store.quarantined("RE4A1", 10).await.unwrap();
        assert_eq!(q[0].2, b"{not json".to_vec());
        let loc = store.location("RE4A1").await.unwrap().unwrap();
        assert_eq!(
            (loc.lat, loc.lon, loc.source.as_str()),
            (29.76, -95.37, "device")
        );
    }
}

#[tokio::test]
async fn refusals_are_recorded_for_registered_devices_only_and_coalesced() {
    for store in backends().await.stores {
        add_device(&store, "RE4A1", "00:1B:2C:3D:4E:5F").await;
        let refusal = |serial: &str, reason: &str, at| RefusalRow {
            serial: serial.into(),
            reason: reason.into(),
            detail: "detail".into(),
            peer_addr: Some("10.0.0.1:1".into()),
            first_at: at,
            last_at: at,
            attempts: 3,
        };
        let batch = WriteBatch {
            refusals: vec![
                refusal("RE4A1", "expired", 100),
                refusal("STRANGER", "unknown_ca", 100),
            ],
            ..Default::default()
        };
        store.write_batch(&batch).await.unwrap();
        let batch = WriteBatch {
            refusals: vec![refusal("RE4A1", "expired", 200)],
            ..Default::default()
        };
        store.write_batch(&batch).await.unwrap();
        let refusals = store.refusals("RE4A1", 10).await.unwrap();
        assert_eq!(refusals.len(), 1, "{refusals:?}");
        assert_eq!(
            (
                refusals[0].attempts,
                refusals[0].first_at,
                refusals[0].last_at
            ),
            (6, 100, 200)
        );
        assert!(store.refusals("STRANGER", 10).await.unwrap().is_empty());
        let status = store.device("RE4A1").await.unwrap().unwrap().status;
        assert_eq!(status.state, ConnState::NeverConnected);
        assert_eq!(status.last_connect_error.as_deref(), Some("expired"));
        assert_eq!(status.last_connect_error_at, Some(200));
    }
}

#[tokio::test]
async fn refused_peers_are_coalesced_and_trimmed_as_they_are_written() {
    for store in backends().await.stores {
        let peer = |i: i64, attempts| PeerRefusal {
            peer_ip: format!("10.0.{}.{}", i / 256, i % 256),
            peer_addr: format!("10.0.{}.{}:4000", i / 256, i % 256),
            reason: "server_name_mismatch".into(),
            detail: format!("try {i}"),
            first_at: i,
            last_at: i,
            attempts,
        };
        let flood = WriteBatch {
            peer_refusals: (0..1200).map(|i| peer(i, 1)).collect(),
            ..WriteBatch::default()
        };
        store.write_batch(&flood).await.unwrap();
        // The same peer again: one row, attempts added up.
        let again = WriteBatch {
            peer_refusals: vec![peer(1199, 4)],
            ..WriteBatch::default()
        };
        store.write_batch(&again).await.unwrap();
        let kept = store.peer_refusals(1000).await.unwrap();
        assert_eq!(kept.len(), PEER_REFUSALS_KEPT as usize);
        assert_eq!((kept[0].detail.as_str(), kept[0].attempts), ("try 1199", 5));
        assert_eq!(kept.last().unwrap().last_at, 200, "the oldest 200 went");
        assert_eq!(
            store
                .prune_peer_refusals(0, PEER_REFUSALS_KEPT)
                .await
                .unwrap(),
            0,
            "nothing left over for housekeeping: the write trimmed it"
        );
    }
}

/// `n` telemetry rows of `serial` from time `from`, about 200 bytes each.
fn telemetry(serial: &str, from: i64, n: i64) -> WriteBatch {
    WriteBatch {
        telemetry: (from..from + n)
            .map(|ts| TelemetryRow {
                serial: serial.into(),
                ts,
                received_at: ts,
                mode: Some("online".into()),
                load_pct: Some(42.0),
                battery_charge_pct: Some(100.0),
                payload: format!(
                    r#"{{"mode":"online","load_pct":42,"battery":{{"charge_pct":100,"runtime_min":40}},"input":{{"voltage":229.8,"frequency_hz":50}},"n":{ts}}}"#
                ),
            })
            .collect(),
        ..WriteBatch::default()
    }
}

/// The periodic WAL checkpoint reads its answer row on SQLite (and is a no-op on
/// PostgreSQL); a row it cannot read would fail every tick of the gateway's checkpoint task.
/// It counts ingest's commits in between for the gateway's checkpoint task.
#[tokio::test]
async fn the_write_ahead_log_checkpoint_succeeds_on_every_backend() {
    for store in backends().await.stores {
        add_device(&store, "RE4A9", "00:1B:2C:3D:4E:59").await;
        store.write_batch(&telemetry("RE4A9", 0, 10)).await.unwrap();
        let frames = store.checkpoint().await.unwrap();
        match store.backend() {
            Backend::Sqlite => {
                assert!(frames > 0, "the log holds the batch's pages");
                assert_eq!(store.commits_since_checkpoint(), 0);
                store
                    .write_batch(&telemetry("RE4A9", 10, 10))
                    .await
                    .unwrap();
                assert_eq!(store.commits_since_checkpoint(), 1);
            }
            Backend::Postgres => assert_eq!(frames, 0),
        }
    }
}

/// Under steady load a checkpoint beside ingest never copies the whole log (ingest commits
/// while it runs), and the log restarts only from a commit that finds it copied whole: it
/// grew without end (110 MB after seconds at 5,000 msg/s). Here a reader holds the log while
/// it grows, as ingest's own commits do; once the checkpoint has seen it long, ingest copies
/// the rest after its next batch and the log starts again.
#[tokio::test]
async fn a_long_write_ahead_log_is_restarted_by_ingest() {
    use sqlx::Connection as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let store = Store::open(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    add_device(&store, "RE4B1", "00:1B:2C:3D:4E:60").await;
    let mut reader = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut reader).await.unwrap();
    sqlx::query("SELECT count(*) FROM devices")
        .fetch_one(&mut reader)
        .await
        .unwrap();
    let mut ts = 0;
    let mut frames = 0;
    while frames < WAL_RESTART_FRAMES {
        for _ in 0..10 {
            store
                .write_batch(&telemetry("RE4B1", ts, 200))
                .await
                .unwrap();
            ts += 200;
        }
        frames = store.checkpoint().await.unwrap();
        assert!(
            ts < 2_000_000,
            "the log never reached {WAL_RESTART_FRAMES} pages"
        );
    }
    sqlx::query("COMMIT").execute(&mut reader).await.unwrap();
    reader.close().await.unwrap();

    // After the batch that follows the checkpoint that saw the long log, ingest copies the
    // rest; the next batch starts the log from its beginning.
    for _ in 0..2 {
        store
            .write_batch(&telemetry("RE4B1", ts, 10))
            .await
            .unwrap();
        store.restart_wal_if_due().await;
        ts += 10;
    }
    let after = store.checkpoint().await.unwrap();
    assert!(
        after < 100,
        "the log restarted: {after} pages after it, {frames} before"
    );
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM telemetry")
        .fetch_one(
            &mut sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
                .await
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(stored, ts, "every row is there");
}

/// A connect storm makes one batch of hundreds of connects, several statements each. On
/// SQLite the writer sends its script every 256 statements (one script of 33,000 statements
/// held 10 MB of prepared statements at once); the pieces still make one transaction.
#[tokio::test]
async fn a_batch_of_many_connects_is_written_whole_in_pieces() {
    for store in backends().await.stores {
        let serials: Vec<String> = (0..300).map(|i| format!("RE4S{i:04}")).collect();
        for (i, serial) in serials.iter().enumerate() {
            add_device(
                &store,
                serial,
                &format!("02:00:00:00:{:02X}:{:02X}", i / 256, i % 256),
            )
            .await;
        }
        let status = serials
            .iter()
            .enumerate()
            .map(|(i, serial)| StatusEvent::Connected {
                serial: serial.clone(),
                session_id: format!("s{i}"),
                at: 1_000 + i as i64,
                peer_addr: "127.0.0.1:5000".into(),
                keep_alive_secs: 30,
                cert_serial: "0a".into(),
                node_id: "n1".into(),
            })
            .collect();
        write_status(&store, status).await;
        for (i, serial) in serials.iter().enumerate() {
            let view = store.device(serial).await.unwrap().unwrap();
            assert_eq!(view.status.state, ConnState::Online, "{serial}");
            assert_eq!(view.status.session_id, Some(format!("s{i}")), "{serial}");
        }
    }
}

/// Ingest writes through a connection of its own (not the pool's), which would see a
/// database of its own in memory: such a URL is refused, naming itself.
#[tokio::test]
async fn an_in_memory_sqlite_database_is_refused_with_the_url_named() {
    for url in ["sqlite::memory:", "sqlite://?mode=memory"] {
        let Err(e) = Store::open(url).await else {
            panic!("{url} was accepted");
        };
        let told = format!(
            "{e}: {}",
            std::error::Error::source(&e)
                .map(ToString::to_string)
                .unwrap_or_default()
        );
        assert!(told.contains(url) && told.contains("in-memory"), "{told}");
    }
}
