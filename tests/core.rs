//! End-to-end tests of the gateway core through the real binary: a device connects over mTLS,
//! publishes, is online within a second and offline within a second of leaving; a malformed
//! payload is quarantined; restarts and crashes leave an honest status. Real TLS, rumqttc and
//! mosquitto_pub clients.

#![expect(clippy::unwrap_used, reason = "test helpers fail the test loudly")]

mod support;

use std::time::{Duration, Instant};

use rumqttc::ConnectReturnCode;
use support::*;
use tms_model::ConnState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_connects_publishes_and_is_online_within_a_second() {
    let gw = TestGateway::start().await;
    let files = gw.provision("RE4A000123", "00:1B:2C:3D:4E:5F");
    let store = gw.store().await;
    assert_eq!(
        status(&store, "RE4A000123").await.state,
        ConnState::NeverConnected
    );

    let (client, mut eventloop) = device_client(&gw, &files);
    assert_eq!(
        connack(&mut eventloop).await,
        Ok(ConnectReturnCode::Success)
    );
    let connected = Instant::now();
    let _driver = drive(eventloop);
    publish(&client, "RE4A000123", "telemetry", TELEMETRY).await;

    let online = within_a_second(&store, "RE4A000123", ConnState::Online).await;
    assert!(
        connected.elapsed() < Duration::from_secs(1),
        "online after {:?}",
        connected.elapsed()
    );
    assert!(
        online
            .peer_addr
            .as_deref()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    let rows = wait_for("telemetry row", Duration::from_secs(2), || async {
        let rows = store.telemetry("RE4A000123", 10).await.unwrap();
        (!rows.is_empty()).then_some(rows)
    })
    .await;
    assert_eq!(rows[0].payload["load_pct"], 42);
    assert_eq!(
        rows[0].payload["battery"]["runtime_min"], 31,
        "unknown-to-us nesting kept whole"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_pub_connects_by_name_and_by_ip_literal() {
    let gw = TestGateway::start().await;
    let files = gw.provision("RE4A000200", "00:1B:2C:3D:4E:60");
    for host in ["localhost", "127.0.0.1"] {
        let out = gw.mosquitto_pub(
            host,
            &files,
            "RE4A000200",
            "tms/RE4A000200/telemetry",
            TELEMETRY,
        );
        assert!(
            out.status.success(),
            "-h {host}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let store = gw.store().await;
    wait_for("two telemetry rows", Duration::from_secs(2), || async {
        (store.telemetry_count("RE4A000200").await.unwrap() == 2).then_some(())
    })
    .await;
    // mosquitto_pub disconnects cleanly after publishing.
    let s = within_a_second(&store, "RE4A000200", ConnState::Offline).await;
    assert_eq!(
        s.last_disconnect_reason.as_deref(),
        Some("client_disconnect")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_tcp_connection_does_not_delay_a_device() {
    let gw = TestGateway::start_with(&[("TMS_MQTT_HANDSHAKE_TIMEOUT_SECS", "20")]).await;
    let files = gw.provision("RE4A000400", "00:1B:2C:3D:4E:62");
    let _silent: Vec<_> = futures_connect(&gw, 3).await;
    let started = Instant::now();
    let (_client, mut el) = device_client(&gw, &files);
    assert_eq!(connack(&mut el).await, Ok(ConnectReturnCode::Success));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "connect took {:?} behind silent sockets",
        started.elapsed()
    );
}

async fn futures_connect(gw: &TestGateway, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(tokio::net::TcpStream::connect(gw.ports.mqtt).await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_within_a_second_of_disconnect_and_of_a_dropped_connection() {
    let gw = TestGateway::start().await;
    let files = gw.provision("RE4A000500", "00:1B:2C:3D:4E:63");
    let store = gw.store().await;

    let (client, mut el) = online_client(&gw, &store, &files).await;
    client.disconnect().await.unwrap();
    while el.poll().await.is_ok() {}
    let at = Instant::now();
    let s = within_a_second(&store, "RE4A000500", ConnState::Offline).await;
    assert!(at.elapsed() < Duration::from_secs(1));
    assert_eq!(
        s.last_disconnect_reason.as_deref(),
        Some("client_disconnect")
    );

    let (_client, el) = online_client(&gw, &store, &files).await;
    drop(el); // the TCP connection closes without DISCONNECT
    let s = within_a_second(&store, "RE4A000500", ConnState::Offline).await;
    assert_eq!(s.last_disconnect_reason.as_deref(), Some("connection_lost"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_payload_is_quarantined_and_the_next_message_stored() {
    let gw = TestGateway::start().await;
    let files = gw.provision("RE4A000600", "00:1B:2C:3D:4E:64");
    let store = gw.store().await;
    let (client, mut el) = device_client(&gw, &files);
    assert_eq!(connack(&mut el).await, Ok(ConnectReturnCode::Success));
    let _driver = drive(el);
    publish(
        &client,
        "RE4A000600",
        "telemetry",
        "{\"load_pct\": \"very high\"",
    )
    .await;
    publish(
        &client,
        "RE4A000600",
        "telemetry",
        r#"{"load_pct": "very high"}"#,
    )
    .await;
    publish(
        &client,
        "RE4A000600",
        "location",
        r#"{"lat": 29.76, "lon": -95.37, "accuracy_m": 12}"#,
    )
    .await;
    publish(&client, "RE4A000600", "telemetry", TELEMETRY).await;
    wait_for(
        "good telemetry after bad",
        Duration::from_secs(2),
        || async { (store.telemetry_count("RE4A000600").await.unwrap() == 1).then_some(()) },
    )
    .await;
    let quarantined = store.quarantined("RE4A000600", 10).await.unwrap();
    assert_eq!(quarantined.len(), 2, "{quarantined:?}");
    assert!(
        quarantined
            .iter()
            .any(|(_, err, _)| err.contains("load_pct must be a number"))
    );
    assert!(
        quarantined
            .iter()
            .any(|(_, _, payload)| payload == b"{\"load_pct\": \"very high\"")
    );
    let location = store.location("RE4A000600").await.unwrap().unwrap();
    assert_eq!(
        (location.lat, location.lon, location.source.as_str()),
        (29.76, -95.37, "device")
    );
    assert_eq!(
        status(&store, "RE4A000600").await.state,
        ConnState::Online,
        "bad payloads never drop the connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_the_ca_and_issued_certificates_still_connect() {
    let mut gw = TestGateway::start().await;
    let files = gw.provision("RE4A000700", "00:1B:2C:3D:4E:65");
    let before = gw.cli(&["ca", "show"]);
    let ca_pem = std::fs::read_to_string(gw.data_dir().join("ca/ca.pem")).unwrap();
    assert_eq!(gw.stop(), Some(0), "graceful stop exits 0: {}", gw.log());
    gw.restart().await;
    assert_eq!(gw.cli(&["ca", "show"]), before);
    assert_eq!(
        std::fs::read_to_string(gw.data_dir().join("ca/ca.pem")).unwrap(),
        ca_pem
    );
    let (_client, mut el) = device_client(&gw, &files);
    assert_eq!(connack(&mut el).await, Ok(ConnectReturnCode::Success));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_and_crash_leave_no_device_shown_online() {
    let mut gw = TestGateway::start().await;
    let files = gw.provision("RE4A000800", "00:1B:2C:3D:4E:66");
    let store = gw.store().await;
    let (_client, _el) = online_client(&gw, &store, &files).await;
    assert_eq!(gw.stop(), Some(0));
    let s = status(&store, "RE4A000800").await;
    assert_eq!(
        (s.state, s.last_disconnect_reason.as_deref()),
        (ConnState::Offline, Some("server_shutdown"))
    );

    gw.restart().await;
    let (_client, _el) = online_client(&gw, &store, &files).await;
    gw.kill();
    gw.restart().await;
    let s = status(&store, "RE4A000800").await;
    assert_eq!(
        (s.state, s.last_disconnect_reason.as_deref()),
        (ConnState::Offline, Some("gateway_restart"))
    );
}

/// Connects `files`' device and waits (1 s at most) until the store shows it online.
async fn online_client(
    gw: &TestGateway,
    store: &tms_store::Store,
    files: &DeviceFiles,
) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let (client, mut el) = device_client(gw, files);
    assert_eq!(connack(&mut el).await, Ok(ConnectReturnCode::Success));
    within_a_second(store, &files.serial, ConnState::Online).await;
    (client, el)
}

/// Waits at most a second for `serial` to be in `state` in the store.
async fn within_a_second(
    store: &tms_store::Store,
    serial: &str,
    state: ConnState,
) -> tms_store::DeviceStatus {
    wait_state(store, serial, state, Duration::from_secs(1)).await
}
