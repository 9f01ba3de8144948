//! UPS alarms end to end (CONTRACT §7), through the real binary: 20 devices of one company,
//! a power cut on 8 of them, one grouped email per recipient and one signed webhook (checked
//! by a real HTTP server here, which refuses the first try), the clear, a kill -9 mid-outage,
//! low battery from charge and from runtime, a device-reported alarm, `device_offline` after
//! its window but not after a gateway restart the devices survive, and another company's
//! customer who sees none of it.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers fail the test loudly"
)]

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use reqwest::StatusCode;
use rumqttc::{AsyncClient, ConnectReturnCode};
use serde_json::{Value, json};
use sha2::Sha256;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PROVIDER: &str = "provider@example.com";
const SECRET: &str = "webhook-secret-1";
const ACME: &str = "Acme Hospital";

/// A webhook receiver on a real socket: records every request (headers, body); answers 500
/// to the first, 200 to the rest.
#[derive(Clone, Default)]
struct Hooks {
    got: Arc<Mutex<Vec<Request>>>,
}

/// One webhook request: its head (lower case) and its body.
type Request = (String, Vec<u8>);

impl Hooks {
    async fn serve(&self) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let got = self.got.clone();
        tokio::spawn(async move {
            loop {
                let (mut sock, _) = listener.accept().await.unwrap();
                let got = got.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let (head, body) = loop {
                        let n = sock.read(&mut chunk).await.unwrap();
                        assert!(n > 0, "webhook request cut short");
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..at]).to_lowercase();
                            let len: usize = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .map(|v| v.trim().parse().unwrap())
                                .unwrap_or(0);
                            while buf.len() < at + 4 + len {
                                let n = sock.read(&mut chunk).await.unwrap();
                                assert!(n > 0, "webhook body cut short");
                                buf.extend_from_slice(&chunk[..n]);
                            }
                            break (head, buf[at + 4..at + 4 + len].to_vec());
                        }
                    };
                    let first = {
                        let mut got = got.lock().unwrap();
                        got.push((head, body));
                        got.len() == 1
                    };
                    let status = if first {
                        "500 Internal Server Error"
                    } else {
                        "200 OK"
                    };
                    let answer = format!(
                        "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                    let _ = sock.write_all(answer.as_bytes()).await;
                });
            }
        });
        addr
    }

    fn requests(&self) -> Vec<Request> {
        self.got.lock().unwrap().clone()
    }
}

