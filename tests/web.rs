//! The web pages in a real browser: tests/browser/seed.mjs walks the seed workflow in
//! Debian's headless Chromium (playwright-core) against a gateway started here, checks every
//! page with axe-core and saves 1280×800 screenshots in target/screenshots/. Afterwards the
//! store is checked too: what the browser saw must be what was recorded.
//!
//! Needs Chromium, Node.js and `npm ci` in tests/browser: `scripts/test` installs them.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::*;
use tms_model::ConnState;

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/browser")
}

fn screenshots_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("screenshots")
}

/// Runs one script of tests/browser with `env`; panics with its output and the gateway's log
/// when it fails.
fn browser_script(gw: &TestGateway, script: &str, env: &[(&str, String)]) {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists()
            && browser_dir().join("node_modules/playwright-core").exists(),
        "the browser tests need {chromium} and tests/browser/node_modules: run scripts/test, which installs them"
    );
    let out = Command::new("node")
        .arg(browser_dir().join(script))
        .current_dir(browser_dir())
        .env("CHROMIUM", &chromium)
        .env("BASE_URL", gw.url(""))
        .env("SCREENSHOTS", screenshots_dir())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap_or_else(|e| panic!("node does not run ({e}): scripts/test installs Node.js"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{script} failed:\n{stdout}\n{}\n--- gateway log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        gw.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_workflow_in_a_real_browser() {
    let gw = TestGateway::start().await;
    gw.cli_stdin(
        &[
            "user",
            "add",
            "--email",
            "provider@example.com",
            "--role",
            "provider",
            "--password-stdin",
        ],
        "provider-password-1\n",
    );
    // Another company's device, with a location: no page may ever show it to this customer
    // or to this provider (who did not register it).
    let admin = admin_token(&gw).await;
    gw.cli(&[
        "device",
        "add",
        "--serial",
        "RE4B999999",
        "--mac",
        "00:1B:2C:3D:99:99",
        "--company",
        "Other Clinic",
        "--ups-model",
        "3000XP",
        "--ups-serial",
        "999",
    ]);
    let put = reqwest::Client::new()
        .put(gw.url("/api/v1/devices/RE4B999999/location"))
        .bearer_auth(&admin)
        .json(&serde_json::json!({"lat": 29.8, "lon": -95.4}))
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success());
    let work = tempfile::tempdir().unwrap();
    browser_script(
        &gw,
        "seed.mjs",
        &[
            ("MQTT_PORT", gw.mqtt_port().to_string()),
            ("OUTBOX", gw.data_dir().join("outbox").display().to_string()),
            ("PROVIDER_EMAIL", "provider@example.com".into()),
            ("PROVIDER_PASSWORD", "provider-password-1".into()),
            ("WORK", work.path().display().to_string()),
            ("FOREIGN", "RE4B999999".into()),
        ],
    );

    // The store agrees with what the pages showed.
    let store = gw.store().await;
    let s = wait_state(
        &store,
        "RE4A000123",
        ConnState::Offline,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(s.last_disconnect_reason.as_deref(), Some("revoked"));
    let locations = store.locations_of("RE4A000123").await.unwrap();
    assert_eq!(locations[0].source, "device");
    assert_eq!(store.telemetry("RE4A000123", 10).await.unwrap().len(), 3);
    let commands = store.commands_of("RE4A000123", 10).await.unwrap();
    assert_eq!(commands.len(), 1, "{commands:?}");
    assert_eq!(commands[0].name, "self_test", "the page's button queued it");
    for page in [
        "01-sign-in",
        "03-registration-done",
        "06-certificate",
        "07-devices",
        "08-map",
        "09-device",
    ] {
        let png = screenshots_dir().join(format!("{page}.png"));
        assert!(
            std::fs::metadata(&png).is_ok_and(|m| m.len() > 10_000),
            "{png:?}"
        );
    }
}

/// A 1×1 grey PNG: what our stand-in tile server answers for every tile.
const TILE_PNG: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x04, 0x00, 0x00, 0x00, 0xb5, 0x1c, 0x0c,
    0x02, 0x00, 0x00, 0x00, 0x0b, 0x49, 0x44, 0x41, 0x54, 0x78, 0xda, 0x63, 0x64, 0x60, 0x00, 0x00,
    0x00, 0x06, 0x00, 0x02, 0x30, 0x81, 0xd0, 0x2f, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e, 0x44,
    0xae, 0x42, 0x60, 0x82,
];

#[tokio::test(flavor = "multi_thread")]
async fn the_map_draws_a_configured_tile_server() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A tile server: answers every GET with the PNG and remembers what was asked.
    let tiles = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tile_origin = format!("http://{}", tiles.local_addr().unwrap());
    let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let log = asked.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = tiles.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head);
                let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                log.lock().unwrap().push(path);
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    TILE_PNG.len()
                );
                let _ = socket.write_all(reply.as_bytes()).await;
                let _ = socket.write_all(TILE_PNG).await;
            });
        }
    });
    let tile_url = format!("{tile_origin}/tiles/{{z}}/{{x}}/{{y}}.png");
    let gw = TestGateway::start_with(&[("TMS_HTTP_MAP_TILE_URL", tile_url.as_str())]).await;
    let token = admin_token(&gw).await;
    gw.provision("RE4A000777", "00:1B:2C:3D:4E:77");
    let put = reqwest::Client::new()
        .put(gw.url("/api/v1/devices/RE4A000777/location"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"lat": 52.52, "lon": 13.405}))
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{}", put.status());

    browser_script(
        &gw,
        "tiles.mjs",
        &[
            ("TOKEN", token),
            ("SERIAL", "RE4A000777".into()),
            ("TILE_ORIGIN", tile_origin),
        ],
    );
    let asked = asked.lock().unwrap().clone();
    assert!(!asked.is_empty());
    for path in &asked {
        let parts: Vec<&str> = path
            .trim_start_matches("/tiles/")
            .trim_end_matches(".png")
            .split('/')
            .collect();
        assert!(
            parts.len() == 3 && parts.iter().all(|p| p.parse::<u32>().is_ok()),
            "tile path {path:?} is /tiles/z/x/y.png"
        );
    }
}

