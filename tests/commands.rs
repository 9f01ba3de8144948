//! Commands to devices (CONTRACT §9) through the real binary and a real MQTT client: sent
//! through the API or the CLI, published QoS 1 on `tms/<serial>/cmd/<name>` to the device's
//! live session (at once, or when it next subscribes, until the TTL passes), `delivered` on
//! the device's PUBACK, and answered on `tms/<serial>/reply`.

#![expect(clippy::unwrap_used, reason = "tests fail loudly")]

mod support;

use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use serde_json::{Value, json};
use support::*;

/// `POST /api/v1/devices/{serial}/commands`: the status and the answer.
async fn send(gw: &TestGateway, token: &str, serial: &str, body: Value) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .post(gw.url(&format!("/api/v1/devices/{serial}/commands")))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Queues `name` for `serial` and returns the command id.
async fn queue(gw: &TestGateway, token: &str, serial: &str, name: &str, ttl: i64) -> String {
    let (status, body) = send(
        gw,
        token,
        serial,
        json!({"name": name, "args": {"source": "test"}, "ttl_secs": ttl}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["state"], "queued", "{body}");
    body["id"].as_str().unwrap().to_owned()
}

/// The device's commands as the API lists them (newest first).
async fn commands(gw: &TestGateway, token: &str, serial: &str) -> Vec<Value> {
    let (status, list) = api_get(gw, token, &format!("/api/v1/devices/{serial}/commands")).await;
    assert_eq!(status, 200, "{list}");
    list.as_array().unwrap().clone()
}

/// Waits until command `id` is in `state`; returns it.
async fn wait_command(gw: &TestGateway, token: &str, serial: &str, id: &str, state: &str) -> Value {
    wait_for(
        &format!("command {id} {state}"),
        Duration::from_secs(10),
        || async {
            commands(gw, token, serial)
                .await
                .into_iter()
                .find(|c| c["id"] == id && c["state"] == state)
        },
    )
    .await
}

/// A connected device client, subscribed to its command topics.
async fn subscribed(gw: &TestGateway, files: &DeviceFiles) -> (AsyncClient, EventLoop) {
    let (client, mut eventloop) = device_client(gw, files);
    assert_eq!(
        connack(&mut eventloop).await.unwrap(),
        rumqttc::ConnectReturnCode::Success
    );
    subscribe_commands(&client, &mut eventloop, &files.serial).await;
    (client, eventloop)
}

/// The next command PUBLISH the device receives (its PUBACK goes out on later polls).
async fn next_command(eventloop: &mut EventLoop, within: Duration) -> rumqttc::Publish {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => return p,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("connection failed waiting for a command: {e}"),
            Err(_) => panic!("no command within {within:?}"),
        }
    }
}

fn payload(p: &rumqttc::Publish) -> Value {
    serde_json::from_slice(&p.payload).unwrap()
}

