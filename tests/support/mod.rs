//! TestGateway: the real `tms-gateway` binary on port 0 in a temporary data directory, with
//! helpers to provision devices through its CLI and to connect real MQTT clients over mTLS.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers fail the test loudly"
)]
#![expect(
    dead_code,
    reason = "each test binary uses a different part of the helpers"
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tms_gateway::PortsFile;
use tms_store::Store;

pub mod flood;
mod mqtt;
pub mod onboarding;
pub mod proxy;
mod skips;

pub use mqtt::*;
pub use skips::skip;

pub const BIN: &str = env!("CARGO_BIN_EXE_tms-gateway");

/// Waits until `check` returns `Some`, polling every 20 ms, or panics after `deadline`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Files `device cert` wrote for one device.
#[derive(Debug, Clone)]
pub struct DeviceFiles {
    pub serial: String,
    pub key: PathBuf,
    pub pem: PathBuf,
    pub ca: PathBuf,
}

pub struct TestGateway {
    pub dir: tempfile::TempDir,
    /// `<dir>/data`, or the `TMS_DATA_DIR` the test chose (e.g. on a small tmpfs).
    data: PathBuf,
    pub ports: PortsFile,
    child: Option<Child>,
    env: Vec<(String, String)>,
    /// When set, every command runs under `sh -c 'umask U; exec …'`.
    umask: Option<String>,
}

impl TestGateway {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts `serve` with extra `TMS_*` variables.
    pub async fn start_with(extra: &[(&str, &str)]) -> Self {
        Self::start_full(extra, None).await
    }

    /// Starts `serve`, and runs every CLI command, with this umask (e.g. "022"), as a
    /// shell or service manager with that umask would.
    pub async fn start_with_umask(umask: &str, extra: &[(&str, &str)]) -> Self {
        Self::start_full(extra, Some(umask.to_owned())).await
    }

    /// Starts `serve` with the default `mqtt.hostnames` (what an operator who sets nothing
    /// gets), and extra `TMS_*` variables.
    pub async fn start_with_default_hostnames(extra: &[(&str, &str)]) -> Self {
        Self::start_env(extra, None, &["TMS_MQTT_HOSTNAMES"]).await
    }

    async fn start_full(extra: &[(&str, &str)], umask: Option<String>) -> Self {
        Self::start_env(extra, umask, &[]).await
    }

    async fn start_env(extra: &[(&str, &str)], umask: Option<String>, unset: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut env: Vec<(String, String)> = vec![
            (
                "TMS_DATA_DIR".into(),
                dir.path().join("data").display().to_string(),
            ),
            ("TMS_MQTT_LISTEN".into(), "127.0.0.1:0".into()),
            ("TMS_HTTP_LISTEN".into(), "127.0.0.1:0".into()),
            ("TMS_MQTT_HOSTNAMES".into(), "localhost,127.0.0.1".into()),
        ];
        env.retain(|(k, _)| !unset.contains(&k.as_str()));
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let data = env
            .iter()
            .rev()
            .find(|(k, _)| k == "TMS_DATA_DIR")
            .map(|(_, v)| PathBuf::from(v))
            .unwrap_or_else(|| dir.path().join("data"));
        let mut gw = TestGateway {
            dir,
            data,
            ports: PortsFile {
                mqtt: "0.0.0.0:0".parse().unwrap(),
                http: "0.0.0.0:0".parse().unwrap(),
                metrics: None,
            },
            child: None,
            env,
            umask,
        };
        gw.spawn().await;
        gw
    }

