//! The registration workflow over HTTP, end to end through the real binary and its outbox:
//! a device registered, onboarded and online on the map; customers scoped to their company;
//! every bad field named; a rejected payload shown to its owner.

mod support;

use std::process::Command;
use std::time::Duration;

use reqwest::StatusCode;
use rumqttc::ConnectReturnCode;
use serde_json::{Value, json};
use support::onboarding::*;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_workflow_from_registration_to_a_device_on_the_map() {
    let (gw, api, provider_token) = provider_gateway().await;

    // Step 4: the provider registers customer + company + device.
    let (status, body) = api
        .register(
            &gw,
            Some(&provider_token),
            registration(
                "RE4A000123",
                "00-1b-2c-3d-4e-5f",
                "ana@example.com",
                "Acme Hospital",
            ),
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
    let (status, _) = api.activate(&gw, &activation).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = api.activate(&gw, &activation).await;
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
        .register(
            &gw,
            Some(&ana),
            registration("RE4A000003", "00:1B:2C:3D:4E:03", "eve@example.com", "Evil"),
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
    let (gw, api, token) = provider_gateway().await;
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
