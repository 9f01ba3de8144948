//! End-to-end tests of the gateway core through the real binary (and, where a test must
//! reach inside, the same `App` in-process): real TLS, rumqttc and mosquitto_pub clients.

#![expect(clippy::unwrap_used, reason = "test helpers fail the test loudly")]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{ConnectReturnCode, Event, Packet, QoS, SubscribeReasonCode};
use support::*;
use time::OffsetDateTime;
use tms_certs::{Ca, DeviceKey};
use tms_model::{ConnState, DeviceSerial};
use tms_store::Store;

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

    let online = wait_state(
        &store,
        "RE4A000123",
        ConnState::Online,
        Duration::from_secs(1),
    )
    .await;
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
    let s = wait_state(
        &store,
        "RE4A000200",
        ConnState::Offline,
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(
        s.last_disconnect_reason.as_deref(),
        Some("client_disconnect")
    );
}

/// A device that connects by a name the server certificate does not hold gives up during the
/// handshake, before it shows its own certificate: the gateway cannot know which device it is,
/// so the attempt is recorded against the peer, with the name it asked for, for admins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_refuses_the_server_certificate_is_shown_per_peer_with_its_name() {
    let gw = TestGateway::start().await;
    let files = gw.provision("RE4A000210", "00:1B:2C:3D:4E:70");
    // mosquitto_pub by the machine's own name, when that name is loopback and not in the
    // certificate (TestGateway's holds localhost and 127.0.0.1).
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let host = host.trim();
    let by_name = !host.is_empty()
        && host != "localhost"
        && std::net::ToSocketAddrs::to_socket_addrs(&(host, 1))
            .is_ok_and(|mut a| a.all(|a| a.ip().is_loopback()));
    if by_name {
        let out = gw.mosquitto_pub(
            host,
            &files,
            "RE4A000210",
            "tms/RE4A000210/telemetry",
            TELEMETRY,
        );
        assert!(!out.status.success(), "TLS must fail for -h {host}");
    }
    // rustls, asking for a name the certificate does not hold.
    let tls = client_tls(&files.ca, Some((&files.pem, &files.key)));
    let tcp = tokio::net::TcpStream::connect(gw.ports.mqtt).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("broker.wrong.example").unwrap();
    let err = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .expect_err("the client must refuse the server certificate");
    assert!(err.to_string().contains("not valid for name"), "{err}");

    let token = admin_token(&gw).await;
    let http = reqwest::Client::new();
    let peers: serde_json::Value = wait_for(
        "the refused peer recorded",
        Duration::from_secs(3),
        || async {
            let v: serde_json::Value = http
                .get(gw.url("/api/v1/refusals"))
                .bearer_auth(&token)
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let attempts = if by_name { 2 } else { 1 };
            v.as_array()?
                .iter()
                .any(|p| {
                    p["reason"] == "server_name_mismatch"
                        && p["attempts"].as_i64() == Some(attempts)
                })
                .then_some(v)
        },
    )
    .await;
    let p = peers
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["reason"] == "server_name_mismatch")
        .unwrap();
    assert_eq!(p["peer_ip"], "127.0.0.1");
    let detail = p["detail"].as_str().unwrap();
    assert!(
        detail.contains("\"broker.wrong.example\"") && detail.contains("mqtt.hostnames"),
        "names the name asked for and what to change: {detail}"
    );
    assert!(
        !detail.contains("Error"),
        "words, not Rust debug text: {detail}"
    );
    // The device's own record is untouched: nobody proved to be it.
    let s = status(&gw.store().await, "RE4A000210").await;
    assert_eq!(s.last_connect_error, None);
    let metrics = scrape(&gw).await;
    assert!(
        metrics
            .get(r#"tms_broker_connects_refused_total{reason="server_name_mismatch"}"#)
            .is_some_and(|n| *n >= 1.0),
        "counted in /metrics"
    );
    // Peers belong to no customer: a provider may not list them.
    let provider = staff_token(&gw, "prov@example.com", "provider").await;
    let resp = http
        .get(gw.url("/api/v1/refusals"))
        .bearer_auth(&provider)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_are_recorded_against_the_device_with_their_reason() {
    let gw = TestGateway::start().await;
    let files = gw.provision("RE4A000300", "00:1B:2C:3D:4E:61");
    let store = gw.store().await;
    let serial = DeviceSerial::parse("RE4A000300").unwrap();
    let now = OffsetDateTime::now_utc();

    // No client certificate: refused in the handshake (nothing names a device).
    let (_c, mut el) = mqtt_client(&gw, "RE4A000300", client_tls(&files.ca, None));
    assert!(
        connack(&mut el).await.is_err(),
        "connected without a client certificate"
    );

    // A certificate for this very serial from a foreign CA.
    let foreign_dir = tempfile::tempdir().unwrap();
    let (foreign, _) = Ca::load_or_create(foreign_dir.path(), now).unwrap();
    let forged = foreign
        .issue_device(
            &serial,
            DeviceKey::Generate,
            now,
            now + time::Duration::days(30),
        )
        .unwrap();
    let (pem, key) = (
        foreign_dir.path().join("d.pem"),
        foreign_dir.path().join("d.key"),
    );
    std::fs::write(&pem, &forged.certificate_pem).unwrap();
    std::fs::write(&key, forged.private_key_pem.as_deref().unwrap()).unwrap();
    let (_c, mut el) = mqtt_client(&gw, "RE4A000300", client_tls(&files.ca, Some((&pem, &key))));
    assert!(connack(&mut el).await.is_err());
    // Anyone can write a serial into a certificate: that refusal is not the device's (see
    // strangers_naming_a_real_serial_do_not_touch_its_record).

    // Expired: signed by our own CA, but its validity ended yesterday.
    let ca = Ca::load(&gw.data_dir().join("ca")).unwrap();
    let expired = ca
        .issue_device(
            &serial,
            DeviceKey::Generate,
            now - time::Duration::days(3),
            now - time::Duration::days(1),
        )
        .unwrap();
    std::fs::write(&pem, &expired.certificate_pem).unwrap();
    std::fs::write(&key, expired.private_key_pem.as_deref().unwrap()).unwrap();
    let (_c, mut el) = mqtt_client(&gw, "RE4A000300", client_tls(&files.ca, Some((&pem, &key))));
    assert!(connack(&mut el).await.is_err());
    let s = wait_refusal(&store, "RE4A000300", "expired").await;
    assert!(s.last_connect_error_detail.unwrap().contains("expired"));

    // Client id differs from the certificate CN: CONNACK "not authorized".
    let tls = client_tls(&files.ca, Some((&files.pem, &files.key)));
    let (_c, mut el) = mqtt_client(&gw, "SOMEONE-ELSE", tls);
    let code = connack(&mut el).await;
    assert!(
        matches!(code, Ok(ConnectReturnCode::NotAuthorized))
            || code.as_ref().is_err_and(|e| e.contains("NotAuthorized")),
        "{code:?}"
    );
    wait_refusal(&store, "RE4A000300", "client_id_mismatch").await;

    // Connected, then outside its own topics: publish dropped, subscribe refused.
    let (client, mut el) = device_client(&gw, &files);
    assert_eq!(connack(&mut el).await, Ok(ConnectReturnCode::Success));
    publish(&client, "RE4A000999", "telemetry", TELEMETRY).await;
    client.subscribe("tms/#", QoS::AtLeastOnce).await.unwrap();
    let suback = loop {
        match tokio::time::timeout(Duration::from_secs(5), el.poll())
            .await
            .unwrap()
            .unwrap()
        {
            Event::Incoming(Packet::SubAck(ack)) => break ack,
            _ => continue,
        }
    };
    assert_eq!(suback.return_codes, vec![SubscribeReasonCode::Failure]);
    client
        .subscribe("tms/RE4A000300/cmd/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let suback = loop {
        match tokio::time::timeout(Duration::from_secs(5), el.poll())
            .await
            .unwrap()
            .unwrap()
        {
            Event::Incoming(Packet::SubAck(ack)) => break ack,
            _ => continue,
        }
    };
    assert_eq!(
        suback.return_codes,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    wait_refusal(&store, "RE4A000300", "acl_denied").await;
    let _driver = drive(el);
    // The session survived the denied packets and still delivers.
    publish(&client, "RE4A000300", "telemetry", TELEMETRY).await;
    wait_for(
        "telemetry after ACL denial",
        Duration::from_secs(2),
        || async { (store.telemetry_count("RE4A000300").await.unwrap() == 1).then_some(()) },
    )
    .await;
    assert_eq!(store.telemetry_count("RE4A000999").await.unwrap(), 0);

    let reasons: Vec<String> = store
        .refusals("RE4A000300", 20)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.reason)
        .collect();
    for reason in ["expired", "client_id_mismatch", "acl_denied"] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "{reason} missing from {reasons:?}"
        );
    }
    assert!(!reasons.iter().any(|r| r == "unknown_ca"), "{reasons:?}");
}

