//! Devices on every backend (see `common`): registration, uniqueness of serial and MAC,
//! and the connection status that sessions drive.

#![expect(clippy::unwrap_used, reason = "test helpers fail the test loudly")]

mod common;
#[path = "common/status.rs"]
mod status;

use common::{add_device, backends, device};
use status::write_status;
use tms_model::ConnState;
use tms_store::*;

#[tokio::test]
async fn devices_are_unique_by_serial_and_mac_in_any_spelling() {
    for store in backends().await.stores {
        add_device(&store, "RE4A1", "00:1B:2C:3D:4E:5F").await;
        let err = store
            .add_device(&device("RE4A1", "00:1B:2C:3D:4E:60", "Acme"), 2)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Conflict {
                    what: "device serial"
                }
            ),
            "{err}"
        );
        let err = store
            .add_device(&device("RE4A2", "001b2c3d4e5f", "Other"), 2)
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Conflict { what: "device MAC" }),
            "{err}"
        );
        store
            .add_device(&device("RE4A2", "00-1B-2C-3D-4E-61", "Acme"), 3)
            .await
            .unwrap();

        let all = store.devices(&DeviceFilter::default()).await.unwrap();
        assert_eq!(
            all.len(),
            2,
            "{:?}: the failed inserts left nothing behind",
            store.backend()
        );
        assert_eq!(
            all[0].device.company_id, all[1].device.company_id,
            "one company, found by name"
        );
        assert_eq!(all[1].device.mac, "00:1B:2C:3D:4E:61");
        assert_eq!(all[0].status.state, ConnState::NeverConnected);
        let found = store
            .devices(&DeviceFilter {
                q: Some("re4a2".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(found.len(), 1);
    }
}

#[tokio::test]
async fn status_follows_sessions_and_a_taken_over_session_cannot_mark_offline() {
    for store in backends().await.stores {
        add_device(&store, "RE4A1", "00:1B:2C:3D:4E:5F").await;
        let connected = |sid: &str, at| StatusEvent::Connected {
            serial: "RE4A1".into(),
            session_id: sid.into(),
            at,
            peer_addr: "127.0.0.1:5000".into(),
            keep_alive_secs: 30,
            cert_serial: "0a".into(),
            node_id: "n1".into(),
        };
        let disconnected = |sid: &str, at, reason: &str| StatusEvent::Disconnected {
            serial: "RE4A1".into(),
            session_id: sid.into(),
            at,
            reason: reason.into(),
        };
        let batch = WriteBatch {
            status: vec![
                connected("s1", 10),
                connected("s2", 20),
                disconnected("s1", 21, "taken_over"),
            ],
            ..Default::default()
        };
        store.write_batch(&batch).await.unwrap();
        let view = store.device("RE4A1").await.unwrap().unwrap();
        assert_eq!(view.status.state, ConnState::Online);
        assert_eq!(view.status.since, Some(20));
        assert_eq!(view.status.session_id.as_deref(), Some("s2"));

        let batch = WriteBatch {
            status: vec![
                StatusEvent::Seen {
                    serial: "RE4A1".into(),
                    session_id: "s2".into(),
                    at: 25,
                },
                disconnected("s2", 30, "client_disconnect"),
            ],
            ..Default::default()
        };
        store.write_batch(&batch).await.unwrap();
        let status = store.device("RE4A1").await.unwrap().unwrap().status;
        assert_eq!(status.state, ConnState::Offline);
        assert_eq!(status.since, Some(30));
        assert_eq!(status.last_seen, Some(25));
        assert_eq!(
            status.last_disconnect_reason.as_deref(),
            Some("client_disconnect")
        );
        let offline = store
            .devices(&DeviceFilter {
                state: Some(ConnState::Offline),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(offline.len(), 1);
    }
}

#[tokio::test]
async fn last_seen_and_telemetry_intervals_of_many_devices_in_one_batch_are_each_their_own() {
    for store in backends().await.stores {
        let serials: Vec<String> = (0..12).map(|i| format!("RE4G{i:02}")).collect();
        let mut status = Vec::new();
        for (i, serial) in serials.iter().enumerate() {
            add_device(&store, serial, &format!("00:1B:2C:3D:5E:{i:02X}")).await;
            status.push(StatusEvent::Connected {
                serial: serial.clone(),
                session_id: format!("s-{serial}"),
                at: 1_000,
                peer_addr: "127.0.0.1:5000".into(),
                keep_alive_secs: 30,
                cert_serial: "0a".into(),
                node_id: "n1".into(),
            });
        }
        write_status(&store, status).await;
        // Device i: seen at 2,000 + i, 5 messages 100 × (i + 1) ms apart. The last device's
        // update names an old session, which must not move its last seen.
        let activity = |base: i64| {
            let mut status = Vec::new();
            for (i, serial) in serials.iter().enumerate() {
                let gap = 100 * (i as i64 + 1);
                let session = if i == 11 {
                    "old".to_owned()
                } else {
                    format!("s-{serial}")
                };
                status.push(StatusEvent::Seen {
                    serial: serial.clone(),
                    session_id: session,
                    at: base + i as i64,
                });
                status.push(StatusEvent::Telemetry {
                    serial: serial.clone(),
                    first_at: base - 4 * gap,
                    last_at: base,
                    count: 5,
                });
            }
            WriteBatch {
                status,
                ..Default::default()
            }
        };
        store.write_batch(&activity(10_000)).await.unwrap();
        // An older batch replayed changes nothing.
        store.write_batch(&activity(9_000)).await.unwrap();
        for (i, serial) in serials.iter().enumerate() {
            let s = store.device(serial).await.unwrap().unwrap().status;
            let seen = if i == 11 { 1_000 } else { 10_000 + i as i64 };
            assert_eq!(s.last_seen, Some(seen), "{serial}: last seen");
            assert_eq!(
                s.telemetry_interval_ms,
                Some(100 * (i as i64 + 1)),
                "{serial}: telemetry interval"
            );
        }
    }
}