async fn call(
    gw: &TestGateway,
    method: &str,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = reqwest::Client::new()
        .request(method.parse().unwrap(), gw.url(path))
        .bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Registers `serial` through the API as the provider, for a new or an existing customer.
async fn register(gw: &TestGateway, provider: &str, i: usize, user: Value, company: Value) {
    let serial = format!("RE4B{i:06}");
    let body = json!({
        "user": user,
        "company": company,
        "device": {"type": "RemotEye 4", "serial": serial, "mac": format!("00:1B:2C:3E:00:{i:02X}")},
        "ups": {"model": "1600XP", "model_number": "1600XP-18K", "serial": format!("1603{i:05}")},
        "start_date": "2026-11-01"
    });
    let (status, body) = call(gw, "POST", "/api/v1/registrations", provider, Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

/// Activates a new customer with the emailed link, changes the temporary password, logs in.
async fn activate(gw: &TestGateway, email: &str) -> String {
    let (token, password) = support::onboarding::emails_for(gw, email).await;
    let http = reqwest::Client::new();
    let ok = http
        .post(gw.url("/api/v1/auth/activate"))
        .json(&json!({"token": token}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let temporary = login(gw, email, &password).await;
    let (status, _) = call(
        gw,
        "POST",
        "/api/v1/me/password",
        &temporary,
        Some(json!({"current_password": password, "new_password": "a-new-password-1"})),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    login(gw, email, "a-new-password-1").await
}

/// The alarm emails in the outbox: (recipient, subject, text).
fn alarm_mails(gw: &TestGateway) -> Vec<(String, String, String)> {
    gw.outbox()
        .into_iter()
        .filter(|m| m.contains("Subject: ") && m.contains("/alarms"))
        .map(|m| {
            let header = |name: &str| {
                m.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .unwrap_or_default()
                    .trim()
                    .to_owned()
            };
            (header("To: "), header("Subject: "), m.clone())
        })
        .collect()
}

/// Waits until exactly the two recipients have a mail with `subject`; returns one.
async fn wait_mail(gw: &TestGateway, subject: &str) -> String {
    wait_for(
        &format!("emails {subject:?}"),
        Duration::from_secs(20),
        || {
            let mut to: Vec<(String, String)> = alarm_mails(gw)
                .into_iter()
                .filter(|(_, s, _)| s == subject)
                .map(|(to, _, text)| (to, text))
                .collect();
            to.sort();
            async move {
                let names: Vec<&str> = to.iter().map(|(t, _)| t.as_str()).collect();
                (names == ["ana@example.com", PROVIDER]).then(|| to[0].1.clone())
            }
        },
    )
    .await
}

struct Fleet {
    files: Vec<DeviceFiles>,
    clients: Vec<Option<AsyncClient>>,
}

impl Fleet {
    /// Connects the devices `which` (a fresh client each) and waits for their CONNACKs.
    async fn connect(&mut self, gw: &TestGateway, which: std::ops::Range<usize>) {
        for i in which {
            let (client, mut el) = device_client(gw, &self.files[i]);
            assert_eq!(connack(&mut el).await, Ok(ConnectReturnCode::Success));
            drive(el);
            self.clients[i] = Some(client);
        }
    }

    async fn send(&self, i: usize, payload: &str) {
        let c = self.clients[i].as_ref().expect("connected");
        publish(c, &self.files[i].serial, "telemetry", payload).await;
    }
}

async fn alarms(gw: &TestGateway, token: &str, state: &str) -> Vec<Value> {
    let (status, body) = call(
        gw,
        "GET",
        &format!("/api/v1/alarms?state={state}"),
        token,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body.as_array().unwrap().clone()
}

/// Waits until the active alarms seen by `token` are exactly `want` as (serial, code).
async fn wait_active(gw: &TestGateway, token: &str, want: &[(String, &str)]) -> Vec<Value> {
    let mut want: Vec<(String, String)> = want
        .iter()
        .map(|(s, c)| (s.clone(), c.to_string()))
        .collect();
    want.sort();
    wait_for("active alarms", Duration::from_secs(15), || {
        let want = want.clone();
        async move {
            let list = alarms(gw, token, "active").await;
            let mut got: Vec<(String, String)> = list
                .iter()
                .map(|a| {
                    (
                        a["serial"].as_str().unwrap().to_owned(),
                        a["code"].as_str().unwrap().to_owned(),
                    )
                })
                .collect();
            got.sort();
            (got == want).then_some(list)
        }
    })
    .await
}

fn on_battery() -> &'static str {
    r#"{"mode":"on_battery","load_pct":40,"battery":{"charge_pct":80,"runtime_min":25},"alarms":[]}"#
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_one_notice_raised_and_cleared_once_and_only_the_company_sees_it() {
    let hooks = Hooks::default();
    let hook_addr = hooks.serve().await;
    let hook_url = format!("http://{hook_addr}/hook");
    let mut gw = TestGateway::start_with(&[
        ("TMS_ALARMS_GROUP_SECS", "2"),
        ("TMS_ALARMS_OFFLINE_AFTER_SECS", "3"),
        ("TMS_ALARMS_WEBHOOK_URL", &hook_url),
        ("TMS_ALARMS_WEBHOOK_SECRET", SECRET),
    ])
    .await;
    let provider = staff_token(&gw, PROVIDER, "provider").await;
    let admin = admin_token(&gw).await;
    register(&gw, &provider, 0, json!({"new": {"first_name": "Ana", "last_name": "Ruiz", "email": "ana@example.com", "phone": "+1 713 555 0100"}}), json!({"new": {"name": ACME}})).await;
    for i in 1..20 {
        register(
            &gw,
            &provider,
            i,
            json!({"existing": {"email": "ana@example.com"}}),
            json!({"existing": {"name": ACME}}),
        )
        .await;
    }
    register(&gw, &provider, 99, json!({"new": {"first_name": "Bob", "last_name": "Lee", "email": "bob@example.com", "phone": "+1 713 555 0101"}}), json!({"new": {"name": "Globex"}})).await;
    let ana = activate(&gw, "ana@example.com").await;
    let bob = activate(&gw, "bob@example.com").await;
    let files: Vec<DeviceFiles> = (0..20).map(|i| gw.issue(&format!("RE4B{i:06}"))).collect();
    let serial = |i: usize| files[i].serial.clone();
    let mut fleet = Fleet {
        files: files.clone(),
        clients: vec![None; 20],
    };
    fleet.connect(&gw, 0..20).await;
    for i in 0..20 {
        fleet.send(i, TELEMETRY).await;
    }

    // A power cut: 8 of the 20 go on battery within a second.
    for i in 0..8 {
        fleet.send(i, on_battery()).await;
    }
    let eight: Vec<(String, &str)> = (0..8).map(|i| (serial(i), "on_battery")).collect();
    let active = wait_active(&gw, &ana, &eight).await;
    for a in &active {
        assert_eq!(a["severity"], "critical");
        assert_eq!(a["company"], ACME);
        assert_eq!(a["detail"]["mode"], "on_battery");
    }
    let text = wait_mail(&gw, "Acme Hospital: 8 of 20 UPS on battery").await;
    for i in 0..8 {
        assert!(text.contains(&serial(i)), "{text}");
    }
    assert!(
        text.contains(&format!("http://{}/alarms", gw.ports.http)),
        "{text}"
    );

    // The webhook: refused once, retried, then one signed POST naming the 8.
    let (head, body) = wait_for("the webhook retried", Duration::from_secs(20), || {
        let r = hooks.requests();
        async move { (r.len() >= 2).then(|| r[1].clone()) }
    })
    .await;
    assert_eq!(
        hooks.requests()[0].1,
        body,
        "the retry sends the same notice"
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(&body);
    let expected = format!(
        "x-tms-signature: sha256={}",
        hex::encode(mac.finalize().into_bytes())
    );
    assert!(
        head.lines().any(|l| l.trim() == expected),
        "{head}\nwanted {expected}"
    );
    let hook: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(hook["company"], ACME);
    let hooked = hook["alarms"].as_array().unwrap();
    assert_eq!(hooked.len(), 8, "{hook}");
    assert!(
        hooked
            .iter()
            .all(|a| a["code"] == "on_battery" && a["event"] == "raised")
    );
    let metrics = scrape(&gw).await;
    assert_eq!(
        metrics.get(r#"tms_alarms_active{code="on_battery"}"#),
        Some(&8.0)
    );
    assert!(
        metrics
            .get(r#"tms_alarm_notifications_total{channel="webhook",outcome="failed"}"#)
            .is_some_and(|n| *n >= 1.0)
    );
    assert!(
        metrics
            .get(r#"tms_alarm_notifications_total{channel="webhook",outcome="delivered"}"#)
            .is_some_and(|n| *n >= 1.0)
    );

    // Telemetry that repeats the condition raises nothing new.
    for _ in 0..3 {
        for i in 0..8 {
            fleet.send(i, on_battery()).await;
        }
    }
    // Two more go on battery; once their alarms are committed the gateway is killed before
    // their notice is due.
    fleet.send(8, on_battery()).await;
    fleet.send(9, on_battery()).await;
    let ten: Vec<(String, &str)> = (0..10).map(|i| (serial(i), "on_battery")).collect();
    wait_active(&gw, &ana, &ten).await;
    gw.kill();
    gw.restart().await;
    let admin = staff_login(&gw, &admin).await;
    fleet.connect(&gw, 0..20).await;
    for i in 0..10 {
        fleet.send(i, on_battery()).await;
    }
    wait_mail(&gw, "Acme Hospital: 2 of 20 UPS on battery").await;
    let all = alarms(&gw, &admin, "all").await;
    assert_eq!(all.len(), 10, "none lost, none doubled: {all:#?}");

    // Power is back: every alarm cleared once, one "back on mains" notice.
    for i in 0..10 {
        fleet.send(i, TELEMETRY).await;
    }
    wait_active(&gw, &ana, &[]).await;
    wait_mail(&gw, "Acme Hospital: 10 UPS back on mains").await;
    let cleared = alarms(&gw, &ana, "cleared").await;
    assert_eq!(cleared.len(), 10);
    assert!(
        cleared
            .iter()
            .all(|a| a["state"] == "cleared" && a["cleared_at"].is_string())
    );

    // Acknowledging: the owner may, another company's customer gets 404 like a missing one.
    let id = cleared[0]["id"].as_i64().unwrap();
    let (status, _) = call(&gw, "POST", &format!("/api/v1/alarms/{id}/ack"), &bob, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = call(&gw, "POST", "/api/v1/alarms/999999/ack", &ana, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = call(&gw, "POST", &format!("/api/v1/alarms/{id}/ack"), &ana, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let acked = alarms(&gw, &ana, "all").await;
    let acked = acked.iter().find(|a| a["id"] == id).unwrap();
    assert_eq!(acked["acknowledged_by"], "ana@example.com");

    // Low battery from the charge, from the runtime; a device-reported battery_bad.
    fleet
        .send(
            10,
            r#"{"mode":"online","battery":{"charge_pct":12,"runtime_min":30}}"#,
        )
        .await;
    fleet
        .send(
            11,
            r#"{"mode":"online","battery":{"charge_pct":90,"runtime_min":2}}"#,
        )
        .await;
    fleet
        .send(12, r#"{"mode":"online","alarms":["battery_bad"]}"#)
        .await;
    wait_active(
        &gw,
        &ana,
        &[
            (serial(10), "low_battery"),
            (serial(11), "low_battery"),
            (serial(12), "battery_bad"),
        ],
    )
    .await;
    fleet.send(10, TELEMETRY).await;
    fleet.send(11, TELEMETRY).await;
    fleet.send(12, TELEMETRY).await;
    wait_active(&gw, &ana, &[]).await;

    // A graceful restart with the gateway away longer than the offline window: the devices
    // that come back within the window of the new start raise nothing; one that then goes
    // away for good does, once its own window has passed.
    gw.stop();
    tokio::time::sleep(Duration::from_secs(4)).await; // the gateway's downtime, on purpose
    gw.restart().await;
    let admin = staff_login(&gw, &admin).await;
    fleet.connect(&gw, 0..20).await;
    fleet.clients[19]
        .take()
        .unwrap()
        .disconnect()
        .await
        .unwrap();
    let offline = wait_active(&gw, &admin, &[(serial(19), "device_offline")]).await;
    assert_eq!(offline[0]["severity"], "critical");
    let raised: Vec<Value> = alarms(&gw, &admin, "all")
        .await
        .into_iter()
        .filter(|a| a["code"] == "device_offline")
        .collect();
    assert_eq!(
        raised.len(),
        1,
        "only the device that stayed away: {raised:#?}"
    );
    fleet.connect(&gw, 19..20).await;
    wait_active(&gw, &admin, &[]).await;

    // The timeline of the acknowledged alarm's device tells the whole story, newest first.
    let acked_serial = acked["serial"].as_str().unwrap().to_owned();
    let path = format!("/api/v1/devices/{acked_serial}/events?limit=1000");
    let (status, events) = call(&gw, "GET", &path, &ana, None).await;
    assert_eq!(status, StatusCode::OK, "{events}");
    let events = events.as_array().unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    for kind in [
        "registered",
        "certificate_issued",
        "connected",
        "disconnected",
        "alarm_raised",
        "alarm_acknowledged",
        "alarm_cleared",
    ] {
        assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
    }
    assert_eq!(kinds.last(), Some(&"registered"), "oldest last: {kinds:?}");
    let times: Vec<time::OffsetDateTime> = events
        .iter()
        .map(|e| {
            let at = e["at"].as_str().unwrap();
            time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).unwrap()
        })
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {times:?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "disconnected" && e["detail"]["reason"] == "server_shutdown")
    );
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "alarm_raised" && e["detail"]["code"] == "on_battery")
    );
    let (status, _) = call(&gw, "GET", &path, &bob, None).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "another company's device timeline"
    );

    // The other company's customer sees none of it.
    assert!(alarms(&gw, &bob, "all").await.is_empty());
    let mails = alarm_mails(&gw);
    assert!(
        mails.iter().all(|(to, _, _)| to != "bob@example.com"),
        "{mails:?}"
    );
    let outage: Vec<_> = mails
        .iter()
        .filter(|(_, s, _)| s.contains("UPS on battery") || s.contains("back on mains"))
        .collect();
    assert_eq!(outage.len(), 6, "one per recipient per notice: {outage:#?}");
}

/// After a restart the tokens still work (they live in the store); returns the same token.
async fn staff_login(gw: &TestGateway, token: &str) -> String {
    let (status, _) = call(gw, "GET", "/api/v1/me", token, None).await;
    assert_eq!(status, StatusCode::OK);
    token.to_owned()
}
