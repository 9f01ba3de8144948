//! The command line as an operator meets it: help that answers the usual questions, and
//! commands whose output a person can read.

#![expect(clippy::unwrap_used, reason = "tests fail loudly")]

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::*;

fn show_json(gw: &TestGateway, serial: &str) -> Value {
    serde_json::from_str(&gw.cli(&["device", "show", serial, "--json"])).unwrap()
}

fn help(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).arg("--help").output().unwrap();
    assert!(out.status.success(), "{args:?} --help failed");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn device_add_help_names_the_mac_formats_units_and_defaults() {
    let text = help(&["device", "add"]);
    for want in [
        "00:1B:2C:3D:4E:5F",
        "00-1B-2C-3D-4E-5F",
        "001B2C3D4E5F",
        "YYYY-MM-DD",
        "months",
        "[default: 12]",
        "[default: \"RemotEye 4\"]",
    ] {
        assert!(
            text.contains(want),
            "`device add --help` lacks {want:?}:\n{text}"
        );
    }
    let simulate = help(&["simulate"]);
    assert!(simulate.contains("Seconds between telemetry"), "{simulate}");
    assert!(simulate.contains("[default: 5]"), "{simulate}");
    assert!(simulate.contains("--storm"), "{simulate}");
}

#[tokio::test]
async fn a_location_set_on_the_command_line_reaches_the_map() {
    let gw = TestGateway::start().await;
    let out = gw.device_add(
        "RE4L000001",
        "00-1b-2c-3d-4e-01",
        "Acme Hospital",
        &["--lat", "-33.8688", "--lon", "151.2093"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let location = &show_json(&gw, "RE4L000001")["location"];
    assert_eq!(location["lat"], -33.8688);
    assert_eq!(location["lon"], 151.2093);
    // Stored as the API's PUT …/location stores it: a location set by hand.
    assert_eq!(location["source"], "operator");

    let moved = gw.cli(&[
        "device",
        "locate",
        "re4l000001",
        "--lat",
        "48.8566",
        "--lon",
        "2.3522",
    ]);
    assert!(moved.contains("48.8566"), "{moved}");
    let token = admin_token(&gw).await;
    let (status, map) = api_get(&gw, &token, "/api/v1/locations").await;
    assert_eq!(status, 200);
    let feature = map["features"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["properties"]["serial"] == "RE4L000001")
        .expect("the device is on the map");
    assert_eq!(
        feature["geometry"]["coordinates"],
        serde_json::json!([2.3522, 48.8566])
    );

    // Out of range: usage error naming the flag, and nothing changes (nor is a device added).
    let bad = gw.cli_output(&[
        "device",
        "locate",
        "RE4L000001",
        "--lat",
        "91",
        "--lon",
        "0",
    ]);
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("--lat 91 is outside -90..90"), "{err}");
    let bad = gw.device_add(
        "RE4L000002",
        "00:1B:2C:3D:4E:02",
        "Acme Hospital",
        &["--lat", "10", "--lon", "-190"],
    );
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--lon -190 is outside -180..180"));
    let list = gw.cli(&["device", "list"]);
    assert!(!list.contains("RE4L000002"), "{list}");
    // --lat alone is refused by the parser.
    let half = gw.device_add(
        "RE4L000003",
        "00:1B:2C:3D:4E:03",
        "Acme Hospital",
        &["--lat", "10"],
    );
    assert_eq!(half.status.code(), Some(2));
    let none = gw.cli_output(&["device", "locate", "RE4L000001"]);
    assert_eq!(none.status.code(), Some(2));
    // Without a location, as before.
    let plain = gw.device_add("RE4L000004", "00:1B:2C:3D:4E:04", "Acme Hospital", &[]);
    assert!(
        plain.status.success(),
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );
    assert!(show_json(&gw, "RE4L000004")["location"].is_null());
    assert_eq!(show_json(&gw, "RE4L000001")["location"]["lat"], 48.8566);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_show_reads_as_a_summary_status_and_why_first() {
    let gw = TestGateway::start().await;
    let files = gw.provision("RE4S000001", "00:1B:2C:3D:4E:51");
    // A wrong client id: refused, so the device has never connected, and that is why.
    let (_c, mut el) = mqtt_client(
        &gw,
        "RE4S000001-typo",
        client_tls(&files.ca, Some((&files.pem, &files.key))),
    );
    assert!(connack(&mut el).await != Ok(rumqttc::ConnectReturnCode::Success));
    drop(el);
    let store = gw.store().await;
    wait_refusal(&store, "RE4S000001", "client_id_mismatch").await;
    let text = gw.cli(&["device", "show", "RE4S000001"]);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("RE4S000001: never connected"), "{text}");
    let why = lines.next().unwrap();
    assert!(
        why.contains("last refused")
            && why.contains("client_id_mismatch")
            && why.contains("RE4S000001-typo"),
        "{text}"
    );

    // Online, with two certificates (one line each) and a location.
    let newer = gw.issue("RE4S000001");
    gw.cli(&[
        "device",
        "locate",
        "RE4S000001",
        "--lat",
        "52.52",
        "--lon",
        "13.405",
    ]);
    let (_client, mut el) = device_client(&gw, &newer);
    assert_eq!(
        connack(&mut el).await,
        Ok(rumqttc::ConnectReturnCode::Success)
    );
    let _driver = drive(el);
    wait_state(
        &store,
        "RE4S000001",
        tms_model::ConnState::Online,
        Duration::from_secs(5),
    )
    .await;
    let text = gw.cli(&["device", "show", "re4s000001"]);
    let first = text.lines().next().unwrap();
    assert!(first.starts_with("RE4S000001: online since "), "{text}");
    assert!(first.contains(" from 127.0.0.1:"), "{text}");
    let detail = show_json(&gw, "RE4S000001");
    let certificates = detail["certificates"].as_array().unwrap();
    assert_eq!(certificates.len(), 2);
    assert!(text.contains("\ncertificates (2)\n"), "{text}");
    for c in certificates {
        let serial = c["serial_number"].as_str().unwrap();
        let line = text
            .lines()
            .find(|l| l.contains(serial))
            .unwrap_or_else(|| panic!("no line for certificate {serial}:\n{text}"));
        assert!(line.contains(c["not_after"].as_str().unwrap()), "{line}");
        assert!(line.contains("valid") || line.contains("revoked"), "{line}");
    }
    assert!(
        text.contains("location: 52.52000, 13.40500 (operator, "),
        "{text}"
    );
    assert!(text.contains("\nrecent refusals (1)\n"), "{text}");
    assert!(
        text.contains("client_id_mismatch  1 attempt(s) from 127.0.0.1:"),
        "{text}"
    );
    // Not the old key dump.
    assert!(!text.contains("sha256_fingerprint"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_devices_report_locations_so_the_demo_map_fills() {
    let gw = TestGateway::start().await;
    let simulate = || {
        let out = gw.cli_output(&[
            "simulate",
            "--devices",
            "6",
            "--interval",
            "0.5",
            "--duration",
            "1",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    simulate();
    let store = gw.store().await;
    let serials: Vec<String> = (0..6).map(|i| format!("SIM{i:07}")).collect();
    let places = wait_for(
        "every simulated device located",
        Duration::from_secs(5),
        || async {
            let mut places = Vec::new();
            for serial in &serials {
                let l = store.location(serial).await.unwrap()?;
                places.push((l.lat, l.lon, l.source));
            }
            Some(places)
        },
    )
    .await;
    for (lat, lon, source) in &places {
        assert_eq!(source, "device", "reported by the device itself");
        assert!(
            (34.0..=62.0).contains(lat) && (-10.0..=27.0).contains(lon),
            "{lat},{lon} in Europe"
        );
    }
    let distinct: std::collections::HashSet<_> = places
        .iter()
        .map(|(lat, lon, _)| (lat.to_bits(), lon.to_bits()))
        .collect();
    assert!(distinct.len() >= 4, "spread, not one dot: {places:?}");

    let token = admin_token(&gw).await;
    let (_, map) = api_get(&gw, &token, "/api/v1/locations").await;
    assert_eq!(map["features"].as_array().unwrap().len(), 6, "{map}");

    // The same place in the next run.
    simulate();
    for (serial, (lat, lon, _)) in serials.iter().zip(&places) {
        let l = store.location(serial).await.unwrap().unwrap();
        assert_eq!((l.lat, l.lon), (*lat, *lon), "{serial} moved between runs");
    }
}
