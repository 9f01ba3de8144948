//! Several nodes on one PostgreSQL (CONTRACT §6): three real `serve` processes on a fresh
//! schema of `TMS_TEST_DATABASE_URL`, behind Debian's HAProxy in TCP mode, with real mTLS
//! clients. Skipped (passes trivially) without `TMS_TEST_DATABASE_URL`; scripts/test installs
//! haproxy and CI sets the URL.

#![expect(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod support;

use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rumqttc::{Event, Packet, QoS};
use sqlx::Row;
use support::*;

const PASSPHRASE: &str = "cluster-test-passphrase";

/// The environment of node `n` (1-based) on the shared database.
fn node_env(url: &str, n: usize) -> Vec<(String, String)> {
    [
        ("TMS_DATABASE_URL", url.to_owned()),
        ("TMS_NODE_ID", format!("n{n}")),
        ("TMS_NODE_HEARTBEAT_SECS", "1".to_owned()),
        ("TMS_NODE_DEAD_AFTER_SECS", "3".to_owned()),
        ("TMS_CA_KEY_PASSPHRASE", PASSPHRASE.to_owned()),
    ]
    .map(|(k, v)| (k.to_owned(), v))
    .to_vec()
}

async fn start_node(url: &str, n: usize) -> TestGateway {
    let env = node_env(url, n);
    let extra: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    TestGateway::start_with(&extra).await
}

/// A port nobody listens on right now (HAProxy needs explicit ports).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// HAProxy in TCP (pass-through) mode in front of `backends` (MQTT port, HTTP port), round
/// robin, each checked on its `/readyz` as deploy/haproxy.cfg does; a connection to a node
/// that is down is tried on the next one.
struct Balancer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Balancer {
    async fn start(backends: &[(u16, u16)]) -> Balancer {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut cfg = format!(
            "global\n  maxconn 1000\ndefaults\n  mode tcp\n  timeout connect 1s\n  timeout client 60s\n  timeout server 60s\n  retries 3\n  option redispatch 1\n\
             frontend mqtt\n  bind 127.0.0.1:{port}\n  default_backend nodes\nbackend nodes\n  balance roundrobin\n  option httpchk GET /readyz\n"
        );
        for (i, (mqtt, http)) in backends.iter().enumerate() {
            cfg.push_str(&format!(
                "  server n{} 127.0.0.1:{mqtt} check port {http} inter 500ms fall 2 rise 1\n",
                i + 1
            ));
        }
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, cfg).unwrap();
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy (scripts/test installs it)");
        wait_for("haproxy listening", Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        })
        .await;
        Balancer {
            child,
            port,
            _dir: dir,
        }
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects (CONNACK accepted) and keeps the session running until the server closes it;
/// the task then ends (no reconnect) and returns when that happened.
async fn connect(port: u16, files: &DeviceFiles) -> tokio::task::JoinHandle<Instant> {
    let (client, mut eventloop) = client_on(port, files);
    let code = connack(&mut eventloop).await.unwrap();
    assert_eq!(
        code,
        rumqttc::ConnectReturnCode::Success,
        "{}",
        files.serial
    );
    tokio::spawn(async move {
        let _client = client;
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Disconnect)) | Err(_) => return Instant::now(),
                Ok(_) => {}
            }
        }
    })
}

/// The shared database, read directly: what every node recorded.
struct Db(sqlx::AnyPool);

/// A device's status row as the nodes left it.
#[derive(Debug, Clone, PartialEq)]
struct Status {
    state: String,
    node: Option<String>,
    session: Option<String>,
    reason: Option<String>,
}

impl Db {
    async fn open(url: &str) -> Db {
        sqlx::any::install_default_drivers();
        Db(sqlx::any::AnyPoolOptions::new()
            .max_connections(2)
            .connect(url)
            .await
            .unwrap())
    }

    async fn status(&self, serial: &str) -> Option<Status> {
        let row = sqlx::query(
            "SELECT state, node_id, session_id, last_disconnect_reason FROM device_status WHERE serial = $1",
        )
        .bind(serial)
        .fetch_optional(&self.0)
        .await
        .unwrap()?;
        Some(Status {
            state: row.get(0),
            node: row.get(1),
            session: row.get(2),
            reason: row.get(3),
        })
    }

