//! Refused connections through the real binary: every refusal recorded with its reason, against
//! the device only when our CA issued what was presented, per peer otherwise — a stranger naming
//! a real serial never touches that device's record.

#![expect(clippy::unwrap_used, reason = "test helpers fail the test loudly")]

mod support;

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{ConnectReturnCode, Event, Packet, QoS, SubscribeReasonCode};
use support::*;
use time::OffsetDateTime;
use tms_certs::Ca;
use tms_model::DeviceSerial;

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
    let forged = issue_between(&foreign, &serial, now, now + time::Duration::days(30));
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
    let expired = issue_expired(&ca, &serial, now);
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
    let suback = next_suback(&mut el).await;
    assert_eq!(suback.return_codes, vec![SubscribeReasonCode::Failure]);
    client
        .subscribe("tms/RE4A000300/cmd/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let suback = next_suback(&mut el).await;
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
    run_ok(
        std::process::Command::new("openssl")
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
            .arg(format!("/CN={serial}")),
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
    let expired = issue_expired(&foreign, &DeviceSerial::parse(serial).unwrap(), now);
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

/// The next SUBACK on `el` (5 s at most for each event before it).
async fn next_suback(el: &mut rumqttc::EventLoop) -> rumqttc::SubAck {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), el.poll())
            .await
            .unwrap()
            .unwrap()
        {
            Event::Incoming(Packet::SubAck(ack)) => break ack,
            _ => continue,
        }
    }
}
