//! Certificate lifecycle end to end: revocation in under a second, rotation with overlap,
//! validity and lease refusals with their reasons, retry storms, server certificate renewal.

#![expect(clippy::unwrap_used, reason = "test helpers fail the test loudly")]

mod support;

use std::time::{Duration, Instant};

use rumqttc::{ConnectReturnCode, Event, Packet, QoS};
use serde_json::Value;
use support::*;
use time::OffsetDateTime;
use tms_certs::{Ca, DeviceKey};
use tms_model::{ConnState, DeviceSerial};

/// Writes a certificate made with an injected clock and returns its files.
fn files_from(
    gw: &TestGateway,
    serial: &str,
    name: &str,
    issued: &tms_certs::IssuedCert,
) -> DeviceFiles {
    let dir = gw.dir.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("d.pem"), &issued.certificate_pem).unwrap();
    std::fs::write(
        dir.join("d.key"),
        issued.private_key_pem.as_deref().unwrap(),
    )
    .unwrap();
    std::fs::copy(gw.data_dir().join("ca/ca.pem"), dir.join("ca.pem")).unwrap();
    DeviceFiles {
        serial: serial.into(),
        key: dir.join("d.key"),
        pem: dir.join("d.pem"),
        ca: dir.join("ca.pem"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_through_the_api_disconnects_within_a_second_and_refuses_reconnects() {
    let gw = TestGateway::start().await;
    let files = gw.provision("RE4A001000", "00:1B:2C:3D:4F:00");
    let store = gw.store().await;
    let token = admin_token(&gw).await;
    let (_client, mut el) = device_client(&gw, &files);
    assert_eq!(connack(&mut el).await, Ok(ConnectReturnCode::Success));
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        while el.poll().await.is_ok() {}
        let _ = closed_tx.send(Instant::now());
    });

    let resp = reqwest::Client::new()
        .delete(gw.url("/api/v1/devices/RE4A001000/certificate"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let revoked_at = Instant::now();
    assert_eq!(resp.status(), 200);
    let closed = tokio::time::timeout(Duration::from_secs(3), closed_rx)
        .await
        .expect("session not closed")
        .unwrap();
    let took = closed.saturating_duration_since(revoked_at);
    assert!(
        took < Duration::from_secs(1),
        "revoked session closed after {took:?}"
    );
    let s = wait_for("offline: revoked", Duration::from_secs(2), || async {
        let s = status(&store, "RE4A001000").await;
        (s.state == ConnState::Offline).then_some(s)
    })
    .await;
    assert_eq!(s.last_disconnect_reason.as_deref(), Some("revoked"));

    let (_c, mut el) = device_client(&gw, &files);
    assert!(
        connack(&mut el).await.is_err(),
        "a revoked certificate connected"
    );
    wait_refusal(&store, "RE4A001000", "revoked").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_the_old_certificate_until_the_new_one_is_used() {
    let gw = TestGateway::start().await;
    let first = gw.provision("RE4A001100", "00:1B:2C:3D:4F:10");
    let store = gw.store().await;
    let connect = |files: DeviceFiles| {
        let gw = &gw;
        async move {
            let (client, mut el) = device_client(gw, &files);
            let code = connack(&mut el).await;
            let _ = client.disconnect().await;
            while el.poll().await.is_ok() {}
            code
        }
    };
    assert_eq!(connect(first.clone()).await, Ok(ConnectReturnCode::Success));
    let second = gw.issue("RE4A001100");
    // The overlap: both certificates work until the new one is used.
    assert_eq!(
        connect(first.clone()).await,
        Ok(ConnectReturnCode::Success),
        "old certificate during the overlap"
    );
    assert_eq!(
        connect(second.clone()).await,
        Ok(ConnectReturnCode::Success)
    );
    let s = wait_for("old certificate superseded", Duration::from_secs(5), || {
        let first = first.clone();
        let gw = &gw;
        let store = &store;
        async move {
            let (_c, mut el) = device_client(gw, &first);
            if connack(&mut el).await.is_ok() {
                return None;
            }
            let s = status(store, "RE4A001100").await;
            (s.last_connect_error.as_deref() == Some("superseded")).then_some(s)
        }
    })
    .await;
    assert!(
        s.last_connect_error_detail
            .unwrap()
            .contains("newer certificate")
    );
    assert_eq!(
        connect(second).await,
        Ok(ConnectReturnCode::Success),
        "the new certificate stays good"
    );
    let certs = store.certificates_of("RE4A001100").await.unwrap();
    assert_eq!(certs.iter().filter(|c| c.revoked_at.is_none()).count(), 1);
    assert_eq!(
        certs
            .iter()
            .find(|c| c.revoked_at.is_some())
            .unwrap()
            .revocation_reason
            .as_deref(),
        Some("superseded")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_day_overlap_supersedes_the_old_certificate_without_waiting_for_the_device() {
    let gw = TestGateway::start_with(&[("TMS_CERTS_ROTATION_OVERLAP_DAYS", "0")]).await;
    let first = gw.provision("RE4A001150", "00:1B:2C:3D:4F:15");
    let store = gw.store().await;
    let _second = gw.issue("RE4A001150");
    wait_for(
        "old certificate superseded by the overlap sweep",
        Duration::from_secs(10),
        || async {
            let certs = store.certificates_of("RE4A001150").await.unwrap();
            (certs
                .iter()
                .filter(|c| c.revocation_reason.as_deref() == Some("superseded"))
                .count()
                == 1)
                .then_some(())
        },
    )
    .await;
    let gw = &gw;
    wait_for(
        "old certificate refused",
        Duration::from_secs(5),
        || async {
            let (_c, mut el) = device_client(gw, &first);
            connack(&mut el).await.is_err().then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_the_future_is_refused_saying_the_device_clock_is_off() {
    let gw = TestGateway::start().await;
    gw.provision("RE4A001200", "00:1B:2C:3D:4F:20");
    let store = gw.store().await;
    let ca = Ca::load(&gw.data_dir().join("ca")).unwrap();
    let serial = DeviceSerial::parse("RE4A001200").unwrap();
    let later = OffsetDateTime::now_utc() + time::Duration::days(2);
    let future = issue_between(&ca, &serial, later, later + time::Duration::days(30));
    let files = files_from(&gw, "RE4A001200", "future", &future);
    let (_c, mut el) = device_client(&gw, &files);
    assert!(connack(&mut el).await.is_err());
    let s = wait_refusal(&store, "RE4A001200", "not_yet_valid").await;
    assert!(
        s.last_connect_error_detail
            .unwrap()
            .contains("clock is off")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_refused_handshakes_make_a_bounded_number_of_store_writes() {
    let gw = TestGateway::start().await;
    gw.provision("RE4A001300", "00:1B:2C:3D:4F:30");
    let store = gw.store().await;
    let ca = Ca::load(&gw.data_dir().join("ca")).unwrap();
    let serial = DeviceSerial::parse("RE4A001300").unwrap();
    let now = OffsetDateTime::now_utc();
    let expired = issue_expired(&ca, &serial, now);
    let files = files_from(&gw, "RE4A001300", "expired", &expired);
    let tls = client_tls(&files.ca, Some((&files.pem, &files.key)));
    let before = scrape(&gw).await;
    let started = Instant::now();
    for _ in 0..1000 {
        assert!(tls_probe(&gw, tls.clone()).await.is_err());
    }
    let elapsed = started.elapsed();
    wait_for(
        "all 1000 attempts recorded",
        Duration::from_secs(5),
        || async {
            let r = store.refusals("RE4A001300", 10).await.unwrap();
            (r.iter().map(|r| r.attempts).sum::<i64>() == 1000).then_some(())
        },
    )
    .await;
    let after = scrape(&gw).await;
    let writes = delta(&before, &after, "tms_ingest_refusal_writes_total");
    let refused = delta(
        &before,
        &after,
        "tms_broker_connects_refused_total{reason=\"expired\"}",
    );
    eprintln!("1000 refused handshakes in {elapsed:?}: {writes} refusal row writes");
    assert_eq!(refused, 1000.0);
    // One write at once, then at most one per second of the storm (plus the last).
    assert!(
        writes <= elapsed.as_secs_f64().ceil() + 2.0,
        "{writes} writes for a {elapsed:?} storm"
    );
    assert_eq!(
        store.refusals("RE4A001300", 10).await.unwrap().len(),
        1,
        "one coalesced record"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_lease_refuses_with_lease_expired_until_renewed() {
    let gw = TestGateway::start().await;
    gw.cli(&[
        "device",
        "add",
        "--serial",
        "RE4A001400",
        "--mac",
        "00:1B:2C:3D:4F:40",
        "--company",
        "Acme",
        "--start-date",
        "2020-01-01",
        "--lease-months",
        "12",
    ]);
    let store = gw.store().await;
    // A certificate from while the lease ran (injected clock), ending with the lease.
    let ca = Ca::load(&gw.data_dir().join("ca")).unwrap();
    let serial = DeviceSerial::parse("RE4A001400").unwrap();
    let during = time::macros::datetime!(2020-06-01 00:00 UTC);
    let lease_end = time::macros::datetime!(2021-01-01 00:00 UTC);
    let old = ca
        .issue_device(&serial, DeviceKey::Generate, during, lease_end)
        .unwrap();
    let files = files_from(&gw, "RE4A001400", "old", &old);
    let (_c, mut el) = device_client(&gw, &files);
    assert!(connack(&mut el).await.is_err());
    wait_refusal(&store, "RE4A001400", "lease_expired").await;

    let out = gw.cli_output(&[
        "device",
        "cert",
        "RE4A001400",
        "--out",
        gw.dir.path().join("x").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("lease"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    gw.cli(&["device", "renew", "RE4A001400", "--months", "12"]);
    let renewed = gw.issue("RE4A001400");
    let (_c, mut el) = device_client(&gw, &renewed);
    assert_eq!(connack(&mut el).await, Ok(ConnectReturnCode::Success));
    let list: Value = serde_json::from_str(&gw.cli(&["device", "list", "--json"])).unwrap();
    let days = list[0]["lease_days_left"].as_i64().unwrap();
    assert!((360..=366).contains(&days), "lease_days_left {days}");
    assert!(list[0]["certificate_days_left"].as_i64().unwrap() >= 360);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_server_certificate_does_not_disconnect_devices() {
    let gw = TestGateway::start().await;
    let files = gw.provision("RE4A001500", "00:1B:2C:3D:4F:50");
    let store = gw.store().await;
    let (client, mut el) = device_client(&gw, &files);
    assert_eq!(connack(&mut el).await, Ok(ConnectReturnCode::Success));
    let online = wait_for("online", Duration::from_secs(2), || async {
        let s = status(&store, "RE4A001500").await;
        (s.state == ConnState::Online).then_some(s)
    })
    .await;
    let tls = client_tls(&files.ca, Some((&files.pem, &files.key)));
    let before = tls_probe(&gw, tls.clone()).await.unwrap();

    gw.cli(&["ca", "renew-server"]);
    let gw_ref = &gw;
    let after = wait_for(
        "the broker serving the new certificate",
        Duration::from_secs(10),
        || {
            let tls = tls.clone();
            let before = before.clone();
            async move { tls_probe(gw_ref, tls).await.ok().filter(|fp| *fp != before) }
        },
    )
    .await;
    assert_ne!(before, after);

    // The device connected before the renewal is still in the same session and delivers.
    client
        .publish(
            "tms/RE4A001500/telemetry",
            QoS::AtLeastOnce,
            false,
            TELEMETRY,
        )
        .await
        .unwrap();
    let acked = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap_or(false);
    assert!(acked, "the session died with the certificate change");
    let s = status(&store, "RE4A001500").await;
    assert_eq!(
        (s.state, s.session_id),
        (ConnState::Online, online.session_id)
    );
}

/// Runs openssl in `dir`; panics with its stderr when it fails.
fn openssl(dir: &std::path::Path, args: &[&str]) -> String {
    let out = run_ok(
        std::process::Command::new("openssl")
            .current_dir(dir)
            .args(args),
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A key made by `openssl genpkey` and a CSR for CN=`serial` made from it by `openssl req`
/// with its default digest unless `digest` says otherwise. Returns the CSR text.
fn openssl_csr(
    dir: &std::path::Path,
    serial: &str,
    genpkey: &[&str],
    digest: Option<&str>,
) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let mut args = vec!["genpkey"];
    args.extend_from_slice(genpkey);
    args.extend_from_slice(&["-out", "d.key"]);
    openssl(dir, &args);
    let subject = format!("/CN={serial}");
    let mut args = vec![
        "req", "-new", "-key", "d.key", "-subj", &subject, "-out", "d.csr",
    ];
    args.extend(digest);
    openssl(dir, &args);
    std::fs::read_to_string(dir.join("d.csr")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csrs_with_p384_ed25519_and_rsa_keys_give_certificates_that_connect() {
    let gw = TestGateway::start().await;
    let serial = "RE4A001900";
    let working = gw.provision(serial, "00:1B:2C:3D:4F:90");
    let store = gw.store().await;
    let token = admin_token(&gw).await;
    let http = reqwest::Client::new();
    let url = gw.url(&format!("/api/v1/devices/{serial}/certificate"));
    let publish = |files: &DeviceFiles| {
        let out = gw.mosquitto_pub(
            "localhost",
            files,
            serial,
            &format!("tms/{serial}/telemetry"),
            TELEMETRY,
        );
        assert!(
            out.status.success(),
            "mosquitto_pub with {}: {}",
            files.pem.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    publish(&working);

    // Refused CSRs say why, and leave the working certificate as it was.
    let refused = [
        (
            "rsa1024",
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"][..],
            None,
            "1024 bits",
        ),
        (
            "p521",
            &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-521"][..],
            None,
            "curve P-521",
        ),
        (
            "rsa-sha1",
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"][..],
            Some("-sha1"),
            "sha1WithRSAEncryption",
        ),
    ];
    for (name, genpkey, digest, reason) in refused {
        let dir = gw.dir.path().join(name);
        let csr = openssl_csr(&dir, serial, genpkey, digest);
        let (status, body) = post_csr(&http, &url, &token, &csr).await;
        assert_eq!(status, 422, "{name}");
        let message = body["error"]["fields"]["csr_pem"].as_str().unwrap_or("");
        assert!(message.contains(reason), "{name}: {body}");
        // The CLI path refuses it the same way.
        std::fs::write(dir.join("d.csr"), &csr).unwrap();
        let out = gw.cli_output(&[
            "device",
            "cert",
            serial,
            "--out",
            dir.join("out").to_str().unwrap(),
            "--csr",
            dir.join("d.csr").to_str().unwrap(),
        ]);
        assert!(!out.status.success(), "{name} through the CLI");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(reason),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let certs = store.certificates_of(serial).await.unwrap();
    assert_eq!(certs.len(), 1, "a refused CSR recorded a certificate");
    publish(&working);

    // Accepted keys: OpenSSL reads each certificate, finds the CSR's key in it, and a real
    // MQTT client connects with it.
    let accepted = [
        (
            "p384-default",
            &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"][..],
            None,
        ),
        (
            "p384-sha384",
            &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"][..],
            Some("-sha384"),
        ),
        ("ed25519", &["-algorithm", "ED25519"][..], None),
        (
            "rsa2048",
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"][..],
            None,
        ),
    ];
    for (name, genpkey, digest) in accepted {
        let dir = gw.dir.path().join(name);
        let csr = openssl_csr(&dir, serial, genpkey, digest);
        let (status, body) = post_csr(&http, &url, &token, &csr).await;
        assert_eq!(status, 201, "{name}");
        let chain = format!(
            "{}{}",
            body["certificate_pem"].as_str().unwrap(),
            body["ca_pem"].as_str().unwrap()
        );
        std::fs::write(dir.join("d.pem"), chain).unwrap();
        std::fs::write(dir.join("ca.pem"), body["ca_pem"].as_str().unwrap()).unwrap();
        assert_eq!(
            openssl(&dir, &["x509", "-in", "d.pem", "-noout", "-pubkey"]),
            openssl(&dir, &["pkey", "-in", "d.key", "-pubout"]),
            "{name}: the certificate does not carry the device key"
        );
        openssl(&dir, &["verify", "-CAfile", "ca.pem", "d.pem"]);
        let files = DeviceFiles {
            serial: serial.into(),
            key: dir.join("d.key"),
            pem: dir.join("d.pem"),
            ca: dir.join("ca.pem"),
        };
        publish(&files);
        let (_client, mut el) = device_client(&gw, &files);
        assert_eq!(
            connack(&mut el).await,
            Ok(ConnectReturnCode::Success),
            "{name} with rustls"
        );
    }
}

/// POSTs `csr` as `csr_pem` to `url` with `token`: the status and the JSON answer.
async fn post_csr(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    csr: &str,
) -> (reqwest::StatusCode, Value) {
    let resp = http
        .post(url)
        .bearer_auth(token)
        .json(&serde_json::json!({"csr_pem": csr}))
        .send()
        .await
        .unwrap();
    (resp.status(), resp.json().await.unwrap())
}
