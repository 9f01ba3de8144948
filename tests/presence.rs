//! Presence and location end to end: takeovers, keep-alive timeouts, data freshness,
//! availability history, location sources, and the UPS identity check.

#![expect(clippy::unwrap_used, reason = "test helpers fail the test loudly")]

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rumqttc::ConnectReturnCode;
use serde_json::{Value, json};
use support::*;
use tms_model::ConnState;

async fn get(http: &reqwest::Client, gw: &TestGateway, token: &str, path: &str) -> Value {
    http.get(gw.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_connection_wins_and_both_sessions_record_the_takeover() {
    let gw = TestGateway::start().await;
    let files = gw.provision("RE4A002000", "00:1B:2C:3D:50:00");
    let store = gw.store().await;
    let (_first, mut el1) = device_client(&gw, &files);
    assert_eq!(connack(&mut el1).await, Ok(ConnectReturnCode::Success));
    let first_session = wait_for("first online", Duration::from_secs(2), || async {
        let s = status(&store, "RE4A002000").await;
        (s.state == ConnState::Online).then(|| s.session_id.clone().unwrap())
    })
    .await;
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        while el1.poll().await.is_ok() {}
        let _ = closed_tx.send(());
    });

    let (_second, mut el2) = device_client(&gw, &files);
    assert_eq!(connack(&mut el2).await, Ok(ConnectReturnCode::Success));
    let _driver = drive(el2);
    tokio::time::timeout(Duration::from_secs(2), closed_rx)
        .await
        .expect("the first connection was not closed")
        .unwrap();
    let s = wait_for("second session current", Duration::from_secs(2), || async {
        let s = status(&store, "RE4A002000").await;
        (s.session_id.as_deref() != Some(&first_session)).then_some(s)
    })
    .await;
    assert_eq!(
        s.state,
        ConnState::Online,
        "the takeover must not mark the device offline"
    );

    let now = tms_model::Clock::now_ms(&tms_model::SystemClock);
    let sessions = wait_for(
        "takeover in the history",
        Duration::from_secs(2),
        || async {
            let sessions = store
                .sessions("RE4A002000", now - 60_000, now + 60_000)
                .await
                .unwrap();
            (sessions.len() == 2 && sessions[0].end_reason.is_some()).then_some(sessions)
        },
    )
    .await;
    assert_eq!(sessions[0].session_id, first_session);
    assert_eq!(sessions[0].end_reason.as_deref(), Some("taken_over"));
    assert!(sessions[1].ended_at.is_none(), "the new session is open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_stops_answering_is_offline_after_one_and_a_half_keep_alives() {
    let gw = TestGateway::start().await;
    let files = gw.provision("RE4A002100", "00:1B:2C:3D:50:10");
    let store = gw.store().await;
    // mosquitto_sub with a 5 s keep-alive, then frozen: no reads, no writes, socket open.
    let mut sub = Command::new("mosquitto_sub")
        .args([
            "-h",
            "localhost",
            "-p",
            &gw.mqtt_port().to_string(),
            "-k",
            "5",
            "--cafile",
        ])
        .arg(&files.ca)
        .arg("--cert")
        .arg(&files.pem)
        .arg("--key")
        .arg(&files.key)
        .args(["-i", "RE4A002100", "-t", "tms/RE4A002100/cmd/#"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let s = wait_for("online", Duration::from_secs(5), || async {
        let s = status(&store, "RE4A002100").await;
        (s.state == ConnState::Online).then_some(s)
    })
    .await;
    assert_eq!(s.keep_alive_secs, Some(5));
    Command::new("kill")
        .args(["-STOP", &sub.id().to_string()])
        .status()
        .unwrap();
    let frozen = Instant::now();
    let s = wait_for("offline by keep-alive", Duration::from_secs(10), || async {
        let s = status(&store, "RE4A002100").await;
        (s.state == ConnState::Offline).then_some(s)
    })
    .await;
    Command::new("kill")
        .args(["-KILL", &sub.id().to_string()])
        .status()
        .unwrap();
    let _ = sub.wait();
    assert_eq!(
        s.last_disconnect_reason.as_deref(),
        Some("keepalive_timeout")
    );
    assert!(
        frozen.elapsed() <= Duration::from_millis(7500 + 1000),
        "offline after {:?}",
        frozen.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silence_identity_locations_and_availability_over_the_api() {
    let gw = TestGateway::start_with(&[("TMS_PRESENCE_SILENT_AFTER_INTERVALS", "2")]).await;
    let files = gw.provision("RE4A002200", "00:1B:2C:3D:50:20");
    let http = reqwest::Client::new();
    let token = admin_token(&gw).await;
    let (client, mut el) = device_client(&gw, &files);
    assert_eq!(connack(&mut el).await, Ok(ConnectReturnCode::Success));
    let _driver = drive(el);

    // Telemetry every 200 ms: fresh, not silent; its usual interval is learned.
    for _ in 0..6 {
        publish(&client, "RE4A002200", "telemetry", TELEMETRY).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status_path = "/api/v1/devices/RE4A002200/status";
    let s = wait_for("fresh telemetry", Duration::from_secs(2), || async {
        let s = get(&http, &gw, &token, status_path).await;
        (s["telemetry_interval_secs"]
            .as_f64()
            .is_some_and(|i| i > 0.1 && i < 0.5))
        .then_some(s)
    })
    .await;
    assert_eq!(s["state"], "online");
    // Then nothing: silent after two usual intervals, while still online.
    let s = wait_for("silent", Duration::from_secs(5), || async {
        let s = get(&http, &gw, &token, status_path).await;
        (s["silent"] == true).then_some(s)
    })
    .await;
    assert_eq!(s["state"], "online");

    // System Name check (seed step 2): another UPS is flagged, the registered one clears it.
    let detail_path = "/api/v1/devices/RE4A002200";
    let report_system_name = async |system_name: &str, mismatch: bool, what: &str| {
        let info = format!(r#"{{"system_name": "{system_name}"}}"#);
        publish(&client, "RE4A002200", "info", &info).await;
        wait_for(what, Duration::from_secs(2), || async {
            let d = get(&http, &gw, &token, detail_path).await;
            (d["ups_identity"]["mismatch"] == mismatch).then_some(())
        })
        .await;
    };
    report_system_name("1600XP 18kVA 999999999", true, "identity mismatch flagged").await;
    let metrics = scrape(&gw).await;
    assert_eq!(
        metrics.get("tms_devices_identity_mismatch").copied(),
        Some(1.0)
    );
    report_system_name("1600XP 18kVA 160300007", false, "identity confirmed").await;

    // Location sources: operator, then device; the device's own wins and both are kept.
    let resp = http
        .put(gw.url("/api/v1/devices/RE4A002200/location"))
        .bearer_auth(&token)
        .json(&json!({"lat": 10.0, "lon": 20.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    publish(
        &client,
        "RE4A002200",
        "location",
        r#"{"lat": 29.76, "lon": -95.37, "accuracy_m": 8}"#,
    )
    .await;
    let d = wait_for("device location wins", Duration::from_secs(2), || async {
        let d = get(&http, &gw, &token, detail_path).await;
        (d["location"]["source"] == "device").then_some(d)
    })
    .await;
    assert_eq!(d["locations"].as_array().unwrap().len(), 2);
    http.put(gw.url("/api/v1/devices/RE4A002200/location"))
        .bearer_auth(&token)
        .json(&json!({"lat": 11.0, "lon": 21.0}))
        .send()
        .await
        .unwrap();
    let d = get(&http, &gw, &token, detail_path).await;
    assert_eq!(
        d["location"]["source"], "device",
        "a later operator location does not override the device's own"
    );
    let map = get(&http, &gw, &token, "/api/v1/locations").await;
    assert_eq!(
        map["features"][0]["geometry"]["coordinates"],
        json!([-95.37, 29.76])
    );

    // Availability: the session so far covers part of the last 24 h.
    let a = get(
        &http,
        &gw,
        &token,
        "/api/v1/devices/RE4A002200/availability?window=24h",
    )
    .await;
    assert_eq!(a["sessions"].as_array().unwrap().len(), 1, "{a}");
    assert!(a["uptime_pct"].as_f64().unwrap() > 0.0, "{a}");
    let bad = http
        .get(gw.url("/api/v1/devices/RE4A002200/availability?window=1y"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 422);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt5_client_is_told_the_keep_alive_the_gateway_enforces() {
    use rumqttc::v5::mqttbytes::v5::Packet as P5;
    use rumqttc::v5::{AsyncClient, Event, MqttOptions};
    let gw = TestGateway::start().await;
    let files = gw.provision("RE4A002300", "00:1B:2C:3D:50:30");
    let mut opts = MqttOptions::new("RE4A002300", "localhost", gw.mqtt_port());
    opts.set_keep_alive(Duration::from_secs(7200)); // above the gateway's 3600 s maximum
    opts.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(
        client_tls(&files.ca, Some((&files.pem, &files.key))),
    )));
    let (_client, mut el) = AsyncClient::new(opts, 10);
    let ack = loop {
        match tokio::time::timeout(Duration::from_secs(10), el.poll())
            .await
            .unwrap()
            .unwrap()
        {
            Event::Incoming(P5::ConnAck(ack)) => break ack,
            _ => continue,
        }
    };
    assert_eq!(ack.properties.and_then(|p| p.server_keep_alive), Some(3600));
    let store = gw.store().await;
    let s = wait_state(
        &store,
        "RE4A002300",
        ConnState::Online,
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(s.keep_alive_secs, Some(3600));
}

/// History retention (`presence.history_retention_days`) covers alarms too: a cleared alarm
/// past it whose notice went out is gone once the gateway's housekeeping runs (at start, then
/// hourly); an alarm still open, however old, and one cleared within the window stay.
#[tokio::test(flavor = "multi_thread")]
async fn cleared_alarms_past_the_history_retention_are_pruned() {
    use tms_store::{AlarmChange, Channel, WriteBatch};
    let mut gw = TestGateway::start_with(&[("TMS_PRESENCE_HISTORY_RETENTION_DAYS", "1")]).await;
    let admin = admin_token(&gw).await;
    gw.provision("RE4A000051", "00:1B:2C:3D:4E:51");
    gw.stop();

    let (now, day) = (
        tms_model::Clock::now_ms(&tms_model::SystemClock),
        86_400_000,
    );
    let raise = |code: &str, at: i64| AlarmChange::Raise {
        serial: "RE4A000051".into(),
        code: code.into(),
        severity: "critical",
        at,
        detail: "{}".into(),
    };
    let clear = |code: &str, at: i64| AlarmChange::Clear {
        serial: "RE4A000051".into(),
        code: code.into(),
        at,
    };
    let store = gw.store().await;
    store
        .write_batch(&WriteBatch {
            alarms: vec![
                raise("on_battery", now - 3 * day),
                clear("on_battery", now - 2 * day),
                raise("battery_bad", now - 3 * day),
                raise("overload", now - 3 * day),
                clear("overload", now - 3_600_000),
            ],
            ..WriteBatch::default()
        })
        .await
        .unwrap();
    // Their notices went out (no webhook configured), as the notifier would have done.
    for company in store
        .notice_due_companies(Channel::Email, now, now)
        .await
        .unwrap()
    {
        let group = store
            .notice_group(Channel::Email, company, None)
            .await
            .unwrap();
        assert!(
            store
                .queue_alarm_mail(&group, &[], true, now)
                .await
                .unwrap()
        );
    }
    store.close().await;

    gw.restart().await;
    let codes = || async {
        let (status, list) = api_get(&gw, &admin, "/api/v1/alarms?state=all").await;
        assert_eq!(status, 200, "{list}");
        let mut codes: Vec<String> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["code"].as_str().unwrap().to_owned())
            .collect();
        codes.sort();
        codes
    };
    wait_for(
        "the old cleared alarm pruned",
        Duration::from_secs(15),
        || async {
            let now = codes().await;
            (now == ["battery_bad", "overload"]).then_some(())
        },
    )
    .await;
}
