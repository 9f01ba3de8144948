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
    pub log: Log,
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
            .field("log", &self.log)
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
    ("log", "format"),
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

/// A raw value before typing: TOML gives typed values, the environment gives strings.
#[derive(Debug, Clone)]
enum Raw {
    Toml(toml::Value),
    Env(String),
}

impl Raw {
    fn shown(&self) -> String {
        match self {
            Raw::Toml(toml::Value::String(s)) | Raw::Env(s) => s.clone(),
            Raw::Toml(v) => v.to_string(),
        }
    }
}

struct Builder {
    raw: BTreeMap<String, Raw>,
    errors: Vec<KeyError>,
    /// This machine's name, for the default `mqtt.hostnames`.
    host_name: Option<String>,
}

impl Builder {
    fn fail(&mut self, key: &str, value: String, problem: impl Into<String>) {
        let env = match self.raw.get(key) {
            Some(Raw::Env(_)) => Some(format!("TMS_{}", key.replace('.', "_").to_uppercase())),
            _ => None,
        };
        self.errors.push(KeyError {
            key: key.to_owned(),
            value,
            problem: problem.into(),
            env,
        });
    }

    fn string(&mut self, key: &str) -> Option<String> {
        let raw = self.raw.get(key)?.clone();
        match raw {
            Raw::Env(s) | Raw::Toml(toml::Value::String(s)) => Some(s),
            other => {
                self.fail(key, other.shown(), "expected a string");
                None
            }
        }
    }

    fn parsed<T>(
        &mut self,
        key: &str,
        default: T,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> T {
        let Some(raw) = self.raw.get(key).cloned() else {
            return default;
        };
        let text = match &raw {
            Raw::Toml(toml::Value::String(s)) | Raw::Env(s) => s.clone(),
            Raw::Toml(toml::Value::Integer(i)) => i.to_string(),
            Raw::Toml(toml::Value::Float(f)) => f.to_string(),
            Raw::Toml(other) => {
                self.fail(key, other.to_string(), "expected a string or a number");
                return default;
            }
        };
        match parse(text.trim()) {
            Ok(v) => v,
            Err(problem) => {
                self.fail(key, raw.shown(), problem);
                default
            }
        }
    }

    fn int(&mut self, key: &str, default: u64, min: u64, max: u64) -> u64 {
        self.parsed(key, default, |s| {
            let n: u64 = s
                .parse()
                .map_err(|_| "expected a whole number".to_owned())?;
            if n < min || n > max {
                return Err(format!("must be between {min} and {max}"));
            }
            Ok(n)
        })
    }

    fn addr(&mut self, key: &str, default: SocketAddr) -> SocketAddr {
        self.parsed(key, default, parse_addr)
    }

    fn list(&mut self, key: &str) -> Option<Vec<String>> {
        let raw = self.raw.get(key)?.clone();
        let items: Vec<String> = match &raw {
            Raw::Env(s) | Raw::Toml(toml::Value::String(s)) => s
                .split(',')
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .collect(),
            Raw::Toml(toml::Value::Array(a)) => {
                let mut out = Vec::new();
                for v in a {
                    match v {
                        toml::Value::String(s) => out.push(s.trim().to_owned()),
                        other => {
                            self.fail(key, other.to_string(), "expected a list of strings");
                            return None;
                        }
                    }
                }
                out
            }
            Raw::Toml(other) => {
                self.fail(key, other.to_string(), "expected a list of strings");
                return None;
            }
        };
        Some(items)
    }
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

/// Environment variables that are not configuration keys but are still ours.
const OTHER_VARIABLES: &[&str] = &[
    // The CA key's passphrase: environment only (see `Certs::ca_key_passphrase`).
    "TMS_CA_KEY_PASSPHRASE",
    // The PostgreSQL server of the test suite (scripts/test).
    "TMS_TEST_DATABASE_URL",
    // Set by gateway/build.rs for the build; `cargo test` passes it on to what it runs.
    "TMS_GIT_COMMIT",
];

/// A `TMS_*` environment variable that sets nothing, most likely a misspelling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownVariable {
    pub name: String,
    /// The known variable it is closest to, when one is close enough to be meant.
    pub suggestion: Option<String>,
}

impl fmt::Display for UnknownVariable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} is not a tms-gateway setting and is ignored",
            self.name
        )?;
        if let Some(s) = &self.suggestion {
            write!(f, "; did you mean {s}?")?;
        }
        Ok(())
    }
}

