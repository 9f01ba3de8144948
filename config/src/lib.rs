//! Configuration: a TOML file and `TMS_<SECTION>_<KEY>` environment variables become one typed,
//! validated [`Config`].
//!
//! Every key is optional; the environment wins over the file. All problems are collected and
//! reported together, each naming its key and value, before anything binds a port. The only
//! I/O here is reading the file and the process environment ([`Config::load`]); tests build
//! configuration from strings with [`Config::from_sources`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

mod builder;
mod unknown;

use builder::{Builder, Raw, build, flatten_file};
pub use unknown::{UnknownVariable, unknown_variables};

/// One configuration problem, naming the key (as written in the file) and the offending value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError {
    pub key: String,
    pub value: String,
    pub problem: String,
    /// The environment variable the value came from, when it did not come from the file:
    /// the message then names what the user actually set.
    pub env: Option<String>,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.env {
            Some(var) => write!(
                f,
                "{var} = {:?} (sets {}): {}",
                self.value, self.key, self.problem
            ),
            None => write!(f, "{} = {:?}: {}", self.key, self.value, self.problem),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading configuration file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("configuration file {path} is not valid TOML: {message}")]
    Syntax { path: String, message: String },
    #[error("invalid configuration:\n  {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
    Invalid(Vec<KeyError>),
}

/// The validated configuration shared by every part of the gateway.
#[derive(Clone, PartialEq)]
pub struct Config {
    pub data_dir: PathBuf,
    /// `sqlite://…` or `postgres://…`; may carry a password, so `Debug` redacts it.
    pub database_url: String,
    pub mqtt: Mqtt,
    pub http: Http,
    pub metrics: Metrics,
    pub mail: Mail,
    pub presence: Presence,
    pub certs: Certs,
    pub ingest: Ingest,
    pub alarms: Alarms,
    pub log: Log,
    pub node: Node,
}

/// This process as one node of a gateway whose nodes share a database (CONTRACT §6).
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// `node.id`; `None`: the id kept in `<data_dir>/node-id` (made on first start).
    pub id: Option<String>,
    /// How often this node writes its heartbeat.
    pub heartbeat: Duration,
    /// A node whose heartbeat is older than this is dead; its devices go offline (`node_lost`).
    pub dead_after: Duration,
    /// `node.poll_ms`: how often the change log, the revocations and the command queue are
    /// read when nothing woke the node; `None`: each poller's own interval (100-250 ms).
    pub poll: Option<Duration>,
}

/// Whether `id` may name a node: 1 to 64 of `A-Z a-z 0-9 . _ -` (it goes into logs, metric
/// labels and file names).
pub fn valid_node_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Alarms and their notifications (CONTRACT §7).
#[derive(Clone, PartialEq)]
pub struct Alarms {
    /// `low_battery` below this charge (percent)...
    pub low_battery_pct: f64,
    /// ...or below this runtime (minutes).
    pub low_runtime_min: f64,
    /// `device_offline` after this long offline.
    pub offline_after: Duration,
    /// The alarms of one company within this window go out as one notice.
    pub group: Duration,
    /// Where one JSON POST per notice goes, if anywhere.
    pub webhook_url: Option<String>,
    /// Key of the `X-TMS-Signature` HMAC; unsigned without it.
    pub webhook_secret: Option<Secret>,
}

impl fmt::Debug for Alarms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Alarms")
            .field("low_battery_pct", &self.low_battery_pct)
            .field("low_runtime_min", &self.low_runtime_min)
            .field("offline_after", &self.offline_after)
            .field("group", &self.group)
            .field("webhook_url", &self.webhook_url.as_deref().map(redact_url))
            .field("webhook_secret", &self.webhook_secret)
            .finish()
    }
}

/// How log lines are written (to standard error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Log {
    pub format: LogFormat,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Mqtt {
    pub listen: SocketAddr,
    /// DNS names and IP addresses that the broker's server certificate carries as SANs.
    pub hostnames: Vec<String>,
    pub max_connections: usize,
    /// Bound on TLS handshake + CONNECT together.
    pub handshake_timeout: Duration,
    pub max_packet_bytes: usize,
}

