//! PostgreSQL's NOTIFY as the nodes' wake-up (docs/cluster.md): two real `serve` processes on
//! a fresh schema of `TMS_TEST_DATABASE_URL` with the safety-net poll at 30 s
//! (`node.poll_ms`), so anything that arrives within a second came through the wake-up.
//! Skipped (passes trivially) without `TMS_TEST_DATABASE_URL`.

#![expect(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod support;

use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, EventLoop, Packet};
use support::*;

/// Far longer than any bound asserted below: only a wake-up can meet them.
const POLL_MS: &str = "30000";

async fn start_node(url: &str, n: usize) -> TestGateway {
    let id = format!("w{n}");
    TestGateway::start_with(&[
        ("TMS_DATABASE_URL", url),
        ("TMS_NODE_ID", &id),
        ("TMS_NODE_POLL_MS", POLL_MS),
        ("TMS_CA_KEY_PASSPHRASE", "notify-test-passphrase"),
    ])
    .await
}

/// Two nodes, started one after the other (the first makes the CA).
async fn two_nodes(name: &str) -> Option<(TestGateway, TestGateway)> {
    let url = fresh_postgres_url(name).await?;
    let a = start_node(&url, 1).await;
    let b = start_node(&url, 2).await;
    Some((a, b))
}

/// Connected and subscribed to its commands, on `port`.
async fn subscribed(port: u16, files: &DeviceFiles) -> (AsyncClient, EventLoop) {
    let (client, mut eventloop) = client_on(port, files);
    assert_eq!(
        connack(&mut eventloop).await.unwrap(),
        rumqttc::ConnectReturnCode::Success
    );
    subscribe_commands(&client, &mut eventloop, &files.serial).await;
    // The subscription itself wakes the delivery worker once; let that round pass so the
    // command below is found by a wake-up, not by it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    (client, eventloop)
}

/// Sends a command through `via`; returns how long until the device's session got it.
async fn command_takes(
    via: &TestGateway,
    token: &str,
    serial: &str,
    el: &mut EventLoop,
) -> Duration {
    let sent = Instant::now();
    let resp = reqwest::Client::new()
        .post(via.url(&format!("/api/v1/devices/{serial}/commands")))
        .bearer_auth(token)
        .json(&serde_json::json!({"name": "report_now", "args": {}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                assert_eq!(p.topic, format!("tms/{serial}/cmd/report_now"));
                return sent.elapsed();
            }
            Ok(Ok(_)) => {}
            other => panic!("the command did not arrive: {other:?}"),
        }
    }
}

/// Revokes through `via`'s CLI; returns how long until the session on the other node closed.
async fn revocation_takes(via: &TestGateway, serial: &str, mut el: EventLoop) -> Duration {
    let closed = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Disconnect)) | Err(_) => return Instant::now(),
                Ok(_) => {}
            }
        }
    });
    let revoked = Instant::now();
    via.cli(&["device", "revoke", serial]);
    let at = tokio::time::timeout(Duration::from_secs(10), closed)
        .await
        .expect("the revoked session is closed")
        .unwrap();
    at.saturating_duration_since(revoked)
}

/// With the poll at 30 s, a command sent and a revocation made through node 1 reach the
/// device's session on node 2 within a second: NOTIFY woke node 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_30_s_poll_commands_and_revocations_cross_nodes_within_a_second() {
    let Some((a, b)) = two_nodes("notify_wake").await else {
        return;
    };
    let token = admin_token(&a).await;
    let d = a.provision("RE4NT0001", "00:1B:2C:3D:6E:01");
    let (_client, mut el) = subscribed(b.mqtt_port(), &d).await;
    let took = command_takes(&a, &token, &d.serial, &mut el).await;
    eprintln!("command across nodes: {took:?}");
    assert!(took < Duration::from_secs(1), "command after {took:?}");

    let took = revocation_takes(&a, &d.serial, el).await;
    eprintln!("revocation across nodes: {took:?}");
    assert!(took < Duration::from_secs(1), "revocation after {took:?}");
}

/// The listener's backend killed by PostgreSQL: the node reconnects and catches up, so a
/// command and a revocation made right after still arrive long before the 30 s poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_listener_reconnects_and_events_still_arrive() {
    let Some((a, b)) = two_nodes("notify_kill").await else {
        return;
    };
    let token = admin_token(&a).await;
    let d = a.provision("RE4NT0002", "00:1B:2C:3D:6E:02");
    let (_client, mut el) = subscribed(b.mqtt_port(), &d).await;

    let base = std::env::var("TMS_TEST_DATABASE_URL").unwrap();
    sqlx::any::install_default_drivers();
    let db = sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(&base)
        .await
        .unwrap();
    // Node 2's listener is there, then killed.
    let listening = "SELECT COUNT(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN%' AND application_name = 'tms-wakeup w2'";
    wait_for("node 2 listening", Duration::from_secs(10), || async {
        let n: i64 = sqlx::query_scalar(listening).fetch_one(&db).await.unwrap();
        (n == 1).then_some(())
    })
    .await;
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%' AND application_name = 'tms-wakeup w2'",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(killed, vec![true], "node 2's listener was killed");

    let took = command_takes(&a, &token, &d.serial, &mut el).await;
    eprintln!("command after the listener was killed: {took:?}");
    assert!(took < Duration::from_secs(5), "command after {took:?}");
    wait_for(
        "node 2 listening again",
        Duration::from_secs(10),
        || async {
            let n: i64 = sqlx::query_scalar(listening).fetch_one(&db).await.unwrap();
            (n == 1).then_some(())
        },
    )
    .await;
    let took = revocation_takes(&a, &d.serial, el).await;
    assert!(took < Duration::from_secs(1), "revocation after {took:?}");
}
