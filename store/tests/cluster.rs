//! Several nodes on one database, on every backend (see `common`): command claims and
//! replies, node ids held by one live process, lost nodes ended once.

#![expect(clippy::unwrap_used, reason = "test helpers fail the test loudly")]

mod common;

use common::{add_device, backends};
use tms_model::ConnState;
use tms_store::*;

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
            add_device(&store, serial, mac).await;
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
