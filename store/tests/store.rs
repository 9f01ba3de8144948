//! One store suite, run against SQLite always and against PostgreSQL when
//! `TMS_TEST_DATABASE_URL` is set (each test in a fresh schema).

#![expect(clippy::unwrap_used, reason = "test helpers fail the test loudly")]

use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::{Connection, Executor};
use tms_model::{ConnState, DeviceSerial, Mac};
use tms_store::*;

struct Backends {
    stores: Vec<Store>,
    _dir: tempfile::TempDir,
}

async fn backends() -> Backends {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let mut stores = vec![Store::open(&url).await.unwrap()];
    if let Ok(base) = std::env::var("TMS_TEST_DATABASE_URL") {
        sqlx::any::install_default_drivers();
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let schema = format!("t_{}_{}", std::process::id(), nanos);
        let mut conn = sqlx::AnyConnection::connect(&base).await.unwrap();
        conn.execute(format!("CREATE SCHEMA {schema}").as_str())
            .await
            .unwrap();
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}options=-c%20search_path%3D{schema}");
        let store = Store::open(&url).await.unwrap();
        assert_eq!(store.backend(), Backend::Postgres);
        stores.push(store);
    }
    Backends { stores, _dir: dir }
}

fn device(serial: &str, mac: &str, company: &str) -> NewDevice {
    NewDevice {
        serial: DeviceSerial::parse(serial).unwrap(),
        mac: Mac::parse(mac).unwrap(),
        company: company.into(),
        device_type: "RemotEye 4".into(),
        lease_months: 12,
        start_date: "2026-12-01".into(),
        lease_ends_at: 1_827_619_200_000,
        ups_model: Some("1600XP".into()),
        ups_model_number: None,
        ups_serial: Some("160300007".into()),
        ups_ship_date: None,
        sales_order: None,
        service_contract_sales_order: None,
        registered_by: None,
    }
}

