//! The registration, account and Generate Certificate workflow over HTTP, end to end through
//! the real binary, the outbox, a real SMTP server, openssl and mosquitto_pub.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers fail the test loudly"
)]

mod support;

use std::process::Command;
use std::time::Duration;

use reqwest::StatusCode;
use rumqttc::ConnectReturnCode;
use serde_json::{Value, json};
use support::*;

const PROVIDER: &str = "provider@example.com";
const PROVIDER_PASSWORD: &str = "provider-password-1";

fn registration(serial: &str, mac: &str, email: &str, company: &str) -> Value {
    json!({
        "user": {"new": {"first_name": "Ana", "last_name": "Ruiz", "email": email, "phone": "+1 713 555 0100"}},
        "company": {"new": {"name": company}},
        "sales_order": "SO-1234",
        "device": {"type": "RemotEye 4", "serial": serial, "mac": mac, "lease_months": 12},
        "ups": {"model": "1600XP", "model_number": "1600XP-18K", "serial": "160300007", "ship_date": "2025-01-15"},
        "start_date": "2026-11-01",
        "service_contract_sales_order": "SC-77"
    })
}

struct Api {
    http: reqwest::Client,
}

impl Api {
    fn new() -> Self {
        Api {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        }
    }

    async fn call(
        &self,
        method: &str,
        url: String,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method.parse().unwrap(), url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn login(&self, gw: &TestGateway, email: &str, password: &str) -> (StatusCode, Value) {
        self.call(
            "POST",
            gw.url("/api/v1/auth/login"),
            None,
            Some(json!({"email": email, "password": password})),
        )
        .await
    }

    async fn token(&self, gw: &TestGateway, email: &str, password: &str) -> String {
        let (status, body) = self.login(gw, email, password).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["token"].as_str().unwrap().to_owned()
    }
}

fn provider(gw: &TestGateway) {
    gw.cli_stdin(
        &[
            "user",
            "add",
            "--email",
            PROVIDER,
            "--role",
            "provider",
            "--password-stdin",
        ],
        &format!("{PROVIDER_PASSWORD}\n"),
    );
}

/// The two emails of a registration: (activation token, temporary password).
async fn emails_for(gw: &TestGateway, email: &str) -> (String, String) {
    let mails: Vec<String> = wait_for(
        "activation and password emails",
        Duration::from_secs(10),
        || {
            let mails: Vec<String> = gw
                .outbox()
                .into_iter()
                .filter(|m| m.contains(&format!("To: {email}")))
                .collect();
            async move { (mails.len() == 2).then_some(mails) }
        },
    )
    .await;
    let link_prefix = format!("http://{}/activate?token=", gw.ports.http);
    let token = mails
        .iter()
        .flat_map(|m| m.lines())
        .find_map(|l| l.trim().strip_prefix(&link_prefix))
        .expect("activation link")
        .to_owned();
    let password = mails
        .iter()
        .flat_map(|m| m.lines())
        .find_map(|l| l.trim().strip_prefix("Temporary password: "))
        .expect("temporary password line")
        .to_owned();
    (token, password)
}

/// Registers a customer with one device and takes the account through activation and the
/// password change; returns the customer's token.
async fn onboard(
    api: &Api,
    gw: &TestGateway,
    provider_token: &str,
    serial: &str,
    mac: &str,
    email: &str,
    company: &str,
) -> String {
    onboard_with(
        api,
        gw,
        provider_token,
        registration(serial, mac, email, company),
        email,
    )
    .await
}

async fn onboard_with(
    api: &Api,
    gw: &TestGateway,
    provider_token: &str,
    body: Value,
    email: &str,
) -> String {
    let (status, body) = api
        .call(
            "POST",
            gw.url("/api/v1/registrations"),
            Some(provider_token),
            Some(body),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (activation, temporary) = emails_for(gw, email).await;
    let (status, _) = api
        .call(
            "POST",
            gw.url("/api/v1/auth/activate"),
            None,
            Some(json!({"token": activation})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let token = api.token(gw, email, &temporary).await;
    let (status, _) = api
        .call(
            "POST",
            gw.url("/api/v1/me/password"),
            Some(&token),
            Some(json!({"current_password": temporary, "new_password": "a-new-password-1"})),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    token
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_workflow_from_registration_to_a_device_on_the_map() {
    let gw = TestGateway::start().await;
    let api = Api::new();
    provider(&gw);
    let provider_token = api.token(&gw, PROVIDER, PROVIDER_PASSWORD).await;

    // Step 4: the provider registers customer + company + device.
    let (status, body) = api
        .call(
            "POST",
            gw.url("/api/v1/registrations"),
            Some(&provider_token),
            Some(registration(
                "RE4A000123",
                "00-1b-2c-3d-4e-5f",
                "ana@example.com",
                "Acme Hospital",
            )),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["device_serial"], "RE4A000123");
    assert_eq!(body["emails"], json!(["activation", "password"]));

    // Step 5: two emails.
    let (activation, temporary) = emails_for(&gw, "ana@example.com").await;

    // Not before activation.
    let (status, body) = api.login(&gw, "ana@example.com", &temporary).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"]["code"], "account_inactive");

    // Step 6: activate, once.
    let (status, _) = api
        .call(
            "POST",
            gw.url("/api/v1/auth/activate"),
            None,
            Some(json!({"token": activation})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = api
        .call(
            "POST",
            gw.url("/api/v1/auth/activate"),
            None,
            Some(json!({"token": activation})),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "tokens are single-use: {body}"
    );

    // Step 7: log in with the temporary password; nothing but /me until it is changed.
    let (status, body) = api.login(&gw, "ana@example.com", &temporary).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["must_change_password"], true);
    let token = body["token"].as_str().unwrap().to_owned();
    let (status, body) = api
        .call("GET", gw.url("/api/v1/devices"), Some(&token), None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["error"]["code"], "password_change_required");
    let (status, me) = api
        .call("GET", gw.url("/api/v1/me"), Some(&token), None)
        .await;
    assert_eq!(
        (status, me["role"].as_str()),
        (StatusCode::OK, Some("customer"))
    );
    let (status, _) = api
        .call(
            "POST",
            gw.url("/api/v1/me/password"),
            Some(&token),
            Some(json!({"current_password": temporary, "new_password": "correct horse battery"})),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = api.login(&gw, "ana@example.com", &temporary).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "the temporary password is gone"
    );

    // Step 8: find the device by serial.
    let (status, list) = api
        .call(
            "GET",
            gw.url("/api/v1/devices?q=re4a0001"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["mac"], "00:1B:2C:3D:4E:5F");
    assert_eq!(list[0]["status"]["state"], "never_connected");

    // Step 9: Generate Certificate, as a zip.
    let resp = api
        .http
        .post(gw.url("/api/v1/devices/RE4A000123/certificate"))
        .bearer_auth(&token)
        .header("Accept", "application/zip")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let bytes = resp.bytes().await.unwrap();
    let files_dir = gw.dir.path().join("download");
    std::fs::create_dir_all(&files_dir).unwrap();
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(bytes.to_vec())).unwrap();
    let mut names = Vec::new();
    for i in 0..archive.len() {
        let mut f = archive.by_index(i).unwrap();
        names.push(f.name().to_owned());
        let mut out = std::fs::File::create(files_dir.join(f.name())).unwrap();
        std::io::copy(&mut f, &mut out).unwrap();
    }
    names.sort();
    assert_eq!(names, ["RE4A000123.key", "RE4A000123.pem", "ca.pem"]);
    let verify = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(files_dir.join("ca.pem"))
        .arg(files_dir.join("RE4A000123.pem"))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "openssl verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );

    // Steps 10–11: the device connects with the downloaded files and publishes.
    let files = DeviceFiles {
        serial: "RE4A000123".into(),
        key: files_dir.join("RE4A000123.key"),
        pem: files_dir.join("RE4A000123.pem"),
        ca: files_dir.join("ca.pem"),
    };
    let out = gw.mosquitto_pub(
        "localhost",
        &files,
        "RE4A000123",
        "tms/RE4A000123/telemetry",
        TELEMETRY,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (client, mut el) = device_client(&gw, &files);
    assert_eq!(connack(&mut el).await, Ok(ConnectReturnCode::Success));
    let _driver = drive(el);
    let status_url = gw.url("/api/v1/devices/RE4A000123/status");
    wait_for(
        "status online over HTTP",
        Duration::from_secs(2),
        || async {
            let (_, s) = api
                .call("GET", status_url.clone(), Some(&token), None)
                .await;
            (s["state"] == "online").then_some(())
        },
    )
    .await;
    let (_, telemetry) = api
        .call(
            "GET",
            gw.url("/api/v1/devices/RE4A000123/telemetry?limit=5"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(telemetry[0]["payload"]["load_pct"], 42);

    // Step 12: on the map the moment it reports a location.
    publish(
        &client,
        "RE4A000123",
        "location",
        r#"{"lat": 29.7604, "lon": -95.3698}"#,
    )
    .await;
    let map = wait_for("device on the map", Duration::from_secs(2), || async {
        let (_, map) = api
            .call("GET", gw.url("/api/v1/locations"), Some(&token), None)
            .await;
        (map["features"].as_array().is_some_and(|f| !f.is_empty())).then_some(map)
    })
    .await;
    let feature = &map["features"][0];
    assert_eq!(
        feature["geometry"]["coordinates"],
        json!([-95.3698, 29.7604])
    );
    assert_eq!(feature["properties"]["serial"], "RE4A000123");
    assert_eq!(feature["properties"]["state"], "online");
    assert_eq!(feature["properties"]["ups_model"], "1600XP");
}

/// Two customers of different companies, onboarded by the provider: Ana owns RE4A000001
/// (Acme Hospital), Bob RE4A000002 (Globex). Returns their tokens.
async fn ana_and_bob(api: &Api, gw: &TestGateway) -> (String, String) {
    let provider_token = api.token(gw, PROVIDER, PROVIDER_PASSWORD).await;
    let ana = onboard(
        api,
        gw,
        &provider_token,
        "RE4A000001",
        "00:1B:2C:3D:4E:01",
        "ana@example.com",
        "Acme Hospital",
    )
    .await;
    let bob = onboard(
        api,
        gw,
        &provider_token,
        "RE4A000002",
        "00:1B:2C:3D:4E:02",
        "bob@example.com",
        "Globex",
    )
    .await;
    (ana, bob)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customers_see_only_their_own_devices() {
    let gw = TestGateway::start().await;
    let api = Api::new();
    provider(&gw);
    let (ana, bob) = ana_and_bob(&api, &gw).await;

    let device_routes = [
        ("GET", "/api/v1/devices/RE4A000001", None),
        ("GET", "/api/v1/devices/RE4A000001/status", None),
        ("GET", "/api/v1/devices/RE4A000001/telemetry", None),
        ("GET", "/api/v1/devices/RE4A000001/quarantine", None),
        (
            "PUT",
            "/api/v1/devices/RE4A000001/location",
            Some(json!({"lat": 1.0, "lon": 2.0})),
        ),
        ("POST", "/api/v1/devices/RE4A000001/certificate", None),
        ("DELETE", "/api/v1/devices/RE4A000001/certificate", None),
        (
            "POST",
            "/api/v1/devices/RE4A000001/commands",
            Some(json!({"name": "self_test"})),
        ),
        ("GET", "/api/v1/devices/RE4A000001/commands", None),
    ];
    for (method, path, body) in &device_routes {
        let (status, other) = api
            .call(method, gw.url(path), Some(&bob), body.clone())
            .await;
        let (missing_status, missing) = api
            .call(
                method,
                gw.url(&path.replace("RE4A000001", "RE4A999999")),
                Some(&bob),
                body.clone(),
            )
            .await;
        assert_eq!(
            status,
            StatusCode::NOT_FOUND,
            "{method} {path} as another customer: {other}"
        );
        assert_eq!(missing_status, StatusCode::NOT_FOUND);
        assert_eq!(
            other["error"]["message"]
                .as_str()
                .unwrap()
                .replace("RE4A000001", "X"),
            missing["error"]["message"]
                .as_str()
                .unwrap()
                .replace("RE4A999999", "X"),
            "no existence oracle"
        );
        let (status, _) = api.call(method, gw.url(path), None, body.clone()).await;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "{method} {path} without a token"
        );
        let (status, _) = api
            .call(method, gw.url(path), Some(&ana), body.clone())
            .await;
        assert!(
            status.is_success(),
            "{method} {path} as the owner: {status}"
        );
    }
    let (_, list) = api
        .call("GET", gw.url("/api/v1/devices"), Some(&bob), None)
        .await;
    let serials: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["serial"].as_str().unwrap())
        .collect();
    assert_eq!(serials, ["RE4A000002"]);
    let (_, map) = api
        .call("GET", gw.url("/api/v1/locations"), Some(&bob), None)
        .await;
    assert_eq!(
        map["features"].as_array().unwrap().len(),
        0,
        "ana's manual location is not bob's"
    );

    let (status, _) = api
        .call(
            "POST",
            gw.url("/api/v1/registrations"),
            Some(&ana),
            Some(registration(
                "RE4A000003",
                "00:1B:2C:3D:4E:03",
                "eve@example.com",
                "Evil",
            )),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "a customer cannot register");
    let (status, _) = api.call("GET", gw.url("/api/v1/devices"), None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = api
        .call("GET", gw.url("/api/v1/devices"), Some("not-a-token"), None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_names_every_bad_field_and_refuses_duplicates() {
    let gw = TestGateway::start().await;
    let api = Api::new();
    provider(&gw);
    let token = api.token(&gw, PROVIDER, PROVIDER_PASSWORD).await;
    let url = gw.url("/api/v1/registrations");

    let cases: Vec<(&str, Value, &str)> = vec![
        ("user.new.email", json!("ana.example.com"), "user.new.email"),
        ("user.new.phone", json!("call me maybe"), "user.new.phone"),
        ("device.mac", json!("01:00:5E:00:00:01"), "device.mac"),
        ("device.mac", json!("00:00:00:00:00:00"), "device.mac"),
        ("device.mac", json!("00:1B:2C:3D:4E"), "device.mac"),
        ("device.serial", json!("RE4/../x"), "device.serial"),
        ("device.serial", json!("x".repeat(65)), "device.serial"),
        ("device.lease_months", json!(0), "device.lease_months"),
        ("device.lease_months", json!(121), "device.lease_months"),
        ("start_date", json!("2026-13-01"), "start_date"),
        ("ups.ship_date", json!("15/01/2025"), "ups.ship_date"),
        ("ups.model", Value::Null, "ups.model"),
    ];
    for (path, value, field) in cases {
        let mut body = registration("RE4A000010", "00:1B:2C:3D:4E:10", "ana@example.com", "Acme");
        let mut target = &mut body;
        let parts: Vec<&str> = path.split('.').collect();
        for p in &parts[..parts.len() - 1] {
            target = &mut target[*p];
        }
        target[parts[parts.len() - 1]] = value.clone();
        let (status, resp) = api
            .call("POST", url.clone(), Some(&token), Some(body))
            .await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{path} = {value}: {resp}"
        );
        assert!(
            resp["error"]["fields"][field].is_string(),
            "{field} not named for {value}: {resp}"
        );
        assert!(resp["error"]["message"].as_str().unwrap().contains(field));
    }
    // Several bad fields: all named at once.
    let mut body = registration("bad serial!", "zz", "nope", "Acme");
    body["device"]["lease_months"] = json!(500);
    let (status, resp) = api
        .call("POST", url.clone(), Some(&token), Some(body))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    for field in [
        "device.serial",
        "device.mac",
        "user.new.email",
        "device.lease_months",
    ] {
        assert!(
            resp["error"]["fields"][field].is_string(),
            "{field} missing: {resp}"
        );
    }
    // Nothing was created by the failed attempts.
    let (_, list) = api
        .call("GET", gw.url("/api/v1/devices"), Some(&token), None)
        .await;
    assert_eq!(list.as_array().unwrap().len(), 0);

    let ok = registration("RE4A000010", "00:1B:2C:3D:4E:10", "ana@example.com", "Acme");
    let (status, body) = api.call("POST", url.clone(), Some(&token), Some(ok)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // lease_months defaults to 12.
    let (_, device) = api
        .call(
            "GET",
            gw.url("/api/v1/devices/RE4A000010"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(device["lease_months"], 12);
    assert_eq!(device["lease_end"], "2027-11-01");

    let mut dup_serial = registration(
        "RE4A000010",
        "00:1B:2C:3D:4E:11",
        "other@example.com",
        "Other",
    );
    dup_serial["company"] = json!({"new": {"name": "Other"}});
    let (status, body) = api
        .call("POST", url.clone(), Some(&token), Some(dup_serial))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let dup_mac = registration("RE4A000011", "001b2c3d4e10", "other@example.com", "Other");
    let (status, body) = api
        .call("POST", url.clone(), Some(&token), Some(dup_mac))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("MAC"));
    // The failed duplicates created no account: that email is still free.
    let ok = registration(
        "RE4A000011",
        "00:1B:2C:3D:4E:11",
        "other@example.com",
        "Other",
    );
    let (status, body) = api.call("POST", url, Some(&token), Some(ok)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emails_go_over_smtp_and_a_failed_delivery_is_retried() {
    // An SMTP port with nobody listening yet: the registration must still succeed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let smtp_url = format!("smtp://127.0.0.1:{port}");
    let gw = TestGateway::start_with(&[
        ("TMS_MAIL_SMTP_URL", &smtp_url),
        ("TMS_MAIL_RETRY_BASE_SECS", "1"),
    ])
    .await;
    let api = Api::new();
    provider(&gw);
    let token = api.token(&gw, PROVIDER, PROVIDER_PASSWORD).await;
    let (status, body) = api
        .call(
            "POST",
            gw.url("/api/v1/registrations"),
            Some(&token),
            Some(registration(
                "RE4A000060",
                "00:1B:2C:3D:4E:60",
                "ana@example.com",
                "Acme",
            )),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    let maildir = gw.dir.path().join("maildir");
    let mut server = Command::new("python3")
        .args([
            "-m",
            "aiosmtpd",
            "-n",
            "-l",
            &format!("127.0.0.1:{port}"),
            "-c",
            "aiosmtpd.handlers.Mailbox",
        ])
        .arg(&maildir)
        .spawn()
        .expect("python3 with aiosmtpd (scripts/test installs it)");
    let received = wait_for("two emails over SMTP", Duration::from_secs(30), || {
        let files: Vec<String> = std::fs::read_dir(maildir.join("new"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                    .collect()
            })
            .unwrap_or_default();
        async move { (files.len() == 2).then_some(files) }
    })
    .await;
    server.kill().unwrap();
    server.wait().unwrap();
    assert!(received.iter().any(|m| m.contains("/activate?token=")));
    assert!(received.iter().any(|m| m.contains("Temporary password: ")));
    assert!(received.iter().all(|m| m.contains("ana@example.com")));
    assert!(
        gw.outbox().is_empty(),
        "with SMTP configured nothing goes to the outbox"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failed_logins_lock_the_account_and_tokens_end_with_logout() {
    let gw = TestGateway::start().await;
    let api = Api::new();
    provider(&gw);
    for _ in 0..5 {
        let (status, _) = api.login(&gw, PROVIDER, "wrong password").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let (status, body) = api.login(&gw, PROVIDER, PROVIDER_PASSWORD).await;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "locked even with the right password: {body}"
    );
    // An unknown account answers exactly like a wrong password.
    let (status, body) = api.login(&gw, "nobody@example.com", "whatever").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["code"], "invalid_credentials");

    let admin = "admin@example.com";
    gw.cli_stdin(
        &[
            "user",
            "add",
            "--email",
            admin,
            "--role",
            "admin",
            "--password-stdin",
        ],
        "admin-password-1\n",
    );
    let token = api.token(&gw, admin, "admin-password-1").await;
    let (status, _) = api
        .call("GET", gw.url("/api/v1/me"), Some(&token), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = api
        .call("POST", gw.url("/api/v1/auth/logout"), Some(&token), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = api
        .call("GET", gw.url("/api/v1/me"), Some(&token), None)
        .await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "a logged-out token is dead"
    );

    let (status, doc) = api
        .call("GET", gw.url("/api/v1/openapi.json"), None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/api/v1/registrations"]["post"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customers_are_told_once_when_a_lease_ends_within_30_days() {
    let gw = TestGateway::start_with(&[("TMS_MAIL_RETRY_BASE_SECS", "1")]).await;
    let api = Api::new();
    provider(&gw);
    let provider_token = api.token(&gw, PROVIDER, PROVIDER_PASSWORD).await;
    // A 12-month lease that started 12 months less 10 days ago ends in 10 days.
    let today = time::OffsetDateTime::now_utc().date();
    let start = tms_registry::provisioning::lease_end(today, -12) + time::Duration::days(10);
    let mut body = registration("RE4A000070", "00:1B:2C:3D:4E:70", "ana@example.com", "Acme");
    body["start_date"] = json!(start.to_string());
    let token = onboard_with(&api, &gw, &provider_token, body, "ana@example.com").await;
    let notice = |gw: &TestGateway| {
        gw.outbox()
            .into_iter()
            .filter(|m| m.contains("lease of device RE4A000070"))
            .count()
    };
    wait_for("the lease notice", Duration::from_secs(10), || {
        let n = notice(&gw);
        async move { (n == 1).then_some(()) }
    })
    .await;
    let (_, device) = api
        .call(
            "GET",
            gw.url("/api/v1/devices/RE4A000070"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(device["lease_days_left"], 9, "{device}");
    // The device is marked as told, so no later sweep picks it up again.
    let store = gw.store().await;
    let due = store
        .lease_notices_due(tms_model::now_ms(), 30 * 86_400_000)
        .await
        .unwrap();
    assert!(due.is_empty(), "{due:?}");
    assert_eq!(notice(&gw), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_pages_are_served_with_a_strict_policy_and_no_cookie() {
    let gw = TestGateway::start().await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let root = http.get(gw.url("/")).send().await.unwrap();
    assert!(root.status().is_redirection());
    assert_eq!(root.headers()["location"], "/devices");
    for page in [
        "/login",
        "/activate?token=x",
        "/profile",
        "/register",
        "/devices",
        "/devices/RE4A000123",
        "/certificates",
        "/map",
    ] {
        let res = http.get(gw.url(page)).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{page}");
        let h = res.headers().clone();
        assert!(h["content-type"].to_str().unwrap().starts_with("text/html"));
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
            "{csp}"
        );
        assert_eq!(h["referrer-policy"], "no-referrer", "{page}");
        assert!(h.get("set-cookie").is_none(), "{page} sets a cookie");
        // A page is a shell: no device data without the API (and its bearer token).
        let body = res.text().await.unwrap();
        assert!(body.contains("<main id=\"main\""), "{page}");
        assert!(body.contains("/assets/app.js?v="), "{page}");
    }
    let js = http.get(gw.url("/assets/app.js")).send().await.unwrap();
    assert_eq!(js.status(), StatusCode::OK);
    let etag = js.headers()["etag"].clone();
    let again = http
        .get(gw.url("/assets/app.js"))
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
    let map = http
        .get(gw.url("/assets/countries-110m.json"))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(map["type"], "Topology");
    let missing = http.get(gw.url("/assets/nope.js")).send().await.unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
}

/// Permission bits of a file or directory.
fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_at_rest_are_private_and_delivered_mails_forget_their_text() {
    use sqlx::Row;
    // A umask that leaves new files world-readable, as most shells and services have.
    let gw = TestGateway::start_with_umask("022", &[]).await;
    let api = Api::new();
    provider(&gw);
    let provider_token = api.token(&gw, PROVIDER, PROVIDER_PASSWORD).await;
    let email = "ana@example.com";
    let (status, body) = api
        .call(
            "POST",
            gw.url("/api/v1/registrations"),
            Some(&provider_token),
            Some(registration(
                "RE4A000070",
                "00:1B:2C:3D:4E:70",
                email,
                "Acme",
            )),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (activation, password) = emails_for(&gw, email).await;

    // Delivered: the queue keeps recipient, subject and time, not the text.
    sqlx::any::install_default_drivers();
    let db = gw.data_dir().join("tms.db");
    let pool = sqlx::AnyPool::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let rows = wait_for("both mails marked sent", Duration::from_secs(10), || {
        let conn = &pool;
        async move {
            let rows = sqlx::query(
                "SELECT recipient, subject, message, sent_at FROM mail_queue WHERE recipient = $1",
            )
            .bind(email)
            .fetch_all(conn)
            .await
            .unwrap();
            let sent = rows
                .iter()
                .filter(|r| r.get::<Option<i64>, _>("sent_at").is_some())
                .count();
            (rows.len() == 2 && sent == 2).then_some(rows)
        }
    })
    .await;
    let mut subjects: Vec<String> = rows.iter().map(|r| r.get("subject")).collect();
    subjects.sort();
    assert_eq!(
        subjects,
        [
            "Activate your UPS monitoring account",
            "Your temporary password"
        ]
    );
    for row in &rows {
        let message: String = row.get("message");
        assert_eq!(message, "", "a delivered mail kept its text");
    }
    let anywhere: Vec<String> = sqlx::query("SELECT message FROM mail_queue")
        .fetch_all(&pool)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get("message"))
        .collect();
    assert!(
        !anywhere
            .iter()
            .any(|m| m.contains(&password) || m.contains(&activation)),
        "the temporary password or the activation token is still in mail_queue"
    );
    pool.close().await;

    // Files: private whatever the umask.
    let data = gw.data_dir();
    for dir in ["", "ca", "server", "outbox"] {
        assert_eq!(mode(&data.join(dir)), 0o700, "{dir:?}");
    }
    for file in [
        "tms.db",
        "tms.db-wal",
        "tms.db-shm",
        "ca/ca.key",
        "server/server.key",
    ] {
        assert_eq!(mode(&data.join(file)), 0o600, "{file}");
    }
    let mails: Vec<_> = std::fs::read_dir(data.join("outbox"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(mails.len(), 2, "{mails:?}");
    for mail in &mails {
        assert_eq!(mode(mail), 0o600, "{}", mail.display());
    }
}

/// Issue #12 row 1: a NUL (or another control character) in a registration field, a query or
/// a login email is refused by name before it reaches the store — on PostgreSQL too, which
/// cannot hold a NUL in text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_are_refused_by_name_before_the_store() {
    let mut backends = vec![None];
    if let Some(url) = fresh_postgres_url("nul").await {
        backends.push(Some(url));
    }
    for url in backends {
        let extra: Vec<(&str, &str)> = url
            .as_deref()
            .map(|u| vec![("TMS_DATABASE_URL", u)])
            .unwrap_or_default();
        let gw = TestGateway::start_with(&extra).await;
        let backend = if url.is_some() { "postgres" } else { "sqlite" };
        let api = Api::new();
        provider(&gw);
        let token = api.token(&gw, PROVIDER, PROVIDER_PASSWORD).await;
        for (field, path) in [
            ("user.new.first_name", &["user", "new", "first_name"][..]),
            ("user.new.email", &["user", "new", "email"][..]),
            ("company.new.name", &["company", "new", "name"][..]),
            ("ups.serial", &["ups", "serial"][..]),
            ("sales_order", &["sales_order"][..]),
        ] {
            let mut body =
                registration("RE4ANUL1", "00:1B:2C:3D:4E:70", "nul@example.com", "Nul Co");
            let mut slot = &mut body;
            for key in path {
                slot = &mut slot[*key];
            }
            *slot = json!("Ana\u{0}Ruiz@example.com");
            let (status, answer) = api
                .call(
                    "POST",
                    gw.url("/api/v1/registrations"),
                    Some(&token),
                    Some(body),
                )
                .await;
            assert_eq!(
                status,
                StatusCode::UNPROCESSABLE_ENTITY,
                "{backend} {field}: {answer}"
            );
            assert_eq!(answer["error"]["code"], "validation_failed", "{answer}");
            assert!(
                answer["error"]["fields"][field].is_string(),
                "{backend}: {field} not named in {answer}"
            );
        }
        // A tab or an escape sequence has no place in a one-line field either.
        let mut body = registration("RE4ANUL1", "00:1B:2C:3D:4E:70", "nul@example.com", "Nul Co");
        body["user"]["new"]["last_name"] = json!("Ruiz\u{1b}[2J");
        let (status, answer) = api
            .call(
                "POST",
                gw.url("/api/v1/registrations"),
                Some(&token),
                Some(body),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
        assert!(
            answer["error"]["fields"]["user.new.last_name"].is_string(),
            "{answer}"
        );

        let (status, answer) = api
            .call(
                "GET",
                gw.url("/api/v1/devices?q=RE4A%00"),
                Some(&token),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{backend}: {answer}");
        assert_eq!(answer["error"]["code"], "bad_request");
        assert!(answer["error"]["fields"]["q"].is_string(), "{answer}");

        let (status, answer) = api.login(&gw, "provider\u{0}@example.com", "x").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{backend}: {answer}");
        assert_eq!(answer["error"]["code"], "invalid_credentials");

        // Nothing was stored, and the store still answers.
        let (status, devices) = api
            .call("GET", gw.url("/api/v1/devices"), Some(&token), None)
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(devices, json!([]), "{backend}");
        assert!(!gw.log().contains("22021"), "{backend}: {}", gw.log());
    }
}

/// Issue #12 row 11: a MAC holding a multi-byte character is a 422 naming `device.mac`, not a
/// handler panic; the CLI says so and exits 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mac_with_a_multibyte_character_is_refused_not_a_panic() {
    let gw = TestGateway::start().await;
    let api = Api::new();
    provider(&gw);
    let token = api.token(&gw, PROVIDER, PROVIDER_PASSWORD).await;
    for mac in ["0é123456789", "00:1B:2C:3D:4E:5é", "é0:1B:2C:3D:4E:5"] {
        let (status, answer) = api
            .call(
                "POST",
                gw.url("/api/v1/registrations"),
                Some(&token),
                Some(registration("RE4AMAC1", mac, "mac@example.com", "Mac Co")),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{mac}: {answer}");
        assert!(
            answer["error"]["fields"]["device.mac"]
                .as_str()
                .is_some_and(|m| m.contains("hex digits")),
            "{answer}"
        );
    }
    let out = gw.cli_output(&[
        "device",
        "add",
        "--serial",
        "RE4AMAC2",
        "--mac",
        "0é123456789",
        "--company",
        "Mac Co",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("MAC address"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Issue #12 row 7: a flood of logins for unknown emails costs bounded memory; what the
/// argon2 workers and their line cannot take is answered 429 at once, with Retry-After.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_flood_stays_bounded_in_memory_and_excess_is_turned_away_quickly() {
    let gw = TestGateway::start().await;
    let api = Api::new();
    provider(&gw);
    let pid = gw.pid();
    let url = gw.url("/api/v1/auth/login");
    let flood_for = Duration::from_secs(6);
    let started = std::time::Instant::now();
    let clients: Vec<_> = (0..64)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                // (status, code, has Retry-After, seconds to answer)
                let mut answers = Vec::new();
                while started.elapsed() < flood_for {
                    let sent = std::time::Instant::now();
                    let resp = http
                        .post(&url)
                        .json(&json!({"email": format!("nobody{i}@example.com"), "password": "guess-guess-1"}))
                        .send()
                        .await
                        .unwrap();
                    let status = resp.status();
                    let retry_after = resp.headers().contains_key("retry-after");
                    let body: Value = resp.json().await.unwrap();
                    let code = body["error"]["code"].as_str().unwrap_or("").to_owned();
                    answers.push((status, code, retry_after, sent.elapsed().as_secs_f64()));
                }
                answers
            })
        })
        .collect();
    let mut peak_mib = 0;
    while started.elapsed() < flood_for {
        peak_mib = peak_mib.max(rss_mib(pid));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut answers = Vec::new();
    for c in clients {
        answers.extend(c.await.unwrap());
    }
    peak_mib = peak_mib.max(rss_mib(pid));
    let busy: Vec<_> = answers
        .iter()
        .filter(|a| a.0 == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    let evaluated = answers
        .iter()
        .filter(|a| a.0 == StatusCode::UNAUTHORIZED)
        .count();
    eprintln!(
        "{} answers: {evaluated} evaluated, {} turned away; peak RSS {peak_mib} MiB",
        answers.len(),
        busy.len()
    );
    assert!(peak_mib < 400, "RSS reached {peak_mib} MiB under the flood");
    assert_eq!(
        evaluated + busy.len(),
        answers.len(),
        "only 401 or 429: {answers:?}"
    );
    assert!(evaluated > 0, "some logins were still checked");
    assert!(
        !busy.is_empty(),
        "64 at once exceed the workers and their line"
    );
    for (_, code, retry_after, secs) in &busy {
        assert_eq!(code, "busy");
        assert!(retry_after, "429 without Retry-After");
        assert!(*secs < 1.0, "a turned-away login took {secs:.2} s");
    }
    // The flood over, a real login works at once.
    api.token(&gw, PROVIDER, PROVIDER_PASSWORD).await;
}

/// Issue #12 row 9: 40 wrong passwords at once for one account: exactly five are checked,
/// every other answer is 429, and the right password is locked out too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_wrong_passwords_get_exactly_five_checks_then_the_lock() {
    let gw = TestGateway::start().await;
    provider(&gw);
    let url = gw.url("/api/v1/auth/login");
    let guesses: Vec<_> = (0..40)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let resp = reqwest::Client::new()
                    .post(url)
                    .json(&json!({"email": PROVIDER, "password": format!("wrong-guess-{i}")}))
                    .send()
                    .await
                    .unwrap();
                resp.status()
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for g in guesses {
        statuses.push(g.await.unwrap());
    }
    let checked = statuses
        .iter()
        .filter(|s| **s == StatusCode::UNAUTHORIZED)
        .count();
    assert_eq!(checked, 5, "{statuses:?}");
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::UNAUTHORIZED || *s == StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
    let resp = reqwest::Client::new()
        .post(&url)
        .json(&json!({"email": PROVIDER, "password": PROVIDER_PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (800..=900).contains(&retry_after),
        "Retry-After {retry_after}"
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_attempts");
}

/// Issue #12 row 10: clients that trickle header lines are cut off after
/// `http.header_timeout_secs`; beyond `http.max_connections` connections wait unaccepted, so
/// they hold no descriptor of the gateway and a device still connects over MQTT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_http_clients_are_cut_off_and_cannot_crowd_out_devices() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = TestGateway::start_with(&[
        ("TMS_HTTP_MAX_CONNECTIONS", "8"),
        ("TMS_HTTP_HEADER_TIMEOUT_SECS", "2"),
        ("TMS_HTTP_REQUEST_TIMEOUT_SECS", "2"),
    ])
    .await;
    let files = gw.provision("RE4ASLOW1", "00:1B:2C:3D:4E:71");
    let pid = gw.pid();
    let fds_before = open_fds(pid);
    let started = std::time::Instant::now();
    let slow: Vec<_> = (0..40)
        .map(|_| {
            let addr = gw.ports.http;
            tokio::spawn(async move {
                let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                tcp.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
                let mut buf = [0u8; 256];
                loop {
                    // One more header line every 300 ms, never the blank line that ends them.
                    match tokio::time::timeout(Duration::from_millis(300), tcp.read(&mut buf)).await
                    {
                        Ok(Ok(0) | Err(_)) => return started.elapsed(),
                        Ok(Ok(_)) => {}
                        Err(_) => {
                            if tcp.write_all(b"X-Slow: 1\r\n").await.is_err() {
                                return started.elapsed();
                            }
                        }
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fds_during = open_fds(pid);
    assert!(
        fds_during <= fds_before + 8 + 4,
        "40 slow clients took {} descriptors (cap 8)",
        fds_during - fds_before
    );
    let (_client, mut eventloop) = device_client(&gw, &files);
    assert_eq!(
        connack(&mut eventloop).await,
        Ok(ConnectReturnCode::Success),
        "a device connects while HTTP is flooded"
    );
    let mut closed_after = Vec::new();
    for s in slow {
        let after = tokio::time::timeout(Duration::from_secs(30), s)
            .await
            .expect("a slow client was never cut off")
            .unwrap();
        closed_after.push(after);
    }
    closed_after.sort();
    eprintln!(
        "descriptors {fds_before} -> {fds_during} with 40 slow clients; cut off after {:?} .. {:?}",
        closed_after[0],
        closed_after[closed_after.len() - 1]
    );
    assert!(
        closed_after[0] < Duration::from_secs(4),
        "the first slow clients are cut off after the 2 s header timeout: {closed_after:?}"
    );

    // A body that never comes: 408 in the JSON shape after the request timeout.
    let mut tcp = tokio::net::TcpStream::connect(gw.ports.http).await.unwrap();
    tcp.write_all(
        b"POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer))
        .await
        .expect("answered within the request timeout")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""code":"request_timeout""#), "{answer}");

    let health = reqwest::get(gw.url("/healthz")).await.unwrap();
    assert_eq!(
        health.status(),
        StatusCode::OK,
        "served again once they are gone"
    );
}

/// Issue #12 row 16: the answers axum makes by itself — 413, 405, 400 for a bad query, 404 —
/// are in the JSON error shape like every other error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_answer_is_in_the_json_error_shape() {
    let gw = TestGateway::start().await;
    let token = admin_token(&gw).await;
    let http = reqwest::Client::new();
    let check = |resp: reqwest::Response, status: StatusCode, code: &'static str| async move {
        assert_eq!(resp.status(), status);
        let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(
            content_type.starts_with("application/json"),
            "{content_type}"
        );
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{body}"
        );
    };
    let big = format!(
        r#"{{"email": "a@example.com", "password": "{}"}}"#,
        "x".repeat(100_000)
    );
    let resp = http
        .post(gw.url("/api/v1/auth/login"))
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    check(resp, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;

    let resp = http.delete(gw.url("/healthz")).send().await.unwrap();
    assert!(resp.headers().contains_key("allow"), "Allow kept");
    check(resp, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;

    let resp = http
        .get(gw.url("/api/v1/devices?q=a&q=b"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    check(resp, StatusCode::BAD_REQUEST, "bad_request").await;

    let resp = http.get(gw.url("/no/such/route")).send().await.unwrap();
    check(resp, StatusCode::NOT_FOUND, "not_found").await;

    let resp = http
        .post(gw.url("/api/v1/auth/login"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    check(resp, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_payload_is_shown_to_its_owner_and_on_the_command_line() {
    let gw = TestGateway::start().await;
    let api = Api::new();
    provider(&gw);
    let (ana, bob) = ana_and_bob(&api, &gw).await;
    let files = gw.issue("RE4A000001");
    let (client, mut el) = device_client(&gw, &files);
    assert_eq!(connack(&mut el).await, Ok(ConnectReturnCode::Success));
    let _driver = drive(el);
    publish(
        &client,
        "RE4A000001",
        "telemetry",
        r#"{"load_pct": "very high"}"#,
    )
    .await;
    // Not UTF-8 at all: shown with the bad byte replaced, and its true length.
    client
        .publish(
            "tms/RE4A000001/info",
            rumqttc::QoS::AtLeastOnce,
            false,
            b"{\"firmware\": \"\xff\"}".to_vec(),
        )
        .await
        .unwrap();
    let store = gw.store().await;
    wait_for(
        "both payloads quarantined",
        Duration::from_secs(5),
        || async { (store.quarantined("RE4A000001", 10).await.unwrap().len() == 2).then_some(()) },
    )
    .await;

    let url = gw.url("/api/v1/devices/re4a000001/quarantine");
    let (status, rows) = api.call("GET", url.clone(), Some(&ana), None).await;
    assert_eq!(status, StatusCode::OK, "{rows}");
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    // Newest first.
    assert_eq!(rows[0]["topic"], "tms/RE4A000001/info");
    assert_eq!(rows[0]["payload"], "{\"firmware\": \"\u{fffd}\"}");
    assert_eq!(rows[0]["payload_bytes"], 17);
    assert_eq!(rows[1]["topic"], "tms/RE4A000001/telemetry");
    assert_eq!(rows[1]["payload"], r#"{"load_pct": "very high"}"#);
    assert!(
        rows[1]["error"]
            .as_str()
            .unwrap()
            .contains("load_pct must be a number"),
        "{rows:?}"
    );
    assert!(rows[1]["received_at"].is_string());
    let (status, one) = api
        .call("GET", format!("{url}?limit=1"), Some(&ana), None)
        .await;
    assert_eq!((status, one.as_array().unwrap().len()), (StatusCode::OK, 1));
    let (status, _) = api
        .call("GET", format!("{url}?limit=0"), Some(&ana), None)
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    // Another customer cannot tell the device exists.
    let (status, _) = api.call("GET", url, Some(&bob), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, doc) = api
        .call("GET", gw.url("/api/v1/openapi.json"), None, None)
        .await;
    assert!(doc["paths"]["/api/v1/devices/{serial}/quarantine"]["get"].is_object());

    let cli = gw.cli(&["device", "quarantine", "RE4A000001"]);
    assert!(cli.contains("load_pct must be a number"), "{cli}");
    assert!(cli.contains("tms/RE4A000001/telemetry"), "{cli}");
    assert!(cli.contains("(17 bytes)"), "{cli}");
    let clean = gw.cli(&["device", "quarantine", "RE4A000002"]);
    assert!(clean.contains("no rejected payloads"), "{clean}");
}
