//! Operator mistakes through the real binary (issue #13 part B): every command all or
//! nothing, one spelling per identity, words for people, a CLI people can use.

#![expect(clippy::unwrap_used, reason = "tests fail loudly")]

mod support;

use serde_json::Value;
use support::*;

fn show_json(gw: &TestGateway, serial: &str) -> Value {
    serde_json::from_str(&gw.cli(&["device", "show", serial, "--json"])).unwrap()
}

fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn certificate_serials(detail: &Value) -> Vec<String> {
    detail["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["serial_number"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_cert_that_cannot_write_its_files_records_nothing() {
    let gw = TestGateway::start().await;
    let first = gw.provision("RE4A000200", "00:1B:2C:3D:4E:60");
    let before = certificate_serials(&show_json(&gw, "RE4A000200"));
    assert_eq!(before.len(), 1);

    for out in ["/proc/x", "/proc/self/status"] {
        let failed = gw.cli_output(&["device", "cert", "RE4A000200", "--out", out]);
        assert!(
            !failed.status.success(),
            "device cert --out {out} succeeded"
        );
        let stderr = String::from_utf8_lossy(&failed.stderr);
        assert!(stderr.contains(out), "the error names the folder: {stderr}");
        assert_eq!(
            certificate_serials(&show_json(&gw, "RE4A000200")),
            before,
            "a failed device cert --out {out} recorded a certificate"
        );
    }
    // A file that cannot be put in place (a folder has its name): nothing recorded, no key,
    // no staging file left behind.
    let blocked = gw.dir.path().join("blocked");
    std::fs::create_dir_all(blocked.join("RE4A000200.pem")).unwrap();
    let failed = gw.cli_output(&[
        "device",
        "cert",
        "RE4A000200",
        "--out",
        blocked.to_str().unwrap(),
    ]);
    assert!(
        !failed.status.success(),
        "device cert into a blocked folder succeeded"
    );
    assert_eq!(
        certificate_serials(&show_json(&gw, "RE4A000200")),
        before,
        "a certificate whose files could not be put in place was recorded"
    );
    let left: Vec<String> = std::fs::read_dir(&blocked)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        left,
        ["RE4A000200.pem"],
        "only the folder that was there stays: {left:?}"
    );
    // A folder that exists but takes no files: nothing signed, nothing left behind.
    let read_only = gw.dir.path().join("read-only");
    std::fs::create_dir(&read_only).unwrap();
    std::fs::write(read_only.join("ca.pem"), "keep me").unwrap();
    set_mode(&read_only, 0o500);
    let failed = gw.cli_output(&[
        "device",
        "cert",
        "RE4A000200",
        "--out",
        read_only.to_str().unwrap(),
    ]);
    set_mode(&read_only, 0o700);
    // root ignores directory modes; the test then proves only that it worked.
    if !failed.status.success() {
        assert_eq!(certificate_serials(&show_json(&gw, "RE4A000200")), before);
        let left: Vec<_> = std::fs::read_dir(&read_only)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["ca.pem"], "the folder is as it was");
    }

    // The device still connects with the certificate it has.
    let (client, mut el) = device_client(&gw, &first);
    assert_eq!(
        connack(&mut el).await,
        Ok(rumqttc::ConnectReturnCode::Success)
    );
    let _ = client.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_issuing_names_the_earlier_certificate_and_when_it_is_retired() {
    let gw = TestGateway::start_with(&[("TMS_CERTS_ROTATION_OVERLAP_DAYS", "3")]).await;
    gw.provision("RE4A000201", "00:1B:2C:3D:4E:61");
    let first = certificate_serials(&show_json(&gw, "RE4A000201"));
    let out = gw.dir.path().join("again");
    let printed = gw.cli(&[
        "device",
        "cert",
        "RE4A000201",
        "--out",
        out.to_str().unwrap(),
    ]);
    let line = printed
        .lines()
        .find(|l| l.contains(&first[0]))
        .unwrap_or_else(|| {
            panic!(
                "no line names the earlier certificate {}: {printed}",
                first[0]
            )
        });
    let in_three_days = time::OffsetDateTime::now_utc() + time::Duration::days(3);
    assert!(
        line.contains(&in_three_days.date().to_string()),
        "the line gives the day the overlap ends: {line}"
    );
    // Files in place, nothing staged left over.
    let mut names: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["RE4A000201.key", "RE4A000201.pem", "ca.pem"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serial_or_a_company_in_another_case_is_the_same_one() {
    let gw = TestGateway::start().await;
    let files = gw.provision("RE4A000123", "00:1B:2C:3D:4E:70");

    let again = gw.device_add("re4a000123", "00:1B:2C:3D:4E:71", "Other Company", &[]);
    assert!(
        !again.status.success(),
        "re4a000123 registered beside RE4A000123"
    );
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("already exists"), "{stderr}");

    // `acme hospital ` is the existing "Acme Hospital", which keeps its spelling.
    let joined = gw.device_add("re4a000124", "00:1B:2C:3D:4E:72", "  acme hospital ", &[]);
    assert!(
        joined.status.success(),
        "{}",
        String::from_utf8_lossy(&joined.stderr)
    );
    let detail = show_json(&gw, "RE4A000124");
    assert_eq!(detail["serial"], "RE4A000124", "stored in one spelling");
    assert_eq!(detail["company"], "Acme Hospital");
    let list: Value = serde_json::from_str(&gw.cli(&["device", "list", "--json"])).unwrap();
    let companies: std::collections::BTreeSet<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["company"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(companies.len(), 1, "one tenant: {companies:?}");

    // Either case finds the device on the CLI and the API.
    assert_eq!(show_json(&gw, "re4a000123")["serial"], "RE4A000123");
    let token = admin_token(&gw).await;
    let (code, api) = api_get(&gw, &token, "/api/v1/devices/re4a000123").await;
    assert_eq!(code, 200);
    assert_eq!(api["serial"], "RE4A000123");

    // The device registered upper case connects with its certificate.
    let (client, mut el) = device_client(&gw, &files);
    assert_eq!(
        connack(&mut el).await,
        Ok(rumqttc::ConnectReturnCode::Success)
    );
    let _ = client.disconnect().await;
}

/// A data directory as the previous release left it: every migration before
/// `one_spelling`, applied the way the gateway applies them (same checksums).
async fn old_store(data: &std::path::Path) -> sqlx::SqlitePool {
    let old = data.join("old-migrations");
    std::fs::create_dir_all(&old).unwrap();
    let all = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations/sqlite");
    for entry in std::fs::read_dir(all).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if name.as_str() < "20261202000002" {
            std::fs::copy(&path, old.join(name)).unwrap();
        }
    }
    let url = format!("sqlite://{}?mode=rwc", data.join("tms.db").display());
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::migrate::Migrator::new(old.as_path())
        .await
        .unwrap()
        .run(&pool)
        .await
        .unwrap();
    pool
}

async fn old_company(pool: &sqlx::SqlitePool, name: &str) {
    sqlx::query("INSERT INTO companies (id, name, created_at) VALUES (1, $1, 0)")
        .bind(name)
        .execute(pool)
        .await
        .unwrap();
}

async fn add_old_device(pool: &sqlx::SqlitePool, serial: &str, mac: &str, company: i64) {
    sqlx::query(
        "INSERT INTO devices (serial, mac, company_id, device_type, lease_months, start_date, \
         lease_ends_at, created_at) VALUES ($1, $2, $3, 'RemotEye 4', 12, '2026-12-01', \
         32503680000000, 0)",
    )
    .bind(serial)
    .bind(mac)
    .bind(company)
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_migration_gives_old_rows_one_spelling_and_stops_on_a_clash() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let pool = old_store(&data).await;
    old_company(&pool, " Acme Hospital ").await;
    add_old_device(&pool, "re4a000400", "00:1B:2C:3D:4E:80", 1).await;
    sqlx::query(
        "INSERT INTO certificates (serial_number, device_serial, sha256_fingerprint, not_before, \
         not_after, issued_at) VALUES ('0a1b', 're4a000400', 'ff', 0, 32503680000000, 1)",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    let data_env = data.display().to_string();
    let gw = TestGateway::start_with(&[("TMS_DATA_DIR", data_env.as_str())]).await;
    let detail = show_json(&gw, "RE4A000400");
    assert_eq!(detail["serial"], "RE4A000400");
    assert_eq!(detail["company"], "Acme Hospital");
    assert_eq!(certificate_serials(&detail), ["0a1b"]);
    drop(gw);

    // Two devices that differ only in case: the upgrade stops and says why.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let pool = old_store(&data).await;
    old_company(&pool, "Acme Hospital").await;
    add_old_device(&pool, "RE4A000401", "00:1B:2C:3D:4E:81", 1).await;
    add_old_device(&pool, "re4a000401", "00:1B:2C:3D:4E:82", 1).await;
    pool.close().await;
    // `serve` opens (and upgrades) the store; other commands refuse a data dir without a CA.
    let out = std::process::Command::new(BIN)
        .env("TMS_DATA_DIR", &data)
        .env("TMS_MQTT_LISTEN", "127.0.0.1:0")
        .env("TMS_HTTP_LISTEN", "127.0.0.1:0")
        .args(["serve"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = out;
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > std::time::Duration::from_secs(20) {
            let _ = child.kill();
            panic!("serve started on a database whose upgrade must stop");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("differ only in case"),
        "the error says what to fix: {stderr}"
    );
}
