//! Generate Certificate over HTTP: a CSR keeps the device's key (checked with openssl), the
//! CRL is served, and concurrent issues and lease renewals are ordered and all counted.

#![expect(clippy::unwrap_used, reason = "test helpers fail the test loudly")]

mod support;

use std::process::Command;

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::onboarding::*;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csr_keeps_the_device_key_and_the_crl_is_served() {
    let (gw, api, provider_token) = provider_gateway().await;
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
    run_ok(
        Command::new("openssl")
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
            .arg(&csr),
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
    concurrent_issues_and_renewals(&gw).await;
}

/// The same on PostgreSQL, where requests really run side by side on several connections.
/// Needs `TMS_TEST_DATABASE_URL`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_issues_and_renewals_on_postgres() {
    let Some(url) = fresh_postgres_url("concurrent").await else {
        return;
    };
    let gw = TestGateway::start_with(&[("TMS_DATABASE_URL", &url)]).await;
    concurrent_issues_and_renewals(&gw).await;
}

/// RFC 3339 from the API, as a time (the text has as many fraction digits as it needs, so it
/// does not sort as text).
fn at(v: &Value) -> time::OffsetDateTime {
    let text = v.as_str().unwrap_or_else(|| panic!("a time: {v}"));
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).unwrap()
}

async fn concurrent_issues_and_renewals(gw: &TestGateway) {
    const ISSUES: usize = 20;
    const RENEWALS: usize = 10;
    const MONTHS: i32 = 3;
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
    let token = admin_token(gw).await;
    // Each request from a task of its own, all at once.
    let all_at_once = |n: usize, method: &'static str, path: &str, body: Option<Value>| {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..n {
            let (url, token, body) = (gw.url(path), token.clone(), body.clone());
            set.spawn(async move { Api::new().call(method, url, Some(&token), body).await });
        }
        set.join_all()
    };
    let mut issued = std::collections::HashMap::new();
    for (status, body) in all_at_once(
        ISSUES,
        "POST",
        "/api/v1/devices/RE4A000060/certificate",
        None,
    )
    .await
    {
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let serial = body["serial_number"].as_str().unwrap().to_owned();
        assert!(
            issued.insert(serial, body).is_none(),
            "twenty distinct certificates"
        );
    }
    assert_eq!(issued.len(), ISSUES);

    // What the device's owner sees: every certificate, newest first, strictly ordered.
    let (status, detail) = api_get(gw, &token, "/api/v1/devices/RE4A000060").await;
    assert_eq!(status, 200, "{detail}");
    let listed = detail["certificates"].as_array().unwrap();
    assert_eq!(
        listed.len(),
        ISSUES,
        "every request recorded its certificate"
    );
    for pair in listed.windows(2) {
        assert!(
            at(&pair[0]["issued_at"]) > at(&pair[1]["issued_at"]),
            "strictly newest first, no two at one time: {pair:?}"
        );
    }
    let listed_serials: std::collections::HashSet<_> = listed
        .iter()
        .map(|c| c["serial_number"].as_str().unwrap().to_owned())
        .collect();
    let answered: std::collections::HashSet<_> = issued.keys().cloned().collect();
    assert_eq!(
        listed_serials, answered,
        "the ones handed out, and no other"
    );
    let newest = listed[0]["serial_number"].as_str().unwrap().to_owned();
    assert_eq!(
        detail["certificate"]["serial_number"], newest,
        "the current certificate is the newest: {detail}"
    );

    // Rotation: the first connect with the newest ends all nineteen others at once.
    let dir = gw.dir.path().join("newest");
    std::fs::create_dir_all(&dir).unwrap();
    let answer = &issued[&newest];
    let files = DeviceFiles {
        serial: "RE4A000060".into(),
        key: dir.join("RE4A000060.key"),
        pem: dir.join("RE4A000060.pem"),
        ca: dir.join("ca.pem"),
    };
    std::fs::write(&files.key, answer["private_key_pem"].as_str().unwrap()).unwrap();
    std::fs::write(&files.pem, answer["certificate_pem"].as_str().unwrap()).unwrap();
    std::fs::write(&files.ca, answer["ca_pem"].as_str().unwrap()).unwrap();
    let (_client, mut eventloop) = device_client(gw, &files);
    assert_eq!(
        connack(&mut eventloop).await.unwrap(),
        rumqttc::ConnectReturnCode::Success
    );
    let driver = drive(eventloop);
    let valid = wait_for(
        "the older certificates superseded",
        std::time::Duration::from_secs(10),
        || async {
            let (_, detail) = api_get(gw, &token, "/api/v1/devices/RE4A000060").await;
            let certs = detail["certificates"].as_array()?.clone();
            let valid: Vec<Value> = certs
                .iter()
                .filter(|c| c["revoked_at"].is_null())
                .cloned()
                .collect();
            (valid.len() == 1).then_some((valid, certs))
        },
    )
    .await;
    let (valid, certs) = valid;
    assert_eq!(valid[0]["serial_number"], newest);
    assert!(
        certs
            .iter()
            .filter(|c| c["serial_number"] != newest)
            .all(|c| c["revocation_reason"] == "superseded"),
        "{certs:?}"
    );
    driver.abort();

    // N renewals of k months at once move the end by N*k months, each seeing the one before.
    let lease_end = |detail: &Value| {
        let text = detail["lease_end"].as_str().unwrap();
        time::Date::parse(
            text,
            time::macros::format_description!("[year]-[month]-[day]"),
        )
        .unwrap()
    };
    let months_between = |from: time::Date, to: time::Date| {
        (to.year() - from.year()) * 12 + (to.month() as i32 - from.month() as i32)
    };
    let before = lease_end(&detail);
    let mut ends = Vec::new();
    for (status, body) in all_at_once(
        RENEWALS,
        "POST",
        "/api/v1/devices/RE4A000060/lease",
        Some(json!({"months": MONTHS})),
    )
    .await
    {
        assert_eq!(status, StatusCode::OK, "{body}");
        ends.push(months_between(before, at(&body["lease_ends_at"]).date()));
    }
    ends.sort_unstable();
    let expected: Vec<i32> = (1..=RENEWALS as i32).map(|i| i * MONTHS).collect();
    assert_eq!(ends, expected, "each renewal extended the one before it");
    let (_, after) = api_get(gw, &token, "/api/v1/devices/RE4A000060").await;
    assert_eq!(
        after["lease_months"].as_i64().unwrap(),
        detail["lease_months"].as_i64().unwrap() + (RENEWALS as i64) * i64::from(MONTHS),
        "no renewal lost"
    );
    let end = lease_end(&after);
    assert_eq!(
        months_between(before, end),
        RENEWALS as i32 * MONTHS,
        "the end moved by {RENEWALS} x {MONTHS} months: {before} -> {end}"
    );
    assert_eq!(end.day(), before.day(), "{before} -> {end}");
}
