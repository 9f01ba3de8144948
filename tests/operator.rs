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