/// The alarms `who` sees through the API, as (serial, code, acknowledged_by).
async fn alarms_seen(gw: &TestGateway, token: &str) -> Vec<(String, String, Option<String>)> {
    let (status, body) = api_get(gw, token, "/api/v1/alarms?state=all").await;
    assert_eq!(status, 200, "{body}");
    let mut seen: Vec<_> = body
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            (
                a["serial"].as_str().unwrap_or_default().to_owned(),
                a["code"].as_str().unwrap_or_default().to_owned(),
                a["acknowledged_by"].as_str().map(str::to_owned),
            )
        })
        .collect();
    seen.sort();
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn alarms_page_badge_and_timeline_in_a_real_browser() {
    use support::onboarding::{Api, ana_and_bob, provider};
    let gw = TestGateway::start().await;
    provider(&gw);
    let (ana, bob) = ana_and_bob(&Api::new(), &gw).await;
    // Ana's device (Acme Hospital) goes on battery and reports a bad battery; Bob's (Globex)
    // is overloaded. Both through real MQTT, so the alarm engine raises them.
    let mut devices = Vec::new();
    for (serial, payload) in [
        (
            "RE4A000001",
            r#"{"mode":"on_battery","load_pct":40,"battery":{"charge_pct":80,"runtime_min":25},"alarms":["battery_bad"]}"#,
        ),
        (
            "RE4A000002",
            r#"{"mode":"online","load_pct":120,"battery":{"charge_pct":99,"runtime_min":31},"alarms":[]}"#,
        ),
    ] {
        let files = gw.issue(serial);
        let (client, mut eventloop) = device_client(&gw, &files);
        assert_eq!(
            connack(&mut eventloop).await,
            Ok(rumqttc::ConnectReturnCode::Success)
        );
        drive(eventloop);
        publish(&client, serial, "telemetry", payload).await;
        devices.push(client);
    }
    let ana_sees = |want: Vec<(&'static str, &'static str, Option<&'static str>)>| {
        let gw = &gw;
        let ana = ana.clone();
        async move {
            let want: Vec<_> = want
                .into_iter()
                .map(|(s, c, by)| (s.to_owned(), c.to_owned(), by.map(str::to_owned)))
                .collect();
            wait_for("Ana's alarms", Duration::from_secs(15), || {
                let want = want.clone();
                let ana = ana.clone();
                async move { (alarms_seen(gw, &ana).await == want).then_some(()) }
            })
            .await;
        }
    };
    ana_sees(vec![
        ("RE4A000001", "battery_bad", None),
        ("RE4A000001", "on_battery", None),
    ])
    .await;
    wait_for("Bob's alarm", Duration::from_secs(15), || {
        let (gw, bob) = (&gw, &bob);
        async move { (alarms_seen(gw, bob).await.len() == 1).then_some(()) }
    })
    .await;

    browser_script(
        &gw,
        "alarms.mjs",
        &[
            ("ANA_EMAIL", "ana@example.com".into()),
            ("BOB_EMAIL", "bob@example.com".into()),
            ("PASSWORD", "a-new-password-1".into()),
            ("SERIAL", "RE4A000001".into()),
            ("FOREIGN", "RE4A000002".into()),
        ],
    );

    // The acknowledgement made in the page is recorded, by Ana, for that alarm only; Bob's
    // view never held Ana's alarms.
    ana_sees(vec![
        ("RE4A000001", "battery_bad", None),
        ("RE4A000001", "on_battery", Some("ana@example.com")),
    ])
    .await;
    assert_eq!(
        alarms_seen(&gw, &bob).await,
        [("RE4A000002".to_owned(), "overload".to_owned(), None)]
    );
    drop(devices);
}
