//! Faults through the real binary: what a crash, a full disk, a refusing or slow database can
//! do to the promise "a PUBACKed message is stored, and one device never harms another".

#![expect(clippy::unwrap_used, reason = "tests fail loudly")]

mod support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use support::flood::*;
use support::*;

/// The `seq` of every telemetry row of `serial` in a SQLite database file.
async fn stored_seqs(db: &Path, serial: &str) -> HashSet<u64> {
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let payloads: Vec<String> =
        sqlx::query_scalar("SELECT payload FROM telemetry WHERE serial = ?")
            .bind(serial)
            .fetch_all(&pool)
            .await
            .unwrap();
    pool.close().await;
    payloads
        .iter()
        .filter_map(|p| serde_json::from_str::<serde_json::Value>(p).ok()?["seq"].as_u64())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn puback_means_durable_even_across_kill_9() {
    for trial in 0..3 {
        let mut gw = TestGateway::start().await;
        let devices: Vec<DeviceFiles> = (0..4)
            .map(|i| {
                gw.provision(
                    &format!("RE4K{trial}{i:05}"),
                    &format!("00:1B:2C:3D:{trial}E:{i:02X}"),
                )
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let floods: Vec<_> = devices
            .iter()
            .map(|d| flood(&gw, d, stop.clone(), 1_000_000, Duration::ZERO))
            .collect();
        // Kill while messages are in flight, once a good number were acknowledged.
        wait_for("2,000 PUBACKs", Duration::from_secs(60), || {
            let n: usize = floods
                .iter()
                .map(|(t, _)| t.lock().unwrap().acked.len())
                .sum();
            async move { (n >= 2000).then_some(()) }
        })
        .await;
        gw.kill();
        stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        for (d, (t, task)) in devices.iter().zip(floods) {
            let _ = tokio::time::timeout(Duration::from_secs(70), task).await;
            let acked = acked(&t);
            total += acked.len();
            let stored = stored_seqs(&gw.data_dir().join("tms.db"), &d.serial).await;
            assert_all_stored(&acked, &stored, &format!("trial {trial}, {}", d.serial));
        }
        assert!(total >= 2000, "trial {trial}: {total} PUBACKs");
        eprintln!("trial {trial}: {total} PUBACKed, all stored");
    }
}

/// A tmpfs of `size` mounted for the test, unmounted when dropped. `None` where this process
/// may not mount (not root, no tmpfs): the test then says so and skips.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(at.to_owned()))
    }

    /// Writes a file until the file system is full; returns its path.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.0.join("fill");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let small = [0u8; 512];
        while f.write_all(&small).is_ok() {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_withholds_pubacks_and_writes_resume_when_space_returns() {
    let scratch = tempfile::tempdir().unwrap();
    let Some(fs) = Tmpfs::mount(&scratch.path().join("mnt"), "24m") else {
        skip("cannot mount a tmpfs here (needs root); the full-disk test did not run");
        return;
    };
    let data = fs.0.join("data");
    let data_str = data.display().to_string();
    let mut gw = TestGateway::start_with(&[
        ("TMS_DATA_DIR", &data_str),
        ("TMS_INGEST_DRAIN_TIMEOUT_SECS", "3"),
    ])
    .await;
    let files = gw.provision("RE4F000001", "00:1B:2C:3D:4E:01");
    // Revoked while the disk is full, and after.
    let during_full = gw.provision("RE4F000002", "00:1B:2C:3D:4E:02");
    let after_full = gw.provision("RE4F000003", "00:1B:2C:3D:4E:03");
    let token = admin_token(&gw).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (tracker, task) = flood(
        &gw,
        &files,
        stop.clone(),
        1_000_000,
        Duration::from_millis(4),
    );
    wait_for("first PUBACKs", Duration::from_secs(20), || {
        let n = tracker.lock().unwrap().acked.len();
        async move { (n >= 100).then_some(()) }
    })
    .await;

    // The disk fills up: nothing more is acknowledged, and readiness says why.
    let fill = fs.fill();
    let (_, body) = wait_for("/readyz 503 disk_full", Duration::from_secs(20), || async {
        let (status, body) = readyz(&gw).await;
        (status == 503 && body["store_fault"] == "disk_full").then_some((status, body))
    })
    .await;
    assert_eq!(body["store"], false);
    let at_full = acked(&tracker).len();
    let window = Instant::now();
    while window.elapsed() < Duration::from_millis(1500) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let during = acked(&tracker).len();
    assert!(
        during <= at_full + 50,
        "PUBACKs went on with the disk full: {at_full} -> {during}"
    );
    // Told by the metric and by one error line naming the cause.
    let m = scrape(&gw).await;
    assert_eq!(m.get("tms_store_write_failing").copied(), Some(1.0));
    let errors = "tms_ingest_write_errors_total{fault=\"disk_full\"}";
    assert!(m.get(errors).is_some_and(|n| *n >= 1.0), "{errors}: {m:?}");
    let log = gw.log();
    assert!(
        log.lines()
            .any(|l| l.contains("the store cannot take writes")
                && l.contains(r#"fault="disk_full""#)),
        "the full disk is logged:\n{log}"
    );
    // A login and a revocation with the disk full work, or say 503 in JSON: never a 500,
    // never a hang.
    let revoked_during = http_during_fault(&gw, &token, &during_full.serial).await;

    // Space returns: writes resume by themselves, and so do the other writers.
    std::fs::remove_file(&fill).unwrap();
    wait_for("/readyz 200 again", Duration::from_secs(30), || async {
        (readyz(&gw).await.0 == 200).then_some(())
    })
    .await;
    wait_for("PUBACKs again", Duration::from_secs(30), || {
        let n = acked(&tracker).len();
        async move { (n >= during + 100).then_some(()) }
    })
    .await;
    let login = reqwest::Client::new()
        .post(gw.url("/api/v1/auth/login"))
        .json(&serde_json::json!({"email": "admin@example.com", "password": "admin-password-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200, "login after the disk was freed");
    let me = reqwest::Client::new()
        .get(gw.url("/api/v1/devices"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), 200);
    for (serial, again) in [(&after_full.serial, false), (&during_full.serial, true)] {
        if again && revoked_during {
            continue;
        }
        let (code, body) = revoke(&gw, &token, serial).await;
        assert_eq!(
            code, 200,
            "revoking {serial} after the disk was freed: {body}"
        );
        assert_eq!(body["revoked"].as_array().map(Vec::len), Some(1), "{body}");
    }
    for d in [&during_full, &after_full] {
        let tls = client_tls(&d.ca, Some((&d.pem, &d.key)));
        wait_for(
            "the revoked certificate refused",
            Duration::from_secs(5),
            || {
                let tls = tls.clone();
                let gw = &gw;
                async move { tls_probe(gw, tls).await.is_err().then_some(()) }
            },
        )
        .await;
    }

    // Full again, then SIGTERM: shutdown keeps its deadline and reports what it could not
    // write; none of that was acknowledged.
    let fill = fs.fill();
    wait_for("/readyz 503 again", Duration::from_secs(20), || async {
        (readyz(&gw).await.0 == 503).then_some(())
    })
    .await;
    let code = gw
        .stop_within(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", gw.log()));
    assert_eq!(code, Some(0));
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(70), task).await;
    std::fs::remove_file(&fill).unwrap();
    let log = gw.log();
    assert!(
        log.contains("not written"),
        "shutdown names what it gave up:\n{log}"
    );
    let acked = acked(&tracker);
    let stored = stored_seqs(&data.join("tms.db"), &files.serial).await;
    assert_all_stored(&acked, &stored, "full disk");
    assert!(acked.len() > during + 100);

    // And the device can be revoked with the store healthy again (no lock left behind).
    gw.cli(&["device", "revoke", &files.serial]);
}

/// `DELETE /api/v1/devices/{serial}/certificate`: the status and the JSON body.
async fn revoke(gw: &TestGateway, token: &str, serial: &str) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .delete(gw.url(&format!("/api/v1/devices/{serial}/certificate")))
        .bearer_auth(token)
        .timeout(Duration::from_secs(15))
        .send()
        .await
        .unwrap_or_else(|e| panic!("revoking {serial}: no answer within 15 s: {e}"));
    (r.status().as_u16(), r.json().await.unwrap())
}

/// A login and the revocation of `serial` while the store cannot write: each answers at once
/// with success or a 503 `store_unavailable` JSON error. Returns whether the revocation took.
async fn http_during_fault(gw: &TestGateway, token: &str, serial: &str) -> bool {
    let login = reqwest::Client::new()
        .post(gw.url("/api/v1/auth/login"))
        .json(&serde_json::json!({"email": "admin@example.com", "password": "admin-password-1"}))
        .timeout(Duration::from_secs(15))
        .send()
        .await
        .unwrap_or_else(|e| panic!("login with the store failing: no answer within 15 s: {e}"));
    let (code, body): (u16, serde_json::Value) =
        (login.status().as_u16(), login.json().await.unwrap());
    let unavailable = |code: u16, body: &serde_json::Value| {
        code == 503 && body["error"]["code"] == "store_unavailable"
    };
    assert!(
        code == 200 || unavailable(code, &body),
        "login with the store failing: {code} {body}"
    );
    let (revoked, answer) = revoke(gw, token, serial).await;
    assert!(
        revoked == 200 || unavailable(revoked, &answer),
        "revocation with the store failing: {revoked} {answer}"
    );
    eprintln!("with the store failing: login {code}, revocation {revoked} {answer}");
    revoked == 200
}

/// Every text a device sends with a NUL or out-of-range value is set aside with a reason;
/// another device's messages go on being stored; shutdown is prompt.
async fn hostile_payloads_never_block_others(database_url: Option<String>) {
    let extra: Vec<(&str, &str)> = match &database_url {
        Some(url) => vec![("TMS_DATABASE_URL", url.as_str())],
        None => vec![],
    };
    let mut gw = TestGateway::start_with(&extra).await;
    let bad = gw.provision("RE4N000001", "00:1B:2C:3D:4E:11");
    let good = gw.provision("RE4N000002", "00:1B:2C:3D:4E:12");
    let store = match &database_url {
        Some(url) => tms_store::Store::open(url).await.unwrap(),
        None => gw.store().await,
    };
    let deep = format!(
        r#"{{"vendor":{}{}}}"#,
        "[".repeat(20_000),
        "]".repeat(20_000)
    );
    let hostile: Vec<(&str, String)> = vec![
        ("status", "on\u{0}line".into()),
        ("telemetry", r#"{"mode":"a\u0000b"}"#.into()),
        ("info", r#"{"system_name":"x\u0000y"}"#.into()),
        ("telemetry", r#"{"ts":1e300,"mode":"online"}"#.into()),
        ("telemetry", r#"{"ts":-1e300}"#.into()),
        ("telemetry", r#"{"ts":"9999-01-01T00:00:00Z"}"#.into()),
        ("telemetry", deep),
    ];
    let (client, mut el) = device_client(&gw, &bad);
    connack(&mut el).await.unwrap();
    let events = drive(el);
    for (kind, payload) in &hostile {
        publish(&client, &bad.serial, kind, payload).await;
    }
    publishes_are_stored(&gw, &store, &good, 20).await;
    let quarantined = wait_for(
        "every hostile payload quarantined",
        Duration::from_secs(15),
        || async {
            let q = store.quarantined(&bad.serial, 100).await.unwrap();
            (q.len() == hostile.len()).then_some(q)
        },
    )
    .await;
    let reasons: Vec<&str> = quarantined.iter().map(|(_, e, _)| e.as_str()).collect();
    for needle in ["status", "mode", "system_name", "ts", "deeper"] {
        assert!(
            reasons.iter().any(|r| r.contains(needle)),
            "a reason names {needle}: {reasons:?}"
        );
    }
    assert_eq!(store.telemetry_count(&bad.serial).await.unwrap(), 0);
    let status = status(&store, &bad.serial).await;
    assert_eq!(status.state, tms_model::ConnState::Online);
    events.abort();
    drop(client);
    assert_eq!(gw.stop_within(Duration::from_secs(15)).unwrap(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_payloads_are_quarantined_with_a_reason_on_sqlite() {
    hostile_payloads_never_block_others(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_payloads_are_quarantined_with_a_reason_on_postgres() {
    let Some(url) = fresh_postgres_url("faults_nul").await else {
        return;
    };
    hostile_payloads_never_block_others(Some(url)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_the_database_refuses_is_quarantined_and_the_rest_is_stored() {
    let gw = TestGateway::start().await;
    let files = gw.provision("RE4B000001", "00:1B:2C:3D:4E:21");
    // Something the edge checks cannot know about: the database itself refuses one row.
    let pool = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        gw.data_dir().join("tms.db").display()
    ))
    .await
    .unwrap();
    sqlx::query(
        "CREATE TRIGGER poison BEFORE INSERT ON telemetry WHEN NEW.payload LIKE '%poison%' \
         BEGIN SELECT RAISE(ABORT, 'poisoned row'); END",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    let stop = Arc::new(AtomicBool::new(false));
    let (client, mut el) = device_client(&gw, &files);
    connack(&mut el).await.unwrap();
    let events = drive(el);
    for i in 0..30 {
        let payload = if i == 17 {
            r#"{"mode":"poison"}"#.to_owned()
        } else {
            format!(r#"{{"seq":{i}}}"#)
        };
        publish(&client, &files.serial, "telemetry", &payload).await;
    }
    let store = gw.store().await;
    wait_for("29 good rows", Duration::from_secs(15), || async {
        (store.telemetry_count(&files.serial).await.unwrap() == 29).then_some(())
    })
    .await;
    let q = wait_for(
        "the refused row in quarantine",
        Duration::from_secs(15),
        || async {
            let q = store.quarantined(&files.serial, 10).await.unwrap();
            (!q.is_empty()).then_some(q)
        },
    )
    .await;
    assert_eq!(q.len(), 1);
    assert!(q[0].1.contains("poisoned row"), "{:?}", q[0].1);
    assert_eq!(q[0].2, br#"{"mode":"poison"}"#);
    // And ingest is not stuck: more messages are stored.
    publish(&client, &files.serial, "telemetry", TELEMETRY).await;
    wait_for("the next row", Duration::from_secs(15), || async {
        (store.telemetry_count(&files.serial).await.unwrap() == 30).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    events.abort();
}

/// A raw TLS connection with the device's certificate, for packets no client library sends.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_writes_beside_ingest_never_answer_database_is_locked() {
    let gw = TestGateway::start().await;
    let token = admin_token(&gw).await;
    let stop = Arc::new(AtomicBool::new(false));
    let devices: Vec<_> = (0..4)
        .map(|i| gw.provision(&format!("RE4L00000{i}"), &format!("00:1B:2C:3D:5E:0{i}")))
        .collect();
    let floods: Vec<_> = devices
        .iter()
        .map(|d| flood(&gw, d, stop.clone(), 1_000_000, Duration::from_millis(1)))
        .collect();
    let http = reqwest::Client::new();
    for i in 0..40 {
        let body = serde_json::json!({
            "user": {"new": {"first_name": "Ana", "last_name": "Ruiz", "email": format!("ana{i}@example.com"), "phone": "+1 713 555 0100"}},
            "company": {"new": {"name": format!("Locked Test {i}")}},
            "device": {"type": "RemotEye 4", "serial": format!("RE4Z{i:06}"), "mac": format!("00:1B:2C:3D:6E:{i:02X}"), "lease_months": 12},
            "ups": {"model": "1600XP", "model_number": "1600XP-18K", "serial": "160300007"},
            "start_date": "2026-12-01"
        });
        let r = http
            .post(gw.url("/api/v1/registrations"))
            .bearer_auth(&token)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert_eq!(status, 201, "registration {i}: {text}");
    }
    let acked: usize = floods
        .iter()
        .map(|(t, _)| t.lock().unwrap().acked.len())
        .sum();
    assert!(acked > 100, "ingest was busy meanwhile: {acked} PUBACKs");
    stop.store(true, Ordering::Relaxed);
}