/// The `TMS_*` variables of `env` that configure nothing, sorted by name, each with the known
/// variable it most likely meant.
pub fn unknown_variables(env: &HashMap<String, String>) -> Vec<UnknownVariable> {
    let known: Vec<String> = KEYS
        .iter()
        .map(|(section, key)| env_var(section, key))
        .chain(OTHER_VARIABLES.iter().map(|v| (*v).to_owned()))
        .collect();
    let mut unknown: Vec<UnknownVariable> = env
        .keys()
        .filter(|name| name.starts_with("TMS_") && !known.contains(name))
        .map(|name| {
            let suggestion = known
                .iter()
                .map(|k| (edit_distance(&name.to_ascii_uppercase(), k), k))
                .min()
                .filter(|(d, k)| *d <= (k.len() / 4).max(2))
                .map(|(_, k)| k.clone());
            UnknownVariable {
                name: name.clone(),
                suggestion,
            }
        })
        .collect();
    unknown.sort_by(|a, b| a.name.cmp(&b.name));
    unknown
}

/// Levenshtein distance: insertions, deletions and substitutions of one character each.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(above + 1);
            diagonal = above;
        }
    }
    row[b.len()]
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

fn flatten_file(table: toml::Table, b: &mut Builder) {
    for (name, value) in table {
        match value {
            toml::Value::Table(section) if KEYS.iter().any(|(s, _)| *s == name) => {
                for (key, v) in section {
                    if KEYS.contains(&(name.as_str(), key.as_str())) {
                        b.raw.insert(dotted(&name, &key), Raw::Toml(v));
                    } else {
                        let shown = Raw::Toml(v).shown();
                        b.fail(&dotted(&name, &key), shown, "unknown key");
                    }
                }
            }
            v if KEYS.contains(&("", name.as_str())) => {
                b.raw.insert(name, Raw::Toml(v));
            }
            v => {
                let shown = Raw::Toml(v).shown();
                b.fail(&name, shown, "unknown key");
            }
        }
    }
}