#[tokio::test]
async fn devices_are_unique_by_serial_and_mac_in_any_spelling() {
    for store in backends().await.stores {
        store
            .add_device(&device("RE4A1", "00:1B:2C:3D:4E:5F", "Acme"), 1)
            .await
            .unwrap();
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
        store
            .add_device(&device("RE4A1", "00:1B:2C:3D:4E:5F", "Acme"), 1)
            .await
            .unwrap();
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
async fn telemetry_quarantine_and_location_are_stored_in_one_batch() {
    for store in backends().await.stores {
        store
            .add_device(&device("RE4A1", "00:1B:2C:3D:4E:5F", "Acme"), 1)
            .await
            .unwrap();
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
        store
            .add_device(&device("RE4A1", "00:1B:2C:3D:4E:5F", "Acme"), 1)
            .await
            .unwrap();
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
async fn certificates_and_accounts() {
    for store in backends().await.stores {
        store
            .add_device(&device("RE4A1", "00:1B:2C:3D:4E:5F", "Acme"), 1)
            .await
            .unwrap();
        for (sn, at) in [("0a01", 10), ("0a02", 20)] {
            store
                .add_certificate(&CertificateRecord {
                    serial_number: sn.into(),
                    device_serial: "RE4A1".into(),
                    sha256_fingerprint: "ff".into(),
                    not_before: 0,
                    not_after: 1_000,
                    issued_at: at,
                    revoked_at: None,
                    revocation_reason: None,
                })
                .await
                .unwrap();
        }
        assert_eq!(
            store.certificates_of("RE4A1").await.unwrap()[0].serial_number,
            "0a02"
        );
        let mut revoked = store
            .revoke_device_certificates("RE4A1", "operator", 50)
            .await
            .unwrap();
        revoked.sort();
        assert_eq!(revoked, vec!["0a01", "0a02"]);
        assert!(
            store
                .revoke_device_certificates("RE4A1", "operator", 60)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(store.revocations().await.unwrap().len(), 2);

        let user = NewUser {
            email: "Ops@Example.com".into(),
            role: "admin".into(),
            password_hash: "$argon2id$x".into(),
            first_name: None,
            last_name: None,
            phone: None,
            company_id: None,
            active: true,
            must_change_password: false,
        };
        let id = store.add_user(&user, 1).await.unwrap();
        let err = store
            .add_user(
                &NewUser {
                    email: "ops@example.COM".into(),
                    ..user.clone()
                },
                2,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Conflict {
                    what: "account email"
                }
            ),
            "{err}"
        );
        let found = store
            .user_by_email("OPS@example.com")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (found.id, found.active, found.role.as_str()),
            (id, true, "admin")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_login_attempts_reserve_at_most_the_limit_per_lock_window() {
    for store in backends().await.stores {
        let user = NewUser {
            email: "locked@example.com".into(),
            role: "provider".into(),
            password_hash: "$argon2id$x".into(),
            first_name: None,
            last_name: None,
            phone: None,
            company_id: None,
            active: true,
            must_change_password: false,
        };
        let id = store.add_user(&user, 1).await.unwrap();
        let attempts: Vec<_> = (0..40)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .reserve_login_attempt(id, 5, 1_000, 2_000)
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut reserved = 0;
        for a in attempts {
            reserved += usize::from(a.await.unwrap());
        }
        assert_eq!(reserved, 5, "{:?}", store.backend());
        let locked = store.user_by_id(id).await.unwrap().unwrap();
        assert_eq!(locked.locked_until, Some(2_000));
        assert!(
            !store
                .reserve_login_attempt(id, 5, 1_999, 9_000)
                .await
                .unwrap()
        );
        // The lock ran out: the count starts afresh.
        assert!(
            store
                .reserve_login_attempt(id, 5, 2_000, 9_000)
                .await
                .unwrap()
        );
        let after = store.user_by_id(id).await.unwrap().unwrap();
        assert_eq!(after.locked_until, None);
        store.reset_login_failures(id).await.unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_is_claimed_by_one_node_and_answered_only_by_its_device() {
    for store in backends().await.stores {
        let command = |id: &str, expires_at: i64| NewCommand {
            id: id.into(),
            serial: "RE4A000001".into(),
            name: "self_test".into(),
            args: "{}".into(),
            created_at: 1_000,
            created_by: "cli".into(),
            expires_at,
        };
        store.insert_command(&command("c1", 10_000)).await.unwrap();
        store.insert_command(&command("c2", 2_000)).await.unwrap();
        assert!(matches!(
            store.insert_command(&command("c1", 10_000)).await,
            Err(StoreError::Conflict { .. })
        ));
        let serials = ["RE4A000001".to_owned()];
        let pending = store.pending_commands(&serials, 1_500, 10).await.unwrap();
        assert_eq!(pending.len(), 2);

        // Two nodes race for c1, many times over: exactly one wins.
        let claims = futures_claims(&store, "c1").await;
        assert_eq!(
            claims.iter().filter(|(_, won)| *won).count(),
            1,
            "{claims:?}"
        );
        let winner = claims.iter().find(|(_, won)| *won).unwrap().0.clone();
        let loser = if winner == "a" { "b" } else { "a" };
        assert!(!store.command_delivered("c1", loser, 1_600).await.unwrap());
        assert!(!store.release_command("c1", loser).await.unwrap());
        assert!(store.command_delivered("c1", &winner, 1_600).await.unwrap());
        // Delivered is not queued again by a late "returned", nor expired.
        assert!(!store.release_command("c1", &winner).await.unwrap());
        assert_eq!(store.expire_commands(20_000).await.unwrap(), 1, "c2 only");
        assert_eq!(store.command("c2").await.unwrap().unwrap().state, "expired");
        assert!(!store.claim_command("c2", "a", 20_000).await.unwrap());

        // A reply is recorded for the device it was sent to, once.
        let reply = |serial: &str, ok: bool| ReplyRow {
            serial: serial.into(),
            command_id: "c1".into(),
            ok,
            payload: format!(r#"{{"id":"c1","ok":{ok}}}"#),
            at: 1_700,
        };
        for batch in [
            reply("RE4A000002", false),
            reply("RE4A000001", true),
            reply("RE4A000001", false),
        ] {
            store
                .write_batch(&WriteBatch {
                    replies: vec![batch],
                    ..WriteBatch::default()
                })
                .await
                .unwrap();
        }
        let c1 = store.command("c1").await.unwrap().unwrap();
        assert_eq!(c1.state, "succeeded");
        assert_eq!(c1.replied_at, Some(1_700));
        assert_eq!(c1.delivered_at, Some(1_600));
        let newest_first: Vec<String> = store
            .commands_of("RE4A000001", 10)
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(newest_first, ["c2", "c1"], "same time: id breaks the tie");
    }
}

/// Nodes `a` and `b` each try to claim `id` eight times at once.
async fn futures_claims(store: &Store, id: &str) -> Vec<(String, bool)> {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..16 {
        let store = store.clone();
        let id = id.to_owned();
        let node = if i % 2 == 0 { "a" } else { "b" };
        tasks.spawn(async move {
            let won = store.claim_command(&id, node, 1_500).await.unwrap();
            (node.to_owned(), won)
        });
    }
    tasks.join_all().await
}

#[tokio::test]
async fn a_node_id_is_held_by_one_live_process_and_a_lost_node_is_ended_once() {
    for store in backends().await.stores {
        // A live holder refuses another instance; the same data directory's earlier run, or
        // a holder silent past the cutoff, is not refused.
        assert_eq!(
            store.claim_node("n1", "a", None, 1_000, 0).await.unwrap(),
            Ok(())
        );
        assert_eq!(
            store.claim_node("n2", "x", None, 1_000, 0).await.unwrap(),
            Ok(())
        );
        let busy = store.claim_node("n1", "b", None, 2_000, 500).await.unwrap();
        assert_eq!(
            busy,
            Err(NodeBusy {
                last_heartbeat_at: 1_000
            })
        );
        assert_eq!(
            store
                .claim_node("n1", "b", Some("a"), 2_000, 500)
                .await
                .unwrap(),
            Ok(())
        );
        assert_eq!(
            store.heartbeat("n1", "a", 2_100).await.unwrap(),
            Heartbeat::Replaced
        );
        assert_eq!(
            store.heartbeat("n1", "b", 2_100).await.unwrap(),
            Heartbeat::Alive
        );

        // Two devices on n2; one of them has moved to n1 since.
        for (serial, mac) in [
            ("RE4N1", "00:1B:2C:3D:4E:01"),
            ("RE4N2", "00:1B:2C:3D:4E:02"),
        ] {
            store
                .add_device(&device(serial, mac, "Acme"), 1)
                .await
                .unwrap();
        }
        let connected = |serial: &str, sid: &str, node: &str, at| StatusEvent::Connected {
            serial: serial.into(),
            session_id: sid.into(),
            at,
            peer_addr: "127.0.0.1:5000".into(),
            keep_alive_secs: 30,
            cert_serial: "0a".into(),
            node_id: node.into(),
        };
        let batch = WriteBatch {
            status: vec![
                connected("RE4N1", "x-1", "n2", 1_100),
                connected("RE4N2", "x-2", "n2", 1_100),
                connected("RE4N2", "b-1", "n1", 2_200),
            ],
            ..Default::default()
        };
        store.write_batch(&batch).await.unwrap();

        // n2 silent since 1_000: the first sweep ends it, the second finds nothing to do.
        let lost = store.sweep_lost_nodes("n1", 2_500).await.unwrap();
        assert_eq!(
            lost,
            vec![LostNode {
                id: "n2".into(),
                last_heartbeat_at: 1_000,
                devices: 1
            }]
        );
        assert!(
            store
                .sweep_lost_nodes("n1", 2_500)
                .await
                .unwrap()
                .is_empty()
        );
        let gone = store.device("RE4N1").await.unwrap().unwrap().status;
        assert_eq!(gone.state, ConnState::Offline);
        assert_eq!(gone.last_disconnect_reason.as_deref(), Some("node_lost"));
        let moved = store.device("RE4N2").await.unwrap().unwrap().status;
        assert_eq!(
            moved.state,
            ConnState::Online,
            "a device that moved is untouched"
        );
        let sessions = store.sessions("RE4N2", 0, 10_000).await.unwrap();
        let ends: Vec<_> = sessions.iter().map(|s| s.end_reason.as_deref()).collect();
        assert_eq!(ends, vec![Some("node_lost"), None]);

        // The lost node, still running, finds out at its next heartbeat.
        assert_eq!(
            store.heartbeat("n2", "x", 2_600).await.unwrap(),
            Heartbeat::Revived
        );
        let nodes = store.nodes(2_000).await.unwrap();
        let view: Vec<_> = nodes
            .iter()
            .map(|n| (n.id.as_str(), n.state.as_str(), n.devices_online))
            .collect();
        assert_eq!(view, vec![("n1", "alive", 1), ("n2", "alive", 0)]);
        let nodes = store.nodes(2_700).await.unwrap();
        assert!(
            nodes.iter().all(|n| n.state == "dead"),
            "stale heartbeats read as dead: {nodes:?}"
        );
    }
}

/// Alarms on both backends: a raise replayed (a retried batch, a second node) stays one
/// record; the offline sweep honours the process start; a notice is mailed once, and a
/// webhook claim excludes a second claimer.
#[tokio::test]
async fn alarms_are_raised_once_swept_and_noticed_once() {
    for store in backends().await.stores {
        store
            .add_device(&device("RE4A1", "00:1B:2C:3D:4E:5F", "Acme"), 1)
            .await
            .unwrap();
        store
            .add_device(&device("RE4A2", "00:1B:2C:3D:4E:60", "Acme"), 1)
            .await
            .unwrap();
        let raise = AlarmChange::Raise {
            serial: "RE4A1".into(),
            code: "on_battery".into(),
            severity: "critical",
            at: 1_000,
            detail: r#"{"mode":"on_battery"}"#.into(),
        };
        let batch = WriteBatch {
            alarms: vec![raise.clone(), raise.clone()],
            ..Default::default()
        };
        store.write_batch(&batch).await.unwrap();
        store.write_batch(&batch).await.unwrap();
        let all = AlarmFilter {
            limit: 100,
            ..Default::default()
        };
        let list = store.alarms(&all).await.unwrap();
        assert_eq!(list.len(), 1, "{:?}", store.backend());
        assert_eq!(list[0].company, "Acme");
        assert_eq!(
            store.open_alarms(Some(&["RE4A1".into()])).await.unwrap(),
            vec![("RE4A1".to_owned(), "on_battery".to_owned())]
        );

        // The notice: mailed once; a second attempt finds nothing left to mail.
        let due = store
            .notice_due_companies(Channel::Email, 2_000, 2_000)
            .await
            .unwrap();
        assert_eq!(due.len(), 1);
        let group = store
            .notice_group(Channel::Email, due[0], None)
            .await
            .unwrap();
        assert_eq!((group.devices, group.events.len()), (2, 1));
        assert!(
            store
                .queue_alarm_mail(&group, &[], false, 2_000)
                .await
                .unwrap()
        );
        assert!(
            !store
                .queue_alarm_mail(&group, &[], false, 2_001)
                .await
                .unwrap()
        );
        // The webhook: one claimer holds the rows until it finishes.
        assert_eq!(
            store
                .claim_webhook(due[0], "a", 2_000, 60_000)
                .await
                .unwrap(),
            1
        );
        assert_eq!(
            store
                .claim_webhook(due[0], "b", 2_000, 60_000)
                .await
                .unwrap(),
            0
        );
        let held = store
            .notice_group(Channel::Webhook, due[0], Some("a"))
            .await
            .unwrap();
        store
            .finish_webhook("a", &held.events, false, 2_100, 5_000)
            .await
            .unwrap();
        assert!(
            store
                .notice_due_companies(Channel::Webhook, 3_000, 3_000)
                .await
                .unwrap()
                .is_empty(),
            "waits for its retry"
        );
        assert_eq!(
            store
                .claim_webhook(due[0], "b", 5_000, 60_000)
                .await
                .unwrap(),
            1
        );
        store
            .finish_webhook("b", &held.events, true, 5_100, 0)
            .await
            .unwrap();
        assert!(
            store
                .notice_due_companies(Channel::Webhook, 9_000, 9_000)
                .await
                .unwrap()
                .is_empty()
        );

        // The clear closes it; acknowledging keeps the first acknowledger.
        let clear = WriteBatch {
            alarms: vec![AlarmChange::Clear {
                serial: "RE4A1".into(),
                code: "on_battery".into(),
                at: 3_000,
            }],
            ..Default::default()
        };
        store.write_batch(&clear).await.unwrap();
        assert!(store.open_alarms(None).await.unwrap().is_empty());
        let id = list[0].id;
        assert!(
            store
                .acknowledge_alarm(id, "ana@example.com", 4_000)
                .await
                .unwrap()
        );
        assert!(
            store
                .acknowledge_alarm(id, "bob@example.com", 5_000)
                .await
                .unwrap()
        );
        let (a, _) = store.alarm(id).await.unwrap().unwrap();
        assert_eq!(
            (a.cleared_at, a.acknowledged_by.as_deref()),
            (Some(3_000), Some("ana@example.com"))
        );

        // device_offline: RE4A2 went offline at 10 s because the gateway stopped; this
        // process started at 20 s, so with a 5 s window nothing is due before 25 s.
        let session = |reason: &str| {
            vec![
                StatusEvent::Connected {
                    serial: "RE4A2".into(),
                    session_id: "s2".into(),
                    at: 5_000,
                    peer_addr: "127.0.0.1:5000".into(),
                    keep_alive_secs: 30,
                    cert_serial: "0b".into(),
                    node_id: "n1".into(),
                },
                StatusEvent::Disconnected {
                    serial: "RE4A2".into(),
                    session_id: "s2".into(),
                    at: 10_000,
                    reason: reason.into(),
                },
            ]
        };
        store
            .write_batch(&WriteBatch {
                status: session("server_shutdown"),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            store
                .sweep_offline(24_000 - 5_000, 20_000, 24_000)
                .await
                .unwrap()
                .0,
            0
        );
        assert_eq!(
            store
                .sweep_offline(25_000 - 5_000, 20_000, 25_000)
                .await
                .unwrap()
                .0,
            1
        );
        assert_eq!(
            store
                .sweep_offline(26_000 - 5_000, 20_000, 26_000)
                .await
                .unwrap()
                .0,
            0,
            "once"
        );
        let counts = store.active_alarm_counts().await.unwrap();
        assert_eq!(counts, vec![("device_offline".to_owned(), 1)]);
    }
}