impl Mqtt {
    /// The name to tell devices to connect to: the first of `hostnames` that other machines
    /// can reach (not `localhost` or a loopback address), else the first.
    pub fn public_host(&self) -> &str {
        let loopback = |h: &str| {
            h.eq_ignore_ascii_case("localhost")
                || h.parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        };
        self.hostnames
            .iter()
            .find(|h| !loopback(h))
            .or(self.hostnames.first())
            .map_or("localhost", String::as_str)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Http {
    pub listen: SocketAddr,
    /// Base of links in emails; `None` means "derived from the bound HTTP address".
    pub public_url: Option<String>,
    /// Base-map tiles for the web map (`https://tiles.example/{z}/{x}/{y}.png`); `None` means
    /// the country outlines shipped in the binary, which need no network.
    pub map_tile_url: Option<String>,
    /// Connections served at once; more wait in the kernel's backlog, so HTTP never takes
    /// the file descriptors that devices need.
    pub max_connections: usize,
    /// A client must send a whole request head within this long, also between the requests
    /// of a kept-alive connection (which bounds idle keep-alive).
    pub header_timeout: Duration,
    /// Bound on reading the body and answering one request.
    pub request_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Metrics {
    /// A separate listener for `/metrics` only (e.g. a private address); when set, the HTTP
    /// listener does not serve `/metrics`.
    pub listen: Option<SocketAddr>,
}

#[derive(Clone, PartialEq)]
pub struct Mail {
    pub outbox_dir: PathBuf,
    pub smtp_url: Option<String>,
    /// Sender of every email, `Name <address>` or a bare address.
    pub from: String,
    /// First retry of a failed delivery after this long, doubling up to an hour.
    pub retry_base: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Presence {
    /// Fixed offline deadline; `None` means 1.5 × the device's own MQTT keep-alive.
    pub offline_after: Option<Duration>,
    /// An online device is "silent" after this many of its usual telemetry intervals
    /// without telemetry.
    pub silent_after_intervals: f64,
    /// How long session history (availability) is kept.
    pub history_retention: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Certs {
    pub rotation_overlap: Duration,
    /// From `TMS_CA_KEY_PASSPHRASE` only (a secret stays out of the file): the CA key is kept
    /// encrypted at rest with it.
    pub ca_key_passphrase: Option<Secret>,
}

/// A value that must not be logged: `Debug` shows `***`.
#[derive(Clone, PartialEq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Ingest {
    /// Messages waiting for the store; when full, publishers are pushed back (no PUBACK).
    pub queue_capacity: usize,
    pub batch_max_rows: usize,
    /// How long a batch waits for more messages; zero: commit what has queued at once.
    pub flush_interval: Duration,
    /// At shutdown, how long ingest keeps trying to write what is queued.
    pub drain_timeout: Duration,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("data_dir", &self.data_dir)
            .field("database_url", &redact_url(&self.database_url))
            .field("mqtt", &self.mqtt)
            .field("http", &self.http)
            .field("metrics", &self.metrics)
            .field("mail", &self.mail)
            .field("presence", &self.presence)
            .field("certs", &self.certs)
            .field("ingest", &self.ingest)
            .field("alarms", &self.alarms)
            .field("log", &self.log)
            .field("node", &self.node)
            .finish()
    }
}

impl fmt::Debug for Mail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mail")
            .field("outbox_dir", &self.outbox_dir)
            .field("smtp_url", &self.smtp_url.as_deref().map(redact_url))
            .field("from", &self.from)
            .field("retry_base", &self.retry_base)
            .finish()
    }
}

/// `scheme://user:secret@host/…` -> `scheme://user:***@host/…`, so a URL can be logged.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match (authority.rfind('@'), authority.find(':')) {
        (Some(at), Some(colon)) if colon < at => format!(
            "{}{}:***{}",
            &url[..scheme_end + 3],
            &authority[..colon],
            &rest[at..]
        ),
        _ => url.to_owned(),
    }
}

/// Every key, as `(section, key)`; `""` is the top level. The environment variable is
/// `TMS_<SECTION>_<KEY>` in upper case (`TMS_DATA_DIR` for the top-level `data_dir`).
const KEYS: &[(&str, &str)] = &[
    ("", "data_dir"),
    ("database", "url"),
    ("mqtt", "listen"),
    ("mqtt", "hostnames"),
    ("mqtt", "max_connections"),
    ("mqtt", "handshake_timeout_secs"),
    ("mqtt", "max_packet_bytes"),
    ("http", "listen"),
    ("http", "public_url"),
    ("http", "map_tile_url"),
    ("http", "max_connections"),
    ("http", "header_timeout_secs"),
    ("http", "request_timeout_secs"),
    ("metrics", "listen"),
    ("mail", "outbox_dir"),
    ("mail", "smtp_url"),
    ("mail", "from"),
    ("mail", "retry_base_secs"),
    ("presence", "offline_after_secs"),
    ("presence", "silent_after_intervals"),
    ("presence", "history_retention_days"),
    ("certs", "rotation_overlap_days"),
    ("ingest", "queue_capacity"),
    ("ingest", "batch_max_rows"),
    ("ingest", "flush_interval_ms"),
    ("ingest", "drain_timeout_secs"),
    ("alarms", "low_battery_pct"),
    ("alarms", "low_runtime_min"),
    ("alarms", "offline_after_secs"),
    ("alarms", "group_secs"),
    ("alarms", "webhook_url"),
    ("alarms", "webhook_secret"),
    ("log", "format"),
    ("node", "id"),
    ("node", "heartbeat_secs"),
    ("node", "dead_after_secs"),
    ("node", "poll_ms"),
];