fn build(b: &mut Builder) -> Config {
    let data_dir = PathBuf::from(
        b.string("data_dir")
            .unwrap_or_else(|| "./tms-data".to_owned()),
    );
    let database_url = match b.string("database.url") {
        Some(url)
            if url.starts_with("sqlite:")
                || url.starts_with("postgres://")
                || url.starts_with("postgresql://") =>
        {
            url
        }
        Some(url) => {
            b.fail(
                "database.url",
                redact_url(&url),
                "expected sqlite://PATH or postgres://…",
            );
            String::new()
        }
        None => format!("sqlite://{}", data_dir.join("tms.db").display()),
    };

    let mqtt_listen = b.addr("mqtt.listen", SocketAddr::from(([0, 0, 0, 0], 8883)));
    let hostnames = match b.list("mqtt.hostnames") {
        Some(list) if list.is_empty() => {
            b.fail(
                "mqtt.hostnames",
                String::new(),
                "needs at least one DNS name or IP address",
            );
            vec![]
        }
        Some(list) => {
            for h in list.iter().filter(|h| !valid_hostname(h)) {
                b.fail("mqtt.hostnames", h.clone(), "not a DNS name or IP address");
            }
            list
        }
        None => default_hostnames(b.host_name.as_deref()),
    };
    let mqtt = Mqtt {
        listen: mqtt_listen,
        hostnames,
        max_connections: b.int("mqtt.max_connections", 50_000, 1, 10_000_000) as usize,
        handshake_timeout: Duration::from_secs(b.int("mqtt.handshake_timeout_secs", 10, 1, 600)),
        max_packet_bytes: b.int("mqtt.max_packet_bytes", 65_536, 128, 256 * 1024 * 1024) as usize,
    };

    let http_listen = b.addr("http.listen", SocketAddr::from(([127, 0, 0, 1], 8080)));
    let public_url = b.string("http.public_url").and_then(|u| {
        if u.starts_with("http://") || u.starts_with("https://") {
            Some(u.trim_end_matches('/').to_owned())
        } else {
            b.fail("http.public_url", u, "expected an http:// or https:// URL");
            None
        }
    });

    let map_tile_url = b.string("http.map_tile_url").and_then(|u| {
        let web = u.starts_with("http://") || u.starts_with("https://");
        if web && ["{z}", "{x}", "{y}"].iter().all(|p| u.contains(p)) {
            Some(u)
        } else {
            b.fail(
                "http.map_tile_url",
                u,
                "expected an http:// or https:// URL with {z}, {x} and {y}",
            );
            None
        }
    });

    let http_max_connections = b.int("http.max_connections", 1024, 1, 1_000_000) as usize;
    let header_timeout = Duration::from_secs(b.int("http.header_timeout_secs", 10, 1, 600));
    let request_timeout = Duration::from_secs(b.int("http.request_timeout_secs", 30, 1, 3600));

    let metrics_listen = b.parsed("metrics.listen", None, |s| parse_addr(s).map(Some));

    let outbox_dir = b
        .string("mail.outbox_dir")
        .map(PathBuf::from)
        .unwrap_or_else(|| data_dir.join("outbox"));
    let smtp_url = b.string("mail.smtp_url").and_then(|u| {
        if u.starts_with("smtp://") || u.starts_with("smtps://") {
            Some(u)
        } else {
            b.fail(
                "mail.smtp_url",
                redact_url(&u),
                "expected smtp://HOST:PORT or smtps://…",
            );
            None
        }
    });

    let from = match b.string("mail.from") {
        Some(f) if f.contains('@') => f,
        Some(f) => {
            b.fail(
                "mail.from",
                f,
                "expected an email address, e.g. TMS <noreply@example.com>",
            );
            String::new()
        }
        None => "tms-gateway <noreply@localhost>".to_owned(),
    };

    let retry_base = b.int("mail.retry_base_secs", 10, 1, 3600);

    let offline_after = b.parsed("presence.offline_after_secs", None, |s| {
        let secs: f64 = s
            .parse()
            .map_err(|_| "expected a number of seconds".to_owned())?;
        if !(0.1..=86_400.0).contains(&secs) {
            return Err("must be between 0.1 and 86400 seconds".to_owned());
        }
        Ok(Some(Duration::from_secs_f64(secs)))
    });

    let silent_after_intervals = b.parsed("presence.silent_after_intervals", 3.0, |s| {
        let n: f64 = s.parse().map_err(|_| "expected a number".to_owned())?;
        if !(1.0..=1000.0).contains(&n) {
            return Err("must be between 1 and 1000".to_owned());
        }
        Ok(n)
    });
    let retention_days = b.int("presence.history_retention_days", 90, 1, 3650);
    let overlap_days = b.int("certs.rotation_overlap_days", 7, 0, 365);

    let ingest = Ingest {
        queue_capacity: b.int("ingest.queue_capacity", 10_000, 1, 10_000_000) as usize,
        batch_max_rows: b.int("ingest.batch_max_rows", 500, 1, 100_000) as usize,
        flush_interval: Duration::from_millis(b.int("ingest.flush_interval_ms", 0, 0, 60_000)),
        drain_timeout: Duration::from_secs(b.int("ingest.drain_timeout_secs", 10, 1, 3600)),
    };

    let format = b.parsed("log.format", LogFormat::Text, |s| {
        match s.to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err("expected \"text\" or \"json\"".to_owned()),
        }
    });

    Config {
        log: Log { format },
        data_dir,
        database_url,
        mqtt,
        http: Http {
            listen: http_listen,
            public_url,
            map_tile_url,
            max_connections: http_max_connections,
            header_timeout,
            request_timeout,
        },
        metrics: Metrics {
            listen: metrics_listen,
        },
        mail: Mail {
            outbox_dir,
            smtp_url,
            from,
            retry_base: Duration::from_secs(retry_base),
        },
        presence: Presence {
            offline_after,
            silent_after_intervals,
            history_retention: Duration::from_secs(retention_days * 86_400),
        },
        certs: Certs {
            rotation_overlap: Duration::from_secs(overlap_days * 86_400),
            ca_key_passphrase: None,
        },
        ingest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::from_sources(None, &HashMap::new()).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("./tms-data"));
        assert_eq!(c.database_url, "sqlite://./tms-data/tms.db");
        assert_eq!(c.mqtt.listen, "0.0.0.0:8883".parse().unwrap());
        assert_eq!(c.mqtt.hostnames, vec!["localhost", "127.0.0.1", "::1"]);
        assert_eq!(c.http.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.mail.outbox_dir, PathBuf::from("./tms-data/outbox"));
        assert_eq!(c.mqtt.max_connections, 50_000);
        assert_eq!(c.mqtt.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.mqtt.max_packet_bytes, 65_536);
        assert_eq!(c.certs.rotation_overlap, Duration::from_secs(7 * 86_400));
        assert_eq!(c.presence.offline_after, None);
        assert_eq!(c.http.max_connections, 1024);
        assert_eq!(c.http.header_timeout, Duration::from_secs(10));
        assert_eq!(c.http.request_timeout, Duration::from_secs(30));
    }

    #[test]
    fn environment_wins_over_file() {
        let file = "data_dir = \"/a\"\n[mqtt]\nlisten = \"127.0.0.1:1\"\nhostnames = [\"gw.example\", \"10.0.0.1\"]\n";
        let c = Config::from_sources(
            Some(file),
            &env(&[("TMS_MQTT_LISTEN", "127.0.0.1:0"), ("TMS_DATA_DIR", "/b")]),
        )
        .unwrap();
        assert_eq!(c.mqtt.listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!(c.data_dir, PathBuf::from("/b"));
        assert_eq!(c.database_url, "sqlite:///b/tms.db");
        assert_eq!(c.mqtt.hostnames, vec!["gw.example", "10.0.0.1"]);
        let c = Config::from_sources(
            None,
            &env(&[("TMS_MQTT_HOSTNAMES", "a.example, 127.0.0.1")]),
        )
        .unwrap();
        assert_eq!(c.mqtt.hostnames, vec!["a.example", "127.0.0.1"]);
    }

    #[test]
    fn every_error_is_reported_with_its_key() {
        let file =
            "bogus = 1\n[mqtt]\nlisten = \"nowhere\"\nmax_connections = 0\ncolour = \"red\"\n";
        let err = Config::from_sources(
            Some(file),
            &env(&[
                ("TMS_HTTP_LISTEN", "8080"),
                ("TMS_DATABASE_URL", "mysql://u:pw@h/db"),
                ("TMS_HTTP_MAP_TILE_URL", "https://tiles.example/{z}/{x}.png"),
                ("TMS_METRICS_LISTEN", "9100"),
                ("TMS_HTTP_MAX_CONNECTIONS", "0"),
                ("TMS_HTTP_HEADER_TIMEOUT_SECS", "soon"),
            ]),
        )
        .unwrap_err();
        let ConfigError::Invalid(errors) = err else {
            panic!("expected Invalid, got {err:?}")
        };
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        for key in [
            "bogus",
            "mqtt.listen",
            "mqtt.max_connections",
            "mqtt.colour",
            "http.listen",
            "database.url",
            "http.map_tile_url",
            "metrics.listen",
            "http.max_connections",
            "http.header_timeout_secs",
        ] {
            assert!(keys.contains(&key), "{key} not reported in {keys:?}");
        }
        let shown = ConfigError::Invalid(errors).to_string();
        assert!(shown.contains("mqtt.listen = \"nowhere\""), "{shown}");
        assert!(!shown.contains("pw@"), "password leaked: {shown}");
    }

    #[test]
    fn map_tile_url_needs_z_x_and_y() {
        let ok = "https://tiles.example/{z}/{x}/{y}.png";
        let c = Config::from_sources(None, &env(&[("TMS_HTTP_MAP_TILE_URL", ok)])).unwrap();
        assert_eq!(c.http.map_tile_url.as_deref(), Some(ok));
        let c = Config::from_sources(None, &HashMap::new()).unwrap();
        assert_eq!(
            c.http.map_tile_url, None,
            "no tile server: the built-in outlines"
        );
    }

    #[test]
    fn ca_key_passphrase_comes_from_the_environment_and_is_never_shown() {
        let c =
            Config::from_sources(None, &env(&[("TMS_CA_KEY_PASSPHRASE", "hunter2-x")])).unwrap();
        let p = c.certs.ca_key_passphrase.as_ref().unwrap();
        assert_eq!(p.expose(), "hunter2-x");
        assert!(!format!("{c:?}").contains("hunter2"));
        let none = Config::from_sources(None, &env(&[("TMS_CA_KEY_PASSPHRASE", "")])).unwrap();
        assert_eq!(none.certs.ca_key_passphrase, None);
    }

    #[test]
    fn debug_redacts_database_password() {
        let c = Config::from_sources(
            None,
            &env(&[("TMS_DATABASE_URL", "postgres://tms:s3cret@db:5432/tms")]),
        )
        .unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("postgres://tms:***@db:5432/tms"), "{shown}");
    }

    #[test]
    fn an_environment_error_names_the_variable_that_was_set() {
        let err = Config::from_sources(
            Some("[http]\nlisten = \"here\"\n"),
            &env(&[("TMS_MQTT_LISTEN", "nowhere")]),
        )
        .unwrap_err();
        let shown = err.to_string();
        assert!(
            shown.contains("TMS_MQTT_LISTEN = \"nowhere\" (sets mqtt.listen): expected IP:PORT"),
            "{shown}"
        );
        // From the file, the key as written there.
        assert!(
            shown.contains("http.listen = \"here\": expected"),
            "{shown}"
        );
        assert!(!shown.contains("TMS_HTTP_LISTEN"), "{shown}");
    }

    #[test]
    fn unknown_tms_variables_are_named_with_the_closest_known_one() {
        let unknown = unknown_variables(&env(&[
            ("TMS_MQTT_LISTN", "127.0.0.1:0"),
            ("TMS_LOG_FORMAT", "json"),
            ("TMS_CA_KEY_PASSPHRASE", "x"),
            ("TMS_DATADIR", "/srv/tms"),
            ("TMS_COMPLETELY_DIFFERENT", "1"),
            ("HOME", "/root"),
        ]));
        let shown: Vec<String> = unknown.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            vec![
                "TMS_COMPLETELY_DIFFERENT is not a tms-gateway setting and is ignored",
                "TMS_DATADIR is not a tms-gateway setting and is ignored; did you mean TMS_DATA_DIR?",
                "TMS_MQTT_LISTN is not a tms-gateway setting and is ignored; did you mean TMS_MQTT_LISTEN?",
            ]
        );
    }

    #[test]
    fn choices_are_case_insensitive() {
        let c = Config::from_sources(Some("[log]\nformat = \"JSON\"\n"), &HashMap::new()).unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
        let c = Config::from_sources(None, &env(&[("TMS_LOG_FORMAT", "Text")])).unwrap();
        assert_eq!(c.log.format, LogFormat::Text);
        let err = Config::from_sources(None, &env(&[("TMS_LOG_FORMAT", "yaml")])).unwrap_err();
        assert!(err.to_string().contains("TMS_LOG_FORMAT"), "{err}");
    }

    #[test]
    fn devices_are_told_a_name_other_machines_can_reach() {
        let on = |names: &[&str]| Mqtt {
            hostnames: names.iter().map(|n| (*n).to_owned()).collect(),
            ..Config::from_sources(None, &HashMap::new()).unwrap().mqtt
        };
        assert_eq!(
            on(&["localhost", "127.0.0.1", "::1", "gw-7"]).public_host(),
            "gw-7"
        );
        assert_eq!(
            on(&["mqtt.example.com", "localhost"]).public_host(),
            "mqtt.example.com"
        );
        assert_eq!(on(&["localhost", "127.0.0.1"]).public_host(), "localhost");
    }

    #[test]
    fn default_hostnames_reach_the_machine_by_loopback_and_by_name() {
        let c = Config::from_sources_on_host(None, &HashMap::new(), "Gateway-7\n").unwrap();
        assert_eq!(
            c.mqtt.hostnames,
            vec!["localhost", "127.0.0.1", "::1", "gateway-7"]
        );
        // A name no certificate can carry is left out, not an error.
        let c = Config::from_sources_on_host(None, &HashMap::new(), "my_box").unwrap();
        assert_eq!(c.mqtt.hostnames, vec!["localhost", "127.0.0.1", "::1"]);
        let c = Config::from_sources_on_host(None, &HashMap::new(), "localhost").unwrap();
        assert_eq!(c.mqtt.hostnames, vec!["localhost", "127.0.0.1", "::1"]);
        // Configured names replace the defaults.
        let c = Config::from_sources_on_host(
            None,
            &env(&[("TMS_MQTT_HOSTNAMES", "gw.example")]),
            "gateway-7",
        )
        .unwrap();
        assert_eq!(c.mqtt.hostnames, vec!["gw.example"]);
    }

    /// `deploy/config.example.toml` sets every key to its default, or shows it commented out
    /// when its default is "unset" or depends on the machine: it loads, means exactly the
    /// defaults, and names every key there is.
    #[test]
    fn the_example_configuration_names_every_key_with_its_default() {
        let text = include_str!("../../deploy/config.example.toml");
        let example = Config::from_sources(Some(text), &HashMap::new()).unwrap();
        let defaults = Config::from_sources(None, &HashMap::new()).unwrap();
        assert_eq!(example, defaults);

        let mut section = String::new();
        let mut written = Vec::new();
        for line in text.lines() {
            let line = line.trim().trim_start_matches('#').trim();
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_owned();
            } else if let Some((key, _)) = line.split_once(" = ") {
                written.push(dotted(&section, key.trim()));
            }
        }
        for key in keys() {
            assert!(
                written.contains(&key),
                "{key} is missing from deploy/config.example.toml"
            );
        }
    }
}