/// One gateway per backend: SQLite, and PostgreSQL when `TMS_TEST_DATABASE_URL` is set.
async fn gateways(name: &str) -> Vec<(&'static str, TestGateway)> {
    let mut out = Vec::new();
    let mut urls = vec![None];
    if let Some(url) = fresh_postgres_url(name).await {
        urls.push(Some(url));
    }
    for url in urls {
        let extra: Vec<(&str, &str)> = url
            .as_deref()
            .map(|u| vec![("TMS_DATABASE_URL", u)])
            .unwrap_or_default();
        let backend = if url.is_some() { "postgres" } else { "sqlite" };
        out.push((backend, TestGateway::start_with(&extra).await));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_reaches_a_subscribed_device_within_a_second_and_its_reply_is_recorded() {
    for (backend, gw) in gateways("cmd_live").await {
        let admin = admin_token(&gw).await;
        let files = gw.provision("RE4C000001", "00:1B:2C:3D:5E:01");
        let (client, mut eventloop) = subscribed(&gw, &files).await;

        let sent = Instant::now();
        let id = queue(&gw, &admin, "RE4C000001", "self_test", 3600).await;
        let got = next_command(&mut eventloop, Duration::from_secs(2)).await;
        let took = sent.elapsed();
        assert!(
            took < Duration::from_secs(1),
            "{backend}: arrived after {took:?}"
        );
        assert_eq!(got.topic, "tms/RE4C000001/cmd/self_test", "{backend}");
        assert_eq!(got.qos, QoS::AtLeastOnce, "{backend}");
        let body = payload(&got);
        assert_eq!(body["id"], id.as_str(), "{backend}: {body}");
        assert_eq!(body["name"], "self_test");
        assert_eq!(body["args"], json!({"source": "test"}));
        assert!(body["issued_at"].as_str().unwrap().ends_with('Z'), "{body}");

        // rumqttc PUBACKs on its next polls; the PUBACK is what makes it "delivered".
        let driver = drive(eventloop);
        let delivered = wait_command(&gw, &admin, "RE4C000001", &id, "delivered").await;
        assert!(delivered["delivered_at"].is_string(), "{delivered}");
        assert!(delivered["replied_at"].is_null(), "{delivered}");

        publish(
            &client,
            "RE4C000001",
            "reply",
            &json!({"id": id, "ok": true, "message": "self test passed"}).to_string(),
        )
        .await;
        let done = wait_command(&gw, &admin, "RE4C000001", &id, "succeeded").await;
        assert_eq!(done["reply"]["message"], "self test passed", "{done}");
        assert!(done["replied_at"].is_string(), "{done}");

        // A second command, answered with a failure; the list is newest first.
        let second = queue(&gw, &admin, "RE4C000001", "report_now", 60).await;
        wait_command(&gw, &admin, "RE4C000001", &second, "delivered").await;
        publish(
            &client,
            "RE4C000001",
            "reply",
            &json!({"id": second, "ok": false, "message": "busy"}).to_string(),
        )
        .await;
        wait_command(&gw, &admin, "RE4C000001", &second, "failed").await;
        let list = commands(&gw, &admin, "RE4C000001").await;
        let ids: Vec<&str> = list.iter().map(|c| c["id"].as_str().unwrap()).collect();
        assert_eq!(
            ids,
            [second.as_str(), id.as_str()],
            "{backend}: newest first"
        );
        // A second answer to a command that has one changes nothing.
        publish(
            &client,
            "RE4C000001",
            "reply",
            &json!({"id": id, "ok": false}).to_string(),
        )
        .await;
        // A malformed reply is kept for inspection like any bad payload; it is committed
        // after the replay above, so once it shows, the replay has been applied.
        publish(&client, "RE4C000001", "reply", r#"{"id": 5}"#).await;
        wait_for(
            "the malformed reply quarantined",
            Duration::from_secs(10),
            || async {
                let (_, q) = api_get(&gw, &admin, "/api/v1/devices/RE4C000001/quarantine").await;
                q.as_array()
                    .unwrap()
                    .iter()
                    .find(|r| r["topic"] == "tms/RE4C000001/reply")
                    .cloned()
            },
        )
        .await;
        let first = commands(&gw, &admin, "RE4C000001")
            .await
            .into_iter()
            .find(|c| c["id"] == id.as_str())
            .unwrap();
        assert_eq!(first["state"], "succeeded", "{backend}: {first}");
        driver.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cannot_answer_another_devices_command() {
    let gw = TestGateway::start().await;
    let admin = admin_token(&gw).await;
    let a = gw.provision("RE4C000011", "00:1B:2C:3D:5E:11");
    let b = gw.provision("RE4C000012", "00:1B:2C:3D:5E:12");
    let (_a_client, mut a_loop) = subscribed(&gw, &a).await;
    let id = queue(&gw, &admin, "RE4C000011", "self_test", 3600).await;
    next_command(&mut a_loop, Duration::from_secs(5)).await;
    let a_driver = drive(a_loop);
    wait_command(&gw, &admin, "RE4C000011", &id, "delivered").await;

    // B knows A's command id (say it was leaked) and answers it, on its own reply topic and
    // on A's: neither is recorded. Then B sends a telemetry message, committed after both.
    let (b_client, mut b_loop) = device_client(&gw, &b);
    connack(&mut b_loop).await.unwrap();
    let b_driver = drive(b_loop);
    let answer = json!({"id": id, "ok": false, "message": "forged"}).to_string();
    publish(&b_client, "RE4C000012", "reply", &answer).await;
    publish(&b_client, "RE4C000011", "reply", &answer).await;
    publish(&b_client, "RE4C000012", "telemetry", TELEMETRY).await;
    wait_for("B's telemetry stored", Duration::from_secs(10), || async {
        let (_, t) = api_get(&gw, &admin, "/api/v1/devices/RE4C000012/telemetry").await;
        (!t.as_array().unwrap().is_empty()).then_some(())
    })
    .await;
    let command = commands(&gw, &admin, "RE4C000011").await.remove(0);
    assert_eq!(command["state"], "delivered", "{command}");
    assert!(command["reply"].is_null(), "{command}");
    assert!(commands(&gw, &admin, "RE4C000012").await.is_empty());
    a_driver.abort();
    b_driver.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_queued_while_offline_survives_a_restart_and_goes_out_when_the_device_subscribes()
{
    let mut gw = TestGateway::start().await;
    let admin = admin_token(&gw).await;
    let files = gw.provision("RE4C000021", "00:1B:2C:3D:5E:21");
    let id = queue(&gw, &admin, "RE4C000021", "self_test", 3600).await;
    gw.restart().await;
    // The login, like the command, is in the store and outlives the restart.
    assert_eq!(
        commands(&gw, &admin, "RE4C000021").await[0]["state"],
        "queued"
    );

    // Connected but not subscribed: the command waits (it is not published into the void).
    let (client, mut eventloop) = device_client(&gw, &files);
    connack(&mut eventloop).await.unwrap();
    let store = gw.store().await;
    wait_state(
        &store,
        "RE4C000021",
        tms_model::ConnState::Online,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        commands(&gw, &admin, "RE4C000021").await[0]["state"],
        "queued"
    );
    subscribe_commands(&client, &mut eventloop, "RE4C000021").await;
    let got = next_command(&mut eventloop, Duration::from_secs(2)).await;
    assert_eq!(payload(&got)["id"], id.as_str());
    let driver = drive(eventloop);
    wait_command(&gw, &admin, "RE4C000021", &id, "delivered").await;
    driver.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_command_is_never_delivered() {
    let gw = TestGateway::start().await;
    let admin = admin_token(&gw).await;
    let files = gw.provision("RE4C000031", "00:1B:2C:3D:5E:31");
    let stale = queue(&gw, &admin, "RE4C000031", "self_test", 1).await;
    let expired = wait_command(&gw, &admin, "RE4C000031", &stale, "expired").await;
    assert!(expired["delivered_at"].is_null(), "{expired}");
    // A later command goes out when the device subscribes; the expired one, older, would
    // have gone out first (oldest first) had it not expired.
    let fresh = queue(&gw, &admin, "RE4C000031", "report_now", 3600).await;
    let (_client, mut eventloop) = subscribed(&gw, &files).await;
    let got = next_command(&mut eventloop, Duration::from_secs(2)).await;
    assert_eq!(payload(&got)["id"], fresh.as_str());
    let driver = drive(eventloop);
    wait_command(&gw, &admin, "RE4C000031", &fresh, "delivered").await;
    let list = commands(&gw, &admin, "RE4C000031").await;
    let old = list.iter().find(|c| c["id"] == stale.as_str()).unwrap();
    assert_eq!(old["state"], "expired", "{old}");
    driver.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_commands_are_refused_by_field_and_other_callers_see_no_device() {
    let gw = TestGateway::start().await;
    let admin = admin_token(&gw).await;
    gw.provision("RE4C000041", "00:1B:2C:3D:5E:41");
    for (body, field) in [
        (json!({"name": "Self-Test"}), "name"),
        (json!({"name": ""}), "name"),
        (json!({"name": "a".repeat(33)}), "name"),
        (json!({"name": "self_test", "ttl_secs": 0}), "ttl_secs"),
        (
            json!({"name": "self_test", "ttl_secs": 604_801}),
            "ttl_secs",
        ),
        (json!({"name": "self_test", "args": [1, 2]}), "args"),
        (json!({"args": {}}), "name"),
    ] {
        let (status, answer) = send(&gw, &admin, "RE4C000041", body.clone()).await;
        assert_eq!(status, 422, "{body}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(field),
            "{body}: {message} should name {field}"
        );
    }
    assert!(commands(&gw, &admin, "RE4C000041").await.is_empty());

    // A provider who did not register the device sees no such device, like a missing one.
    let provider = staff_token(&gw, "other-provider@example.com", "provider").await;
    let (status, _) = send(&gw, &provider, "RE4C000041", json!({"name": "self_test"})).await;
    assert_eq!(status, 404);
    let (status, _) = api_get(&gw, &provider, "/api/v1/devices/RE4C000041/commands").await;
    assert_eq!(status, 404);
    let (status, _) = send(&gw, &admin, "RE4C999999", json!({"name": "self_test"})).await;
    assert_eq!(status, 404);
    assert!(commands(&gw, &admin, "RE4C000041").await.is_empty());

    // The command line: the id printed, the same record in the API, refusals exit 2.
    let id = gw.cli(&[
        "device",
        "command",
        "re4c000041",
        "report_now",
        "--args",
        r#"{"interval_s": 5}"#,
        "--ttl",
        "120",
    ]);
    let id = id.trim();
    assert_eq!(id.len(), 32, "{id}");
    let listed = commands(&gw, &admin, "RE4C000041").await.remove(0);
    assert_eq!(listed["id"], id);
    assert_eq!(listed["name"], "report_now");
    assert_eq!(listed["args"], json!({"interval_s": 5}));
    assert_eq!(listed["state"], "queued");
    assert_eq!(listed["created_by"], "cli");
    let json_out: Value =
        serde_json::from_str(&gw.cli(&["device", "command", "RE4C000041", "self_test", "--json"]))
            .unwrap();
    assert_eq!(json_out["state"], "queued");
    for (args, says) in [
        (&["device", "command", "RE4C000041", "Bad-Name"][..], "name"),
        (
            &["device", "command", "RE4C000041", "x", "--ttl", "0"],
            "--ttl",
        ),
        (
            &["device", "command", "RE4C000041", "x", "--args", "[1]"],
            "--args",
        ),
        (
            &["device", "command", "RE4C000041", "x", "--args", "{"],
            "--args",
        ),
    ] {
        let out = gw.cli_output(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    let out = gw.cli_output(&["device", "command", "RE4C999999", "self_test"]);
    assert_eq!(out.status.code(), Some(1));
    let shown = gw.cli(&["device", "show", "RE4C000041"]);
    assert!(shown.contains("recent commands (2)"), "{shown}");
    assert!(shown.contains(id), "{shown}");
    let detail: Value =
        serde_json::from_str(&gw.cli(&["device", "show", "RE4C000041", "--json"])).unwrap();
    assert_eq!(detail["commands"].as_array().unwrap().len(), 2, "{detail}");
    let (_, api_detail) = api_get(&gw, &admin, "/api/v1/devices/RE4C000041").await;
    assert_eq!(api_detail["commands"], detail["commands"]);
}

/// The device's timeline as (kind, detail), newest first.
async fn timeline(gw: &TestGateway, token: &str, serial: &str) -> Vec<(String, Value)> {
    let (status, list) = api_get(gw, token, &format!("/api/v1/devices/{serial}/events")).await;
    assert_eq!(status, 200, "{list}");
    list.as_array()
        .unwrap()
        .iter()
        .map(|e| (e["kind"].as_str().unwrap().to_owned(), e["detail"].clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timeline_tells_each_step_of_a_command_and_each_lease_change_in_order() {
    for (backend, gw) in gateways("cmd_timeline").await {
        let admin = admin_token(&gw).await;
        let serial = "RE4C000031";
        let files = gw.provision(serial, "00:1B:2C:3D:5E:31");
        let (client, mut eventloop) = subscribed(&gw, &files).await;
        let id = queue(&gw, &admin, serial, "self_test", 3600).await;
        next_command(&mut eventloop, Duration::from_secs(5)).await;
        let driver = drive(eventloop);
        wait_command(&gw, &admin, serial, &id, "delivered").await;
        publish(
            &client,
            serial,
            "reply",
            &json!({"id": id, "ok": true}).to_string(),
        )
        .await;
        wait_command(&gw, &admin, serial, &id, "succeeded").await;
        gw.cli(&["device", "renew", serial, "--months", "6"]);

        let events = timeline(&gw, &admin, serial).await;
        let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
        let steps: Vec<&str> = events
            .iter()
            .filter(|(k, d)| k == "command" && d["id"] == id.as_str())
            .map(|(_, d)| d["state"].as_str().unwrap())
            .collect();
        assert_eq!(
            steps,
            ["succeeded", "delivered", "queued"],
            "{backend}: newest first: {events:?}"
        );
        assert_eq!(kinds[0], "lease_changed", "{backend}: {events:?}");
        let lease = &events[0].1;
        assert_eq!(lease["months_added"], 6, "{backend}: {lease}");
        assert_eq!(
            lease["lease_months"], 18,
            "{backend}: 12 at registration + 6"
        );
        let (was, now) = (
            lease["previous_ends_at"].as_str().unwrap(),
            lease["lease_ends_at"].as_str().unwrap(),
        );
        assert!(was < now && now.ends_with('Z'), "{backend}: {lease}");
        let first_command = kinds.iter().position(|k| *k == "command").unwrap();
        let connected = kinds.iter().position(|k| *k == "connected").unwrap();
        assert!(
            first_command < connected,
            "{backend}: the command came after the connection: {kinds:?}"
        );
        assert_eq!(events[0].1["lease_ends_at"], lease["lease_ends_at"]);
        driver.abort();
    }
}