/// Every configuration key as written in the file (`data_dir`, `mqtt.listen`, …).
pub fn keys() -> impl Iterator<Item = String> {
    KEYS.iter().map(|(section, key)| dotted(section, key))
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| "expected IP:PORT, e.g. 0.0.0.0:8883 (port 0 picks a free port)".to_owned())
}

fn dotted(section: &str, key: &str) -> String {
    if section.is_empty() {
        key.to_owned()
    } else {
        format!("{section}.{key}")
    }
}

/// The environment variable that sets `section.key`.
pub fn env_var(section: &str, key: &str) -> String {
    format!(
        "TMS_{}",
        dotted(section, key).replace('.', "_").to_uppercase()
    )
}

/// The names a device on this machine or the local network can reach the broker by, with
/// nothing configured: the loopback names and addresses, and the machine's own name.
fn default_hostnames(host_name: Option<&str>) -> Vec<String> {
    let mut names: Vec<String> = ["localhost", "127.0.0.1", "::1"]
        .map(str::to_owned)
        .to_vec();
    if let Some(host) = host_name.map(|h| h.trim().to_ascii_lowercase())
        && valid_hostname(&host)
        && !host.contains('*')
        && !names.contains(&host)
    {
        names.push(host);
    }
    names
}

/// This machine's host name (the kernel's, else `/etc/hostname`), if it has one.
fn machine_host_name() -> Option<String> {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .map(|text| text.trim().to_owned())
        .find(|name| !name.is_empty())
}

fn valid_hostname(h: &str) -> bool {
    if h.parse::<IpAddr>().is_ok() {
        return true;
    }
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'*')
        })
}

impl Config {
    /// Reads the optional file and the process environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let text = match file {
            Some(path) => {
                Some(
                    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                        path: path.to_owned(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        let env: HashMap<String, String> = std::env::vars().collect();
        let origin = file.map(|p| p.display().to_string()).unwrap_or_default();
        let host = machine_host_name();
        Self::from_sources_named(&origin, text.as_deref(), &env, host.as_deref())
    }

    /// Builds the configuration from a TOML text and an environment map (for tests and tools).
    /// The default `mqtt.hostnames` then holds the loopback names only, whatever machine the
    /// test runs on.
    pub fn from_sources(
        toml_text: Option<&str>,
        env: &HashMap<String, String>,
    ) -> Result<Config, ConfigError> {
        Self::from_sources_named("<string>", toml_text, env, None)
    }

    /// [`Config::from_sources`] on a machine called `host_name`, which the default
    /// `mqtt.hostnames` then includes.
    pub fn from_sources_on_host(
        toml_text: Option<&str>,
        env: &HashMap<String, String>,
        host_name: &str,
    ) -> Result<Config, ConfigError> {
        Self::from_sources_named("<string>", toml_text, env, Some(host_name))
    }

    fn from_sources_named(
        origin: &str,
        toml_text: Option<&str>,
        env: &HashMap<String, String>,
        host_name: Option<&str>,
    ) -> Result<Config, ConfigError> {
        let mut b = Builder {
            raw: BTreeMap::new(),
            errors: Vec::new(),
            host_name: host_name.map(str::to_owned),
        };
        if let Some(text) = toml_text {
            let table: toml::Table =
                text.parse()
                    .map_err(|e: toml::de::Error| ConfigError::Syntax {
                        path: origin.to_owned(),
                        message: e.to_string(),
                    })?;
            flatten_file(table, &mut b);
        }
        for (section, key) in KEYS {
            if let Some(v) = env.get(&env_var(section, key)) {
                b.raw.insert(dotted(section, key), Raw::Env(v.clone()));
            }
        }
        let mut cfg = build(&mut b);
        cfg.certs.ca_key_passphrase = env
            .get("TMS_CA_KEY_PASSPHRASE")
            .filter(|p| !p.is_empty())
            .map(|p| Secret(p.clone()));
        if b.errors.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid(b.errors))
        }
    }

    /// Where the broker's and the API's bound addresses are written for scripts and tests.
    pub fn ports_file(&self) -> PathBuf {
        self.data_dir.join("ports.json")
    }
}

#[cfg(test)]
mod tests;