    /// `(session_id, node_id)` of the device's sessions not ended.
    async fn open_sessions(&self, serial: &str) -> Vec<(String, String)> {
        sqlx::query("SELECT session_id, node_id FROM device_sessions WHERE serial = $1 AND ended_at IS NULL")
            .bind(serial)
            .fetch_all(&self.0)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    async fn end_reason(&self, session: &str) -> Option<String> {
        sqlx::query("SELECT end_reason FROM device_sessions WHERE session_id = $1")
            .bind(session)
            .fetch_one(&self.0)
            .await
            .unwrap()
            .get(0)
    }

    /// Waits until the device is online through a session other than `not`; returns its
    /// node and session.
    async fn online(&self, serial: &str, not: Option<&str>) -> (String, String) {
        wait_for(
            &format!("{serial} online"),
            Duration::from_secs(10),
            || async {
                let r = self.status(serial).await?;
                (r.state == "online" && r.session.as_deref() != not)
                    .then(|| (r.node.unwrap(), r.session.unwrap()))
            },
        )
        .await
    }
}

fn fingerprint_line(out: &str) -> String {
    out.lines()
        .find(|l| l.starts_with("sha256:"))
        .unwrap_or_else(|| panic!("no fingerprint in `ca show`: {out}"))
        .to_owned()
}

/// The whole story of CONTRACT §6 on three nodes: one CA made by nodes starting at once,
/// certificates of node 1 accepted by every node directly and through the balancer, a
/// revocation on node 2 closing a session on node 3 within a second, a takeover through
/// another node leaving one session open and the device online throughout, a command sent
/// through node 1 delivered to a device on node 3 and its reply read through node 2, and a node
/// killed with SIGKILL having its devices marked offline `node_lost` and back online once
/// they reconnect through the balancer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_behind_haproxy_share_one_ca_revocations_takeovers_and_node_loss() {
    let Some(url) = fresh_postgres_url("cluster").await else {
        return;
    };
    let db = Db::open(&url).await;

    // All three at the same instant: exactly one CA.
    let (n1, n2, n3) = tokio::join!(
        start_node(&url, 1),
        start_node(&url, 2),
        start_node(&url, 3)
    );
    let mut nodes = vec![n1, n2, n3];
    let cas: HashSet<String> = nodes
        .iter()
        .map(|n| read(&n.data_dir().join("ca/ca.pem")))
        .collect();
    assert_eq!(cas.len(), 1, "every node has the same CA certificate");
    let shown: HashSet<String> = nodes
        .iter()
        .map(|n| fingerprint_line(&n.cli(&["ca", "show"])))
        .collect();
    assert_eq!(
        shown.len(),
        1,
        "`ca show` prints one fingerprint on every node: {shown:?}"
    );
    let makers = nodes
        .iter()
        .filter(|n| n.log().contains("is now the CA of every node"))
        .count();
    assert_eq!(makers, 1, "exactly one node created the CA");
    let ports: Vec<u16> = nodes.iter().map(|n| n.mqtt_port()).collect();
    let backends: Vec<(u16, u16)> = nodes
        .iter()
        .map(|n| (n.mqtt_port(), n.ports.http.port()))
        .collect();
    let lb = Balancer::start(&backends).await;

    // Issued on node 1; accepted by each node directly.
    let devices: Vec<DeviceFiles> = (1..=6)
        .map(|i| nodes[0].provision(&format!("RE4CL{i:04}"), &format!("00:1B:2C:3D:5E:{i:02X}")))
        .collect();
    for (i, port) in ports.iter().enumerate() {
        let session = connect(*port, &devices[0]).await;
        let (node, _) = db.online(&devices[0].serial, None).await;
        assert_eq!(node, format!("n{}", i + 1));
        session.abort();
        wait_for("disconnect recorded", Duration::from_secs(10), || async {
            (db.status(&devices[0].serial).await?.state == "offline").then_some(())
        })
        .await;
    }

    // Through the balancer: three connections land on the three nodes.
    let mut live = Vec::new();
    let mut landed = HashSet::new();
    for d in &devices[..3] {
        live.push(connect(lb.port, d).await);
        landed.insert(db.online(&d.serial, None).await.0);
    }
    assert_eq!(
        landed.len(),
        3,
        "round robin reached every node: {landed:?}"
    );

    // Revoked through node 2 (its CLI, its database): the session on node 3 closes < 1 s.
    let on_n3 = {
        let mut found = None;
        for (i, d) in devices[..3].iter().enumerate() {
            if db.status(&d.serial).await.unwrap().node.as_deref() == Some("n3") {
                found = Some(i);
            }
        }
        found.expect("a device on n3")
    };
    nodes[1].cli(&["device", "revoke", &devices[on_n3].serial]);
    let revoked_at = Instant::now();
    let closed_at = tokio::time::timeout(Duration::from_secs(5), live.remove(on_n3))
        .await
        .expect("the revoked session is closed")
        .unwrap();
    let took = closed_at.saturating_duration_since(revoked_at);
    assert!(
        took < Duration::from_secs(1),
        "revocation on n2 closed the session on n3 after {took:?}"
    );
    let r = wait_for("revoked recorded", Duration::from_secs(5), || async {
        let r = db.status(&devices[on_n3].serial).await?;
        (r.state == "offline").then_some(r)
    })
    .await;
    assert_eq!(r.reason.as_deref(), Some("revoked"));
    eprintln!("revocation across nodes: {took:?}");

