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

#[tokio::test(flavor = "multi_thread")]
async fn seed_workflow_in_a_real_browser() {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists()
            && browser_dir().join("node_modules/playwright-core").exists(),
        "the browser tests need {chromium} and tests/browser/node_modules: run scripts/test, which installs them"
    );
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
    let work = tempfile::tempdir().unwrap();
    let out = Command::new("node")
        .arg(browser_dir().join("seed.mjs"))
        .current_dir(browser_dir())
        .env("CHROMIUM", &chromium)
        .env("BASE_URL", gw.url(""))
        .env("MQTT_PORT", gw.mqtt_port().to_string())
        .env("OUTBOX", gw.data_dir().join("outbox"))
        .env("PROVIDER_EMAIL", "provider@example.com")
        .env("PROVIDER_PASSWORD", "provider-password-1")
        .env("SCREENSHOTS", screenshots_dir())
        .env("WORK", work.path())
        .output()
        .expect("node runs (scripts/test installs Node.js)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "browser test failed:\n{stdout}\n{stderr}\n--- gateway log:\n{}",
        gw.log()
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