    /// The process id of the running `serve`.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("serve is running").id()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data.clone()
    }

    /// SIGTERM, then waits at most `within` for the exit: `Err` (after SIGKILL) if it hangs.
    pub fn stop_within(&mut self, within: Duration) -> Result<Option<i32>, String> {
        let Some(child) = self.child.as_ref() else {
            return Ok(None);
        };
        Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .unwrap();
        self.wait_exit(within)
            .map_err(|_| format!("serve did not exit within {within:?} of SIGTERM"))
    }

    /// Waits at most `within` for `serve` to exit by itself: `Err` (after SIGKILL) if it
    /// is still running then.
    pub fn wait_exit(&mut self, within: Duration) -> Result<Option<i32>, String> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Ok(status.code());
            }
            if start.elapsed() > within {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("serve did not exit by itself within {within:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn command(&self) -> Command {
        let mut cmd = match &self.umask {
            // `exec` keeps the pid, so stop() and kill() still reach the gateway itself.
            Some(umask) => {
                let mut cmd = Command::new("sh");
                cmd.arg("-c")
                    .arg(format!("umask {umask}; exec \"$0\" \"$@\""))
                    .arg(BIN);
                cmd
            }
            None => Command::new(BIN),
        };
        cmd.env_clear();
        for key in ["PATH", "HOME"] {
            if let Ok(v) = std::env::var(key) {
                cmd.env(key, v);
            }
        }
        cmd.env("RUST_LOG", "info,rumqttd=off,rustls=error");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    async fn spawn(&mut self) {
        let ports_file = self.data_dir().join("ports.json");
        let _ = std::fs::remove_file(&ports_file);
        let log = std::fs::File::create(self.dir.path().join("serve.log")).unwrap();
        let child = self
            .command()
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.ports = wait_for("ports.json", Duration::from_secs(30), || {
            let text = std::fs::read_to_string(&ports_file).ok();
            async move { text.and_then(|t| serde_json::from_str(&t).ok()) }
        })
        .await;
    }

    /// Restarts `serve` on the same data directory.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    /// SIGTERM and wait: the graceful path. Returns the exit status code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .unwrap();
        let status = child.wait().unwrap();
        status.code()
    }

    /// SIGKILL: the crash path.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    /// Runs a CLI command against this gateway's data directory; panics on failure.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = self.cli_output(args);
        assert!(
            out.status.success(),
            "tms-gateway {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn cli_output(&self, args: &[&str]) -> Output {
        self.command().args(args).output().unwrap()
    }

    /// Starts a CLI command against this gateway's data directory without waiting for it;
    /// its stdout and stderr are piped (`Child::wait_with_output`).
    pub fn cli_spawn(&self, args: &[&str]) -> Child {
        self.command()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Registers a device and issues its certificate files through the CLI.
    pub fn provision(&self, serial: &str, mac: &str) -> DeviceFiles {
        let out = self.device_add(
            serial,
            mac,
            "Acme Hospital",
            &["--ups-model", "1600XP", "--ups-serial", "160300007"],
        );
        assert!(
            out.status.success(),
            "device add {serial}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.issue(serial)
    }

    /// `device add` with these flags, whatever its outcome.
    pub fn device_add(&self, serial: &str, mac: &str, company: &str, more: &[&str]) -> Output {
        let mut args = vec![
            "device",
            "add",
            "--serial",
            serial,
            "--mac",
            mac,
            "--company",
            company,
        ];
        args.extend_from_slice(more);
        self.cli_output(&args)
    }

    /// Issues (another) certificate for a registered device into its own folder.
    pub fn issue(&self, serial: &str) -> DeviceFiles {
        let n = std::fs::read_dir(self.dir.path()).unwrap().count();
        let out = self.dir.path().join(format!("files-{serial}-{n}"));
        self.cli(&["device", "cert", serial, "--out", out.to_str().unwrap()]);
        DeviceFiles {
            serial: serial.into(),
            key: out.join(format!("{serial}.key")),
            pem: out.join(format!("{serial}.pem")),
            ca: out.join("ca.pem"),
        }
    }

    pub async fn store(&self) -> Store {
        Store::open(&format!(
            "sqlite://{}",
            self.data_dir().join("tms.db").display()
        ))
        .await
        .unwrap()
    }

    pub fn mqtt_port(&self) -> u16 {
        self.ports.mqtt.port()
    }

    /// `mosquitto_pub` with the device's files; returns the process output.
    pub fn mosquitto_pub(
        &self,
        host: &str,
        files: &DeviceFiles,
        client_id: &str,
        topic: &str,
        message: &str,
    ) -> Output {
        Command::new("mosquitto_pub")
            .args(["-h", host, "-p", &self.mqtt_port().to_string(), "--cafile"])
            .arg(&files.ca)
            .arg("--cert")
            .arg(&files.pem)
            .arg("--key")
            .arg(&files.key)
            .args(["-i", client_id, "-t", topic, "-m", message, "-q", "1"])
            .output()
            .expect("mosquitto_pub (Debian package mosquitto-clients) must be installed")
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A certificate from `ca` for `serial` with a generated key, valid from `from` to `until`.
pub fn issue_between(
    ca: &tms_certs::Ca,
    serial: &tms_model::DeviceSerial,
    from: time::OffsetDateTime,
    until: time::OffsetDateTime,
) -> tms_certs::IssuedCert {
    ca.issue_device(serial, tms_certs::DeviceKey::Generate, from, until)
        .unwrap()
}

/// A certificate from `ca` for `serial` whose validity ended a day before `now`.
pub fn issue_expired(
    ca: &tms_certs::Ca,
    serial: &tms_model::DeviceSerial,
    now: time::OffsetDateTime,
) -> tms_certs::IssuedCert {
    issue_between(
        ca,
        serial,
        now - time::Duration::days(3),
        now - time::Duration::days(1),
    )
}

/// Runs `cmd` and fails the test with its stderr unless it exits 0.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a CLI command on a data directory with no gateway running.
pub fn cli_in(data_dir: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .env("TMS_DATA_DIR", data_dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tms-gateway {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

impl TestGateway {
    /// Base URL of the HTTP API.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.ports.http)
    }

    /// Runs a CLI command with `input` on standard input; panics on failure.
    pub fn cli_stdin(&self, args: &[&str], input: &str) -> String {
        use std::io::Write;
        let mut child = self
            .command()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "tms-gateway {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The `.eml` files in the outbox, oldest first.
    pub fn outbox(&self) -> Vec<String> {
        let dir = self.data_dir().join("outbox");
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        names.retain(|p: &PathBuf| p.extension().is_some_and(|e| e == "eml"));
        names.sort();
        names
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect()
    }
}

/// One scrape of `/metrics`: the value of every sample, keyed by name and labels as written.
pub async fn scrape(gw: &TestGateway) -> std::collections::HashMap<String, f64> {
    let url = format!("http://{}/metrics", gw.ports.http);
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// Difference of one sample between two scrapes (absent counts as 0).
pub fn delta(
    before: &std::collections::HashMap<String, f64>,
    after: &std::collections::HashMap<String, f64>,
    key: &str,
) -> f64 {
    after.get(key).copied().unwrap_or(0.0) - before.get(key).copied().unwrap_or(0.0)
}

/// Creates an admin through the CLI and logs in; returns the bearer token.
pub async fn admin_token(gw: &TestGateway) -> String {
    staff_token(gw, "admin@example.com", "admin").await
}

/// Creates a staff account (`admin` or `provider`) through the CLI and logs in; returns the
/// bearer token.
pub async fn staff_token(gw: &TestGateway, email: &str, role: &str) -> String {
    let password = format!("{role}-password-1");
    gw.cli_stdin(
        &[
            "user",
            "add",
            "--email",
            email,
            "--role",
            role,
            "--password-stdin",
        ],
        &format!("{password}\n"),
    );
    login(gw, email, &password).await
}

/// Logs in; returns the bearer token.
pub async fn login(gw: &TestGateway, email: &str, password: &str) -> String {
    let resp: serde_json::Value = reqwest::Client::new()
        .post(gw.url("/api/v1/auth/login"))
        .json(&serde_json::json!({"email": email, "password": password}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    resp["token"].as_str().unwrap().to_owned()
}

/// `GET path` with a bearer token: the status and the JSON body (`Null` when it has none).
pub async fn api_get(gw: &TestGateway, token: &str, path: &str) -> (u16, serde_json::Value) {
    let resp = reqwest::Client::new()
        .get(gw.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(serde_json::Value::Null))
}

/// Resident memory of a process in MiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("VmRSS in /proc/<pid>/status");
    kib / 1024
}

/// How many file descriptors a process holds open.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// A `postgres://` URL on a fresh, empty schema of `TMS_TEST_DATABASE_URL`, or `None` when
/// that is not set (then [`skip`] has told it; PostgreSQL tests run on SQLite only).
pub async fn fresh_postgres_url(name: &str) -> Option<String> {
    use sqlx::{Connection, Executor};
    let Ok(base) = std::env::var("TMS_TEST_DATABASE_URL") else {
        skip(&format!(
            "TMS_TEST_DATABASE_URL is not set: no PostgreSQL leg of {name}"
        ));
        return None;
    };
    sqlx::any::install_default_drivers();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let schema = format!("t_{name}_{}_{nanos}", std::process::id());
    let mut conn = sqlx::AnyConnection::connect(&base).await.unwrap();
    conn.execute(format!("CREATE SCHEMA {schema}").as_str())
        .await
        .unwrap();
    let sep = if base.contains('?') { '&' } else { '?' };
    Some(format!("{base}{sep}options=-c%20search_path%3D{schema}"))
}

/// Connects `files`' device, publishes `n` telemetry messages and waits until all are stored.
/// (It lives here, using [`mqtt`] through the re-export, so that re-export counts as used in
/// every test binary, including those that connect no device.)
pub async fn publishes_are_stored(
    gw: &TestGateway,
    store: &tms_store::Store,
    files: &DeviceFiles,
    n: i64,
) {
    let (client, mut el) = device_client(gw, files);
    connack(&mut el).await.unwrap();
    let events = drive(el);
    let before = store.telemetry_count(&files.serial).await.unwrap();
    for _ in 0..n {
        publish(&client, &files.serial, "telemetry", TELEMETRY).await;
    }
    wait_for(
        &format!("{n} rows of {}", files.serial),
        Duration::from_secs(15),
        || async {
            (store.telemetry_count(&files.serial).await.unwrap() == before + n).then_some(())
        },
    )
    .await;
    events.abort();
}