    // Takeover: a device online on node A connects again directly to node B.
    let mover = &devices[3];
    let old = connect(lb.port, mover).await;
    let (node_a, old_session) = db.online(&mover.serial, None).await;
    let a: usize = node_a[1..].parse().unwrap();
    let b = a % 3 + 1;
    let watch = {
        let pool = db.0.clone();
        let serial = mover.serial.clone();
        tokio::spawn(async move {
            let db = Db(pool);
            let mut states = Vec::new();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(3) {
                states.push(db.status(&serial).await.unwrap().state);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            states
        })
    };
    let switched = Instant::now();
    let new = connect(ports[b - 1], mover).await;
    let old_closed = tokio::time::timeout(Duration::from_secs(5), old)
        .await
        .expect("the older session on node A is closed")
        .unwrap();
    let took = old_closed.saturating_duration_since(switched);
    assert!(
        took < Duration::from_secs(1),
        "takeover closed the older session after {took:?}"
    );
    eprintln!("takeover across nodes: {took:?}");
    let (node, new_session) = db.online(&mover.serial, Some(&old_session)).await;
    assert_eq!(node, format!("n{b}"));
    wait_for(
        "older session ended taken_over",
        Duration::from_secs(5),
        || async {
            (db.end_reason(&old_session).await.as_deref() == Some("taken_over")).then_some(())
        },
    )
    .await;
    let states = watch.await.unwrap();
    assert!(
        states.iter().all(|s| s == "online"),
        "the device stayed online: {states:?}"
    );
    assert_eq!(
        db.open_sessions(&mover.serial).await,
        vec![(new_session, format!("n{b}"))],
        "exactly one session open"
    );
    drop(new);

    // A command sent through node 1 reaches the device on node 3, QoS 1, within a second;
    // its reply is recorded and read through node 2.
    let token = admin_token(&nodes[0]).await;
    let commanded = &devices[5];
    let (client, mut eventloop) = client_on(ports[2], commanded);
    assert_eq!(
        connack(&mut eventloop).await.unwrap(),
        rumqttc::ConnectReturnCode::Success
    );
    subscribe_commands(&client, &mut eventloop, &commanded.serial).await;
    let sent_at = Instant::now();
    let resp = reqwest::Client::new()
        .post(nodes[0].url(&format!("/api/v1/devices/{}/commands", commanded.serial)))
        .bearer_auth(&token)
        .json(&serde_json::json!({"name": "self_test", "args": {"depth": "quick"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let id = resp.json::<serde_json::Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let command = loop {
        match tokio::time::timeout(Duration::from_secs(5), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => break p,
            Ok(Ok(_)) => {}
            other => panic!("the command did not reach the device on node 3: {other:?}"),
        }
    };
    let took = sent_at.elapsed();
    assert_eq!(
        command.topic,
        format!("tms/{}/cmd/self_test", commanded.serial)
    );
    assert_eq!(command.qos, QoS::AtLeastOnce);
    let body: serde_json::Value = serde_json::from_slice(&command.payload).unwrap();
    assert_eq!(
        (body["id"].as_str(), body["args"]["depth"].as_str()),
        (Some(id.as_str()), Some("quick"))
    );
    assert!(
        took < Duration::from_secs(1),
        "command sent on n1 reached n3 after {took:?}"
    );
    eprintln!("command across nodes: {took:?}");
    client
        .publish(
            format!("tms/{}/reply", commanded.serial),
            QoS::AtLeastOnce,
            false,
            serde_json::json!({"id": id, "ok": true, "message": "self-test passed"}).to_string(),
        )
        .await
        .unwrap();
    let replies = tokio::spawn(async move {
        let _client = client;
        while eventloop.poll().await.is_ok() {}
    });
    let path = format!("/api/v1/devices/{}/commands", commanded.serial);
    let recorded = wait_for(
        "the reply read through node 2",
        Duration::from_secs(5),
        || async {
            let (code, list) = api_get(&nodes[1], &token, &path).await;
            let c = list
                .as_array()?
                .iter()
                .find(|c| c["id"] == id.as_str())?
                .clone();
            (code == 200 && c["state"] == "succeeded").then_some(c)
        },
    )
    .await;
    assert!(
        recorded["delivered_at"].is_string() || recorded["delivered_at"].is_number(),
        "{recorded}"
    );
    assert_eq!(
        recorded["reply"]["message"], "self-test passed",
        "{recorded}"
    );
    replies.abort();
    // That device has just left (its client dropped): wait until its node has recorded it,
    // so that it is not taken below for a device the victim still holds.
    wait_for(
        "the commanded device recorded offline",
        Duration::from_secs(5),
        || async {
            let r = db.status(&commanded.serial).await?;
            (r.state == "offline").then_some(())
        },
    )
    .await;

    // SIGKILL of a node that holds devices (not node 1, whose CLI issued the certificates).
    let victim_id = if b == 1 {
        "n2".to_owned()
    } else {
        format!("n{b}")
    };
    let mut held = Vec::new();
    for d in &devices {
        let r = db.status(&d.serial).await;
        if r.as_ref()
            .is_some_and(|r| r.state == "online" && r.node.as_deref() == Some(victim_id.as_str()))
        {
            held.push(d.clone());
        }
    }
    if held.is_empty() {
        // Make sure the victim holds one: connect a spare device to it directly.
        let spare = &devices[4];
        let v: usize = victim_id[1..].parse().unwrap();
        live.push(connect(ports[v - 1], spare).await);
        db.online(&spare.serial, None).await;
        held.push(spare.clone());
    }
    let v: usize = victim_id[1..].parse().unwrap();
    let killed_at = Instant::now();
    nodes[v - 1].kill();
    for d in &held {
        let r = wait_for(
            &format!("{} node_lost", d.serial),
            Duration::from_secs(8),
            || async {
                let r = db.status(&d.serial).await?;
                (r.state == "offline").then_some(r)
            },
        )
        .await;
        assert_eq!(r.reason.as_deref(), Some("node_lost"), "{}", d.serial);
        assert!(db.open_sessions(&d.serial).await.is_empty());
    }
    let lost_after = killed_at.elapsed();
    assert!(
        lost_after < Duration::from_secs(3 + 5),
        "node_lost after {lost_after:?}"
    );
    eprintln!("node lost detected after {lost_after:?}");
    // Back online through the balancer, on a live node.
    for d in &held {
        live.push(connect(lb.port, d).await);
        let (node, _) = db.online(&d.serial, None).await;
        assert_ne!(node, victim_id);
    }
    let metrics = scrape(&nodes[0]).await;
    assert_eq!(metrics.get(r#"tms_node_info{node="n1"}"#), Some(&1.0));
    let mut lost_counted = 0.0;
    for (_, n) in nodes.iter().enumerate().filter(|(i, _)| *i != v - 1) {
        lost_counted += scrape(n)
            .await
            .get("tms_cluster_nodes_lost_total")
            .copied()
            .unwrap_or(0.0);
    }
    assert_eq!(
        lost_counted, 1.0,
        "exactly one node declared the victim lost"
    );
    let (code, list) = api_get(&nodes[0], &token, "/api/v1/nodes").await;
    assert_eq!(code, 200, "{list}");
    let states: Vec<(String, String)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["id"].as_str().unwrap().to_owned(),
                n["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        states.contains(&(victim_id.clone(), "dead".into())),
        "{states:?}"
    );
    assert_eq!(
        states.iter().filter(|(_, s)| s == "alive").count(),
        2,
        "{states:?}"
    );
    for t in live {
        t.abort();
    }
    drop(lb);
    nodes.clear();
}

/// A second live process with the same node id on the same database is refused at start
/// (exit 1, naming node.id); a node without the CA key passphrase cannot join a CA whose key
/// is kept encrypted, and says to set it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_node_id_and_a_missing_passphrase_are_refused_by_name() {
    let Some(url) = fresh_postgres_url("cluster_refuse").await else {
        return;
    };
    let first = start_node(&url, 1).await;
    let serve = |env: Vec<(String, String)>| {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(BIN)
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("TMS_DATA_DIR", dir.path().join("data"))
            .env("TMS_MQTT_LISTEN", "127.0.0.1:0")
            .env("TMS_HTTP_LISTEN", "127.0.0.1:0")
            .envs(env)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = serve(node_env(&url, 1));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("node.id") && err.contains("\"n1\""), "{err}");

    let mut env = node_env(&url, 2);
    env.retain(|(k, _)| k != "TMS_CA_KEY_PASSPHRASE");
    let (code, err) = serve(env);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("TMS_CA_KEY_PASSPHRASE"), "{err}");
    drop(first);
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}
