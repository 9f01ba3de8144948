//! A first run as an operator makes it, through the real binary: a second `serve` harms
//! nothing, commands run in the wrong folder create nothing, the defaults are reachable by
//! IP, logs are words (no colour codes, no `Debug`), misspelt settings are named, and
//! `/metrics` has the `process_*` series.

#![expect(clippy::unwrap_used, reason = "test helpers fail the test loudly")]

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use rumqttc::ConnectReturnCode;
use support::*;
use tms_model::ConnState;

/// The binary with a clean environment (PATH and HOME only) plus `env`, run in `cwd`.
fn run_in(cwd: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.env_clear().current_dir(cwd);
    for key in ["PATH", "HOME"] {
        if let Ok(v) = std::env::var(key) {
            cmd.env(key, v);
        }
    }
    cmd.envs(env.iter().copied()).args(args).output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_serve_exits_1_naming_the_first_and_its_devices_stay_online() {
    let gw = TestGateway::start().await;
    let files = gw.provision("RE4A001300", "00:1B:2C:3D:4F:30");
    let store = gw.store().await;
    let (client, mut el) = device_client(&gw, &files);
    assert_eq!(connack(&mut el).await, Ok(ConnectReturnCode::Success));
    let _driver = drive(el);
    wait_state(
        &store,
        "RE4A001300",
        ConnState::Online,
        Duration::from_secs(5),
    )
    .await;
    let ports_before = std::fs::read_to_string(gw.data_dir().join("ports.json")).unwrap();

    let second = gw.cli_output(&["serve"]);
    let err = stderr(&second);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("another tms-gateway serve (pid {})", gw.pid())),
        "the refusal names the running serve: {err}"
    );
    assert!(
        err.contains(&gw.data_dir().display().to_string()),
        "and the data directory: {err}"
    );
    assert!(!err.contains("gateway_restart"), "{err}");

    // Nothing of the running gateway was touched: the device is online, still publishing,
    // and ports.json still names the first gateway.
    let s = status(&store, "RE4A001300").await;
    assert_eq!(s.state, ConnState::Online, "{s:?}");
    assert_eq!(s.last_disconnect_reason, None);
    publish(&client, "RE4A001300", "telemetry", TELEMETRY).await;
    wait_for("telemetry stored", Duration::from_secs(5), || async {
        let t = store.telemetry("RE4A001300", 1).await.unwrap();
        (!t.is_empty()).then_some(())
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(gw.data_dir().join("ports.json")).unwrap(),
        ports_before
    );
    assert!(!gw.log().contains("gateway_restart"), "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_run_where_no_gateway_ran_create_nothing_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let expected = format!(
        "no gateway data at {}; pass --config or TMS_DATA_DIR",
        dir.path().join("tms-data").display()
    );
    for args in [
        &["device", "list"][..],
        &["device", "show", "RE4A000123"],
        &[
            "device",
            "add",
            "--serial",
            "RE4A000123",
            "--mac",
            "00:1B:2C:3D:4E:5F",
            "--company",
            "Acme Hospital",
        ],
        &["ca", "show"],
    ] {
        // The default data directory, ./tms-data, in a folder where no gateway ever ran.
        let out = run_in(dir.path(), &[], args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&expected),
            "{args:?}: {}",
            stderr(&out)
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "{args:?} created something"
        );
    }
    // A data directory without its database (e.g. another data_dir's folder) is no gateway.
    std::fs::create_dir_all(dir.path().join("elsewhere/ca")).unwrap();
    let out = run_in(
        dir.path(),
        &[("TMS_DATA_DIR", "elsewhere")],
        &["device", "list"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(!dir.path().join("elsewhere/tms.db").exists());

    // `init` makes one on purpose; then the same command works there.
    let out = run_in(dir.path(), &[], &["init"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains(&format!(
            "created gateway data at {}",
            dir.path().join("tms-data").display()
        )),
        "{shown}"
    );
    let out = run_in(dir.path(), &[], &["device", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 device(s)"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_server_certificate_is_valid_by_ip_and_names_what_it_holds() {
    let gw = TestGateway::start_with_default_hostnames(&[]).await;
    let files = gw.provision("RE4A001310", "00:1B:2C:3D:4F:31");
    // mosquitto_pub verifies the server's name against its certificate (no --insecure).
    let out = gw.mosquitto_pub(
        "127.0.0.1",
        &files,
        "RE4A001310",
        "tms/RE4A001310/telemetry",
        TELEMETRY,
    );
    assert!(
        out.status.success(),
        "connecting by 127.0.0.1 with the default hostnames: {}",
        stderr(&out)
    );
    let out = gw.mosquitto_pub(
        "localhost",
        &files,
        "RE4A001310",
        "tms/RE4A001310/telemetry",
        TELEMETRY,
    );
    assert!(out.status.success(), "by localhost: {}", stderr(&out));

    let shown = gw.cli(&["ca", "show"]);
    let names = shown
        .lines()
        .find_map(|l| l.strip_prefix("server names:"))
        .unwrap_or_else(|| panic!("ca show names the server certificate's names: {shown}"));
    let names: Vec<&str> = names.split(',').map(str::trim).collect();
    for name in ["localhost", "127.0.0.1", "::1"] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let host = host.trim().to_ascii_lowercase();
    if host != "localhost" && !host.contains('_') {
        assert!(
            names.contains(&host.as_str()),
            "{host} missing from {names:?}"
        );
        // The certificate page tells the customer a name other machines can reach.
        let page = reqwest::get(gw.url("/certificates"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            page.contains(&format!("data-mqtt-host=\"{host}\"")),
            "the certificate page's broker host is {host}, not localhost"
        );
    }
    assert!(
        gw.log().contains("localhost, 127.0.0.1, ::1"),
        "the start-up log names them too: {}",
        gw.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_words_and_misspelt_settings_are_named() {
    let gw = TestGateway::start_with(&[("TMS_MQTT_LISTN", "127.0.0.1:1883")]).await;
    let log = gw.log();
    // stderr is a file here, not a terminal: no colour codes, whatever the terminal type.
    assert!(!log.contains('\u{1b}'), "ANSI escape in the log: {log:?}");
    assert!(
        log.contains(
            "TMS_MQTT_LISTN is not a tms-gateway setting and is ignored; did you mean TMS_MQTT_LISTEN?"
        ),
        "{log}"
    );
    let listening = log
        .lines()
        .find(|l| l.contains("listening"))
        .unwrap_or_else(|| panic!("no listening line: {log}"));
    for debug in ["None", "Some(", "[\""] {
        assert!(!listening.contains(debug), "Debug output: {listening}");
    }

    // A CLI command's stderr, piped: no colour either, and a bad variable is named as set.
    let out = gw.cli_output(&["device", "list", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!out.stderr.contains(&0x1b), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("did you mean TMS_MQTT_LISTEN?"),
        "{}",
        stderr(&out)
    );

    let dir = tempfile::tempdir().unwrap();
    let out = run_in(
        dir.path(),
        &[
            ("TMS_MQTT_LISTEN", "everywhere"),
            ("TMS_LOG_FORMAT", "JSON"),
        ],
        &["device", "list"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("TMS_MQTT_LISTEN = \"everywhere\""),
        "{}",
        stderr(&out)
    );
    assert!(
        !stderr(&out).contains("TMS_LOG_FORMAT"),
        "JSON is a format: {}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_carry_the_process_series() {
    let gw = TestGateway::start().await;
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let m = scrape(&gw).await;
    let get = |name: &str| {
        *m.get(name)
            .unwrap_or_else(|| panic!("{name} missing from /metrics"))
    };
    // Counted in clock ticks and refreshed every second: a just-started process may show 0.
    wait_for("CPU time counted", Duration::from_secs(5), || async {
        let m = scrape(&gw).await;
        (m.get("process_cpu_seconds_total").copied().unwrap_or(0.0) > 0.0).then_some(())
    })
    .await;
    let rss = get("process_resident_memory_bytes");
    let measured = rss_mib(gw.pid()) as f64 * 1024.0 * 1024.0;
    assert!(
        rss > 4.0 * 1024.0 * 1024.0 && (rss - measured).abs() < 64.0 * 1024.0 * 1024.0,
        "rss {rss} vs /proc {measured}"
    );
    let fds = get("process_open_fds");
    let measured = open_fds(gw.pid()) as f64;
    assert!(
        fds >= 5.0 && (fds - measured).abs() < 32.0,
        "{fds} open descriptors, /proc says {measured}"
    );
    let started = get("process_start_time_seconds");
    assert!(
        started <= wall + 1.0 && started > wall - 120.0,
        "started {started}, now {wall}"
    );
}

/// On a terminal (a pseudo-terminal made by util-linux `script`) log lines are coloured,
/// unless NO_COLOR is set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn colour_only_on_a_terminal_and_never_with_no_color() {
    if !Command::new("sh")
        .args(["-c", "command -v script"])
        .output()
        .unwrap()
        .status
        .success()
    {
        skip("util-linux `script` is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let on_a_terminal = |no_color: Option<&str>| {
        let mut env = vec![("TMS_MQTT_LISTN", "1")];
        if let Some(v) = no_color {
            env.push(("NO_COLOR", v));
        }
        let cmd = format!("{BIN} device list");
        let out = Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .current_dir(dir.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(text.contains("did you mean TMS_MQTT_LISTEN?"), "{text}");
        text.contains('\u{1b}')
    };
    assert!(on_a_terminal(None), "a terminal gets colour");
    assert!(!on_a_terminal(Some("1")), "NO_COLOR=1 turns it off");
}
