//! Generate Certificate over HTTP: a CSR keeps the device's key (checked with openssl), the
//! CRL is served, and concurrent issues and lease renewals are ordered and all counted.

mod support;

use std::process::Command;

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::onboarding::*;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csr_keeps_the_device_key_and_the_crl_is_served() {
    let gw = TestGateway::start().await;
    let api = Api::new();
    provider(&gw);
    let provider_token = api.token(&gw, PROVIDER, PROVIDER_PASSWORD).await;
    let token = onboard(
        &api,
        &gw,
        &provider_token,
        "RE4A000050",
        "00:1B:2C:3D:4E:50",
        "ana@example.com",
        "Acme",
    )
    .await;

    let dir = gw.dir.path();
    let key = dir.join("device.key");
    let csr = dir.join("device.csr");
    let out = Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=RE4A000050",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&csr)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csr_pem = std::fs::read_to_string(&csr).unwrap();
    let (status, body) = api
        .call(
            "POST",
            gw.url("/api/v1/devices/RE4A000050/certificate"),
            Some(&token),
            Some(json!({"csr_pem": csr_pem})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert!(
        body["private_key_pem"].is_null(),
        "no key is made for a CSR"
    );
    let cert = dir.join("device.pem");
    std::fs::write(&cert, body["certificate_pem"].as_str().unwrap()).unwrap();
    let pubkey = |args: &[&str], file: &std::path::Path| {
        let out = Command::new("openssl")
            .args(args)
            .arg(file)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(
        pubkey(&["x509", "-noout", "-pubkey", "-in"], &cert),
        pubkey(&["pkey", "-pubout", "-in"], &key)
    );

    // A CSR for another serial is refused, naming the field.
    let (status, body) = api
        .call("POST", gw.url("/api/v1/devices/RE4A000050/certificate"), Some(&token), Some(json!({"csr_pem": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"})))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(body["error"]["fields"]["csr_pem"].is_string());

    // Revoke, then the CRL lists it for openssl.
    let (status, body) = api
        .call(
            "DELETE",
            gw.url("/api/v1/devices/RE4A000050/certificate"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["revoked"].as_array().unwrap().len(), 1);
    let crl = reqwest::get(gw.url("/crl.pem"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let ca = reqwest::get(gw.url("/ca.pem"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    std::fs::write(dir.join("crl.pem"), crl).unwrap();
    std::fs::write(dir.join("ca.pem"), ca).unwrap();
    let out = Command::new("openssl")
        .args(["verify", "-crl_check", "-CAfile"])
        .arg(dir.join("ca.pem"))
        .arg("-CRLfile")
        .arg(dir.join("crl.pem"))
        .arg(&cert)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("revoked")
            || String::from_utf8_lossy(&out.stderr).contains("revoked")
    );
}

/// Twenty Generate Certificate requests for one device at once give twenty certificates, each
/// recorded with its own issue time (rotation orders a device's certificates by it), and ten
/// lease renewals at once all count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_issues_are_strictly_ordered_and_concurrent_renewals_all_count() {
    let gw = TestGateway::start().await;
    let out = gw.device_add(
        "RE4A000060",
        "00:1B:2C:3D:4E:90",
        "Acme",
        &["--lease-months", "12"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = admin_token(&gw).await;
    // Each request from a task of its own, all at once.
    let all_at_once = |n: usize, method: &'static str, path: &str, body: Option<Value>| {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..n {
            let (url, token, body) = (gw.url(path), token.clone(), body.clone());
            set.spawn(async move { Api::new().call(method, url, Some(&token), body).await });
        }
        set.join_all()
    };
    for (status, body) in
        all_at_once(20, "POST", "/api/v1/devices/RE4A000060/certificate", None).await
    {
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let store = gw.store().await;
    let certs = store.certificates_of("RE4A000060").await.unwrap();
    assert_eq!(certs.len(), 20, "every request recorded its certificate");
    let serials: std::collections::HashSet<_> = certs.iter().map(|c| &c.serial_number).collect();
    assert_eq!(serials.len(), 20, "twenty distinct certificates");
    let mut times: Vec<i64> = certs.iter().map(|c| c.issued_at).collect();
    times.sort_unstable();
    times.dedup();
    assert_eq!(times.len(), 20, "no two share an issue time: {times:?}");

    let before = store.device("RE4A000060").await.unwrap().unwrap().device;
    let renewals = all_at_once(
        10,
        "POST",
        "/api/v1/devices/RE4A000060/lease",
        Some(json!({"months": 1})),
    );
    for (status, body) in renewals.await {
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let after = store.device("RE4A000060").await.unwrap().unwrap().device;
    assert_eq!(
        after.lease_months,
        before.lease_months + 10,
        "no renewal lost"
    );
    let end = |ms: i64| time::OffsetDateTime::from_unix_timestamp(ms / 1000).unwrap();
    let (from, to) = (end(before.lease_ends_at), end(after.lease_ends_at));
    let months = (to.year() - from.year()) * 12 + (to.month() as i32 - from.month() as i32);
    assert_eq!(months, 10, "the end moved by ten months: {from} -> {to}");
}