/// A client identity presenting `chain` but signing with `key`, which need not match: what
/// someone who copied a device's certificate off the wire, without its key, can do.
#[derive(Debug)]
struct Presents(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for Presents {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn presenting(
    ca: &std::path::Path,
    chain: &std::path::Path,
    key: &std::path::Path,
) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(chain)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = provider
        .key_provider
        .load_private_key(rustls_pki_types::PrivateKeyDer::from_pem_file(key).unwrap())
        .unwrap();
    let resolver = Presents(Arc::new(rustls::sign::CertifiedKey::new(chain, key)));
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_cert_resolver(Arc::new(resolver)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_naming_a_real_serial_do_not_touch_its_record() {
    let gw = TestGateway::start().await;
    let serial = "RE4A000310";
    let files = gw.provision(serial, "00:1B:2C:3D:4E:71");
    let store = gw.store().await;
    let dir = gw.dir.path().join("stranger");
    std::fs::create_dir_all(&dir).unwrap();
    let before = scrape(&gw).await;
    let refused =
        |reason: &str| format!("tms_broker_connects_refused_total{{reason=\"{reason}\"}}");

    // A self-signed certificate naming the serial, as `openssl req -x509` makes it.
    let out = std::process::Command::new("openssl")
        .current_dir(&dir)
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "30",
            "-keyout",
            "self.key",
            "-out",
            "self.pem",
            "-subj",
        ])
        .arg(format!("/CN={serial}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tls = client_tls(
        &files.ca,
        Some((&dir.join("self.pem"), &dir.join("self.key"))),
    );
    let (_c, mut el) = mqtt_client(&gw, serial, tls);
    assert!(
        connack(&mut el).await.is_err(),
        "a self-signed certificate connected"
    );

    // An expired certificate from a CA of one's own: expired, but not ours to report.
    let now = OffsetDateTime::now_utc();
    let (foreign, _) = Ca::load_or_create(&dir.join("ca"), now).unwrap();
    let expired = foreign
        .issue_device(
            &DeviceSerial::parse(serial).unwrap(),
            DeviceKey::Generate,
            now - time::Duration::days(3),
            now - time::Duration::days(1),
        )
        .unwrap();
    std::fs::write(dir.join("old.pem"), &expired.certificate_pem).unwrap();
    std::fs::write(dir.join("old.key"), expired.private_key_pem.unwrap()).unwrap();
    let tls = client_tls(
        &files.ca,
        Some((&dir.join("old.pem"), &dir.join("old.key"))),
    );
    let (_c, mut el) = mqtt_client(&gw, serial, tls);
    assert!(connack(&mut el).await.is_err());

    // The device's real certificate, replayed without its private key.
    let (_c, mut el) = mqtt_client(
        &gw,
        serial,
        presenting(&files.ca, &files.pem, &dir.join("self.key")),
    );
    assert!(
        connack(&mut el).await.is_err(),
        "a certificate without its key connected"
    );

    // All three are counted and logged with the peer address, the serial marked unverified.
    // (openssl's self-signed certificate is a CA certificate: invalid_certificate.)
    wait_for("three refusals counted", Duration::from_secs(5), || async {
        let after = scrape(&gw).await;
        let counted = ["unknown_ca", "expired", "invalid_certificate"]
            .iter()
            .map(|r| delta(&before, &after, &refused(r)))
            .sum::<f64>();
        (counted >= 3.0).then_some(())
    })
    .await;
    let log = gw.log();
    let unverified = log
        .lines()
        .filter(|l| {
            l.contains("connection refused") && l.contains(serial) && l.contains("unverified")
        })
        .count();
    assert_eq!(unverified, 3, "{log}");

    // The device's own certificate, revoked, is still the device's: it is recorded, and it
    // is the only refusal there.
    gw.cli(&["device", "revoke", serial]);
    let s = wait_for(
        "the revoked certificate refused",
        Duration::from_secs(5),
        || async {
            let (_c, mut el) = device_client(&gw, &files);
            if connack(&mut el).await.is_ok() {
                return None;
            }
            let s = status(&store, serial).await;
            (s.last_connect_error.as_deref() == Some("revoked")).then_some(s)
        },
    )
    .await;
    assert_eq!(s.last_connect_error.as_deref(), Some("revoked"));
    let reasons: Vec<String> = store
        .refusals(serial, 20)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.reason)
        .collect();
    assert_eq!(reasons, ["revoked"]);
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

    let (client, mut el) = device_client(&gw, &files);
    assert_eq!(connack(&mut el).await, Ok(ConnectReturnCode::Success));
    wait_state(
        &store,
        "RE4A000500",
        ConnState::Online,
        Duration::from_secs(1),
    )
    .await;
    client.disconnect().await.unwrap();
    while el.poll().await.is_ok() {}
    let at = Instant::now();
    let s = wait_state(
        &store,
        "RE4A000500",
        ConnState::Offline,
        Duration::from_secs(1),
    )
    .await;
    assert!(at.elapsed() < Duration::from_secs(1));
    assert_eq!(
        s.last_disconnect_reason.as_deref(),
        Some("client_disconnect")
    );

    let (_client, mut el) = device_client(&gw, &files);
    assert_eq!(connack(&mut el).await, Ok(ConnectReturnCode::Success));
    wait_state(
        &store,
        "RE4A000500",
        ConnState::Online,
        Duration::from_secs(1),
    )
    .await;
    drop(el); // the TCP connection closes without DISCONNECT
    let s = wait_state(
        &store,
        "RE4A000500",
        ConnState::Offline,
        Duration::from_secs(1),
    )
    .await;
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
    let (_client, mut el) = device_client(&gw, &files);
    assert_eq!(connack(&mut el).await, Ok(ConnectReturnCode::Success));
    wait_state(
        &store,
        "RE4A000800",
        ConnState::Online,
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(gw.stop(), Some(0));
    let s = status(&store, "RE4A000800").await;
    assert_eq!(
        (s.state, s.last_disconnect_reason.as_deref()),
        (ConnState::Offline, Some("server_shutdown"))
    );

    gw.restart().await;
    let (_client, mut el) = device_client(&gw, &files);
    assert_eq!(connack(&mut el).await, Ok(ConnectReturnCode::Success));
    wait_state(
        &store,
        "RE4A000800",
        ConnState::Online,
        Duration::from_secs(1),
    )
    .await;
    gw.kill();
    gw.restart().await;
    let s = status(&store, "RE4A000800").await;
    assert_eq!(
        (s.state, s.last_disconnect_reason.as_deref()),
        (ConnState::Offline, Some("gateway_restart"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_store_pushes_back_and_every_acknowledged_message_is_stored() {
    const DEVICES: usize = 4;
    const MESSAGES: usize = 300;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Provisioned before the first start: only `init` (or `serve`) creates a data directory.
    cli_in(&data, &["init"]);
    let mut devices = Vec::new();
    for i in 0..DEVICES {
        let serial = format!("RE4B{i:06}");
        cli_in(
            &data,
            &[
                "device",
                "add",
                "--serial",
                &serial,
                "--mac",
                &format!("02:00:00:00:01:{i:02X}"),
                "--company",
                "Acme",
            ],
        );
        let out = dir.path().join(&serial);
        cli_in(
            &data,
            &["device", "cert", &serial, "--out", out.to_str().unwrap()],
        );
        devices.push(DeviceFiles {
            key: out.join(format!("{serial}.key")),
            pem: out.join(format!("{serial}.pem")),
            ca: out.join("ca.pem"),
            serial,
        });
    }
    let env: std::collections::HashMap<String, String> = [
        ("TMS_DATA_DIR", data.to_str().unwrap()),
        ("TMS_MQTT_LISTEN", "127.0.0.1:0"),
        ("TMS_HTTP_LISTEN", "127.0.0.1:0"),
        // A queue far smaller than the burst, and a store that takes 100 ms per batch.
        ("TMS_INGEST_QUEUE_CAPACITY", "16"),
        ("TMS_INGEST_BATCH_MAX_ROWS", "50"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let config = tms_gateway::Config::from_sources(None, &env).unwrap();
    let app = tms_gateway::App::build(config).await.unwrap();
    app.store().set_write_delay(Duration::from_millis(100));
    let port = app.ports().mqtt.port();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(app.run(shutdown.clone()));

    let mut publishers = Vec::new();
    for files in devices.clone() {
        publishers.push(tokio::spawn(async move {
            let mut opts = rumqttc::MqttOptions::new(&files.serial, "localhost", port);
            opts.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(
                client_tls(&files.ca, Some((&files.pem, &files.key))),
            )));
            let (client, mut el) = rumqttc::AsyncClient::new(opts, 10);
            let serial = files.serial.clone();
            tokio::spawn(async move {
                for n in 0..MESSAGES {
                    let payload = format!(r#"{{"load_pct":{n}}}"#);
                    client
                        .publish(
                            format!("tms/{serial}/telemetry"),
                            QoS::AtLeastOnce,
                            false,
                            payload,
                        )
                        .await
                        .unwrap();
                }
            });
            let mut acked = 0;
            while acked < MESSAGES {
                match tokio::time::timeout(Duration::from_secs(60), el.poll()).await {
                    Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => panic!("{e}"),
                    Err(_) => panic!("no progress for 60 s after {acked} acks"),
                }
            }
            acked
        }));
    }
    let mut acked = 0;
    for p in publishers {
        acked += p.await.unwrap();
    }
    assert_eq!(acked, DEVICES * MESSAGES);
    // Stop right away: whatever was acknowledged but still queued must be written on drain.
    shutdown.cancel();
    running.await.unwrap().unwrap();
    let store = Store::open(&format!("sqlite://{}", data.join("tms.db").display()))
        .await
        .unwrap();
    for files in &devices {
        assert_eq!(
            store.telemetry_count(&files.serial).await.unwrap(),
            MESSAGES as i64,
            "{}",
            files.serial
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_what_a_scripted_session_did() {
    let gw = TestGateway::start().await;
    let files = gw.provision("RE4A000900", "00:1B:2C:3D:4E:90");
    let store = gw.store().await;
    let before = scrape(&gw).await;

    // A refused CONNECT (client id is not the CN).
    let (_c, mut el) = mqtt_client(
        &gw,
        "IMPOSTOR",
        client_tls(&files.ca, Some((&files.pem, &files.key))),
    );
    assert!(!matches!(
        connack(&mut el).await,
        Ok(ConnectReturnCode::Success)
    ));
    // A session: two good telemetry messages, one malformed, one location, then DISCONNECT.
    let (client, mut el) = device_client(&gw, &files);
    assert_eq!(connack(&mut el).await, Ok(ConnectReturnCode::Success));
    let driver = tokio::spawn(async move { while el.poll().await.is_ok() {} });
    publish(&client, "RE4A000900", "telemetry", TELEMETRY).await;
    publish(&client, "RE4A000900", "telemetry", TELEMETRY).await;
    publish(&client, "RE4A000900", "telemetry", "not json").await;
    publish(&client, "RE4A000900", "location", r#"{"lat": 1, "lon": 2}"#).await;
    wait_for("stored", Duration::from_secs(3), || async {
        (store.telemetry_count("RE4A000900").await.unwrap() == 2
            && store.location("RE4A000900").await.unwrap().is_some())
        .then_some(())
    })
    .await;
    client.disconnect().await.unwrap();
    driver.await.unwrap();
    wait_state(
        &store,
        "RE4A000900",
        ConnState::Offline,
        Duration::from_secs(2),
    )
    .await;

    let after = scrape(&gw).await;
    let d = |key: &str| delta(&before, &after, key);
    assert_eq!(d("tms_broker_connects_accepted_total"), 1.0);
    assert_eq!(
        d("tms_broker_connects_refused_total{reason=\"client_id_mismatch\"}"),
        1.0
    );
    assert_eq!(
        d("tms_broker_disconnects_total{reason=\"client_disconnect\"}"),
        1.0
    );
    assert_eq!(
        d("tms_broker_messages_received_total{kind=\"telemetry\"}"),
        3.0
    );
    assert_eq!(
        d("tms_broker_messages_received_total{kind=\"location\"}"),
        1.0
    );
    assert_eq!(
        d("tms_ingest_messages_total{kind=\"telemetry\",outcome=\"stored\"}"),
        2.0
    );
    assert_eq!(
        d("tms_ingest_messages_total{kind=\"telemetry\",outcome=\"quarantined\"}"),
        1.0
    );
    assert_eq!(
        d("tms_ingest_messages_total{kind=\"location\",outcome=\"stored\"}"),
        1.0
    );
    assert_eq!(after.get("tms_broker_connections").copied(), Some(0.0));
    assert!(d("tms_broker_bytes_received_total") > 0.0);
    assert!(d("tms_broker_handshake_duration_seconds_count") >= 2.0);
    assert_eq!(
        after
            .get("tms_devices{state=\"offline\"}")
            .copied()
            .unwrap_or(0.0)
            + after
                .get("tms_devices{state=\"never_connected\"}")
                .copied()
                .unwrap_or(0.0),
        1.0
    );

    // Every metric the shipped Grafana dashboard queries exists in a real scrape.
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/tms-gateway.json"
    ))
    .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let families: std::collections::HashSet<String> = after
        .keys()
        .map(|k| k.split('{').next().unwrap().to_owned())
        .collect();
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for name in expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("tms_"))
            {
                queried += 1;
                let family = name.to_owned();
                assert!(
                    families.contains(&family),
                    "dashboard queries {family}, which /metrics does not expose"
                );
            }
        }
    }
    assert!(queried > 10);
}

/// A TCP proxy the test can cut: stands between the gateway and PostgreSQL.
struct Proxy {
    addr: std::net::SocketAddr,
    cut: tokio_util::sync::CancellationToken,
}

impl Proxy {
    async fn start(addr: std::net::SocketAddr, upstream: String) -> Proxy {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = tokio_util::sync::CancellationToken::new();
        let stop = cut.clone();
        tokio::spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = listener.accept() => a.unwrap(),
                };
                let upstream = upstream.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut outbound = tokio::net::TcpStream::connect(upstream).await.unwrap();
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        Proxy { addr, cut }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_while_the_store_is_unreachable_and_recovers() {
    use sqlx::{Connection, Executor};
    let Ok(base) = std::env::var("TMS_TEST_DATABASE_URL") else {
        eprintln!("TMS_TEST_DATABASE_URL not set: this test needs PostgreSQL (CI sets it)");
        return;
    };
    sqlx::any::install_default_drivers();
    let schema = format!("t_ready_{}", std::process::id());
    let mut conn = sqlx::AnyConnection::connect(&base).await.unwrap();
    conn.execute(format!("DROP SCHEMA IF EXISTS {schema} CASCADE").as_str())
        .await
        .unwrap();
    conn.execute(format!("CREATE SCHEMA {schema}").as_str())
        .await
        .unwrap();
    let upstream = base
        .split('@')
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), upstream.clone()).await;
    let via_proxy = base.replace(&upstream, &proxy.addr.to_string());
    let sep = if via_proxy.contains('?') { '&' } else { '?' };
    let url = format!("{via_proxy}{sep}options=-c%20search_path%3D{schema}");
    let gw = TestGateway::start_with(&[("TMS_DATABASE_URL", &url)]).await;
    let ready = gw.url("/readyz");
    let status = |url: String| async move {
        reqwest::get(url)
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    assert_eq!(status(ready.clone()).await, 200);

    proxy.cut.cancel();
    wait_for(
        "readyz 503 with the store cut off",
        Duration::from_secs(10),
        || {
            let url = ready.clone();
            async move { (status(url).await == 503).then_some(()) }
        },
    )
    .await;
    assert_eq!(status(gw.url("/healthz")).await, 200, "alive all the same");

    let _back = Proxy::start(proxy.addr, upstream).await;
    wait_for("readyz 200 again", Duration::from_secs(15), || {
        let url = ready.clone();
        async move { (status(url).await == 200).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_connects_every_device_and_their_telemetry_is_stored() {
    let gw = TestGateway::start().await;
    let out = gw.cli_output(&[
        "simulate",
        "--devices",
        "20",
        "--interval",
        "0.2",
        "--duration",
        "3",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("20 connected"), "{stdout}");
    assert!(stdout.contains(" 0 errors"), "{stdout}");
    let store = gw.store().await;
    for i in 0..20 {
        let serial = format!("SIM{i:07}");
        assert!(
            store.telemetry_count(&serial).await.unwrap() >= 5,
            "{serial} stored too little telemetry"
        );
        // The simulator has exited; its devices' disconnects reach the store a batch later.
        let s = wait_state(&store, &serial, ConnState::Offline, Duration::from_secs(2)).await;
        assert_eq!(
            s.last_disconnect_reason.as_deref(),
            Some("client_disconnect")
        );
        assert_eq!(
            s.reported_status.as_deref(),
            Some("online"),
            "birth message stored"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_have_a_listener_of_their_own() {
    let gw = TestGateway::start_with(&[("TMS_METRICS_LISTEN", "127.0.0.1:0")]).await;
    let metrics = gw
        .ports
        .metrics
        .expect("ports.json names the metrics listener");
    assert_ne!(metrics, gw.ports.http);
    let http = reqwest::Client::new();
    let scrape = http
        .get(format!("http://{metrics}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(scrape.status(), reqwest::StatusCode::OK);
    assert!(
        scrape
            .text()
            .await
            .unwrap()
            .contains("tms_broker_connections")
    );
    // The public HTTP listener no longer answers /metrics; the metrics one serves nothing else.
    let public = http.get(gw.url("/metrics")).send().await.unwrap();
    assert_eq!(public.status(), reqwest::StatusCode::NOT_FOUND);
    let other = http
        .get(format!("http://{metrics}/api/v1/devices"))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), reqwest::StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_key_kept_encrypted_with_a_passphrase() {
    let gw = TestGateway::start_with(&[("TMS_CA_KEY_PASSPHRASE", "long passphrase 1")]).await;
    let key = std::fs::read_to_string(gw.data_dir().join("ca/ca.key")).unwrap();
    assert!(key.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"));
    // The CLI, given the passphrase like the server, issues; the device connects with it.
    let files = gw.provision("RE4A000555", "00:1B:2C:3D:4E:55");
    let (_client, mut eventloop) = device_client(&gw, &files);
    assert_eq!(
        connack(&mut eventloop).await.unwrap(),
        ConnectReturnCode::Success
    );
    // Without the passphrase nothing can sign: the CLI stops and says what is missing.
    let out = std::process::Command::new(BIN)
        .env("TMS_DATA_DIR", gw.data_dir())
        .args(["device", "cert", "RE4A000555", "--out"])
        .arg(gw.dir.path().join("nope"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("TMS_CA_KEY_PASSPHRASE"), "{stderr}");
}

/// SIGTERM is a clean stop every time: no part that ended because it was told to is reported
/// as a failure (the parts end together, so an unordered wait picked one at random).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_always_exits_zero() {
    let mut gw = TestGateway::start().await;
    for round in 0..8 {
        assert_eq!(gw.stop(), Some(0), "round {round}: {}", gw.log());
        assert!(
            !gw.log().contains("stopped unexpectedly"),
            "round {round}: {}",
            gw.log()
        );
        gw.restart().await;
    }
}
