//! From raw values (file and environment) to a typed `Config`: every key checked, every
//! error collected with the key (and the variable) that caused it.

use super::*;

/// A raw value before typing: TOML gives typed values, the environment gives strings.
#[derive(Debug, Clone)]
pub(crate) enum Raw {
    Toml(toml::Value),
    Env(String),
}

impl Raw {
    pub(crate) fn shown(&self) -> String {
        match self {
            Raw::Toml(toml::Value::String(s)) | Raw::Env(s) => s.clone(),
            Raw::Toml(v) => v.to_string(),
        }
    }
}

pub(crate) struct Builder {
    pub(crate) raw: BTreeMap<String, Raw>,
    pub(crate) errors: Vec<KeyError>,
    /// This machine's name, for the default `mqtt.hostnames`.
    pub(crate) host_name: Option<String>,
}

impl Builder {
    pub(crate) fn fail(&mut self, key: &str, value: String, problem: impl Into<String>) {
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

    pub(crate) fn string(&mut self, key: &str) -> Option<String> {
        let raw = self.raw.get(key)?.clone();
        match raw {
            Raw::Env(s) | Raw::Toml(toml::Value::String(s)) => Some(s),
            other => {
                self.fail(key, other.shown(), "expected a string");
                None
            }
        }
    }

    pub(crate) fn parsed<T>(
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

    pub(crate) fn int(&mut self, key: &str, default: u64, min: u64, max: u64) -> u64 {
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

    pub(crate) fn addr(&mut self, key: &str, default: SocketAddr) -> SocketAddr {
        self.parsed(key, default, parse_addr)
    }

    pub(crate) fn list(&mut self, key: &str) -> Option<Vec<String>> {
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

pub(crate) fn flatten_file(table: toml::Table, b: &mut Builder) {
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

pub(crate) fn build(b: &mut Builder) -> Config {
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

    let number = |b: &mut Builder, key: &str, default: f64, min: f64, max: f64| {
        b.parsed(key, default, |s| {
            let n: f64 = s.parse().map_err(|_| "expected a number".to_owned())?;
            if !(min..=max).contains(&n) {
                return Err(format!("must be between {min} and {max}"));
            }
            Ok(n)
        })
    };
    let low_battery_pct = number(b, "alarms.low_battery_pct", 20.0, 0.0, 100.0);
    let low_runtime_min = number(b, "alarms.low_runtime_min", 5.0, 0.0, 1440.0);
    // The HTTP client is built without TLS (no TLS stack beyond the broker's and SMTP's):
    // an https:// webhook would fail on every try, so it is refused here, by name.
    let webhook_url = b.string("alarms.webhook_url").and_then(|u| {
        if u.starts_with("http://") && u.len() > "http://".len() {
            Some(u)
        } else {
            b.fail(
                "alarms.webhook_url",
                redact_url(&u),
                "expected an http:// URL (https:// is not supported by this build; put a TLS proxy in front)",
            );
            None
        }
    });
    let alarms = Alarms {
        low_battery_pct,
        low_runtime_min,
        offline_after: Duration::from_secs(b.int("alarms.offline_after_secs", 300, 1, 30 * 86_400)),
        group: Duration::from_secs(b.int("alarms.group_secs", 60, 0, 86_400)),
        webhook_url,
        webhook_secret: b
            .string("alarms.webhook_secret")
            .filter(|s| !s.is_empty())
            .map(Secret),
    };

    let format = b.parsed("log.format", LogFormat::Text, |s| {
        match s.to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err("expected \"text\" or \"json\"".to_owned()),
        }
    });

    let node_id = b.string("node.id").and_then(|id| {
        if valid_node_id(&id) {
            Some(id)
        } else {
            b.fail(
                "node.id",
                id,
                "expected 1 to 64 letters, digits, '.', '_' or '-'",
            );
            None
        }
    });
    let heartbeat_secs = b.int("node.heartbeat_secs", 5, 1, 3600);
    let dead_after_secs = b.int("node.dead_after_secs", 15, 2, 86_400);
    let poll = b.parsed("node.poll_ms", None, |s| {
        let n: u64 = s
            .parse()
            .map_err(|_| "expected a whole number".to_owned())?;
        if !(10..=60_000).contains(&n) {
            return Err("must be between 10 and 60000".to_owned());
        }
        Ok(Some(Duration::from_millis(n)))
    });
    if dead_after_secs <= heartbeat_secs {
        b.fail(
            "node.dead_after_secs",
            dead_after_secs.to_string(),
            format!("must be longer than node.heartbeat_secs ({heartbeat_secs}), or every node looks dead between two heartbeats"),
        );
    }

    Config {
        log: Log { format },
        node: Node {
            id: node_id,
            heartbeat: Duration::from_secs(heartbeat_secs),
            dead_after: Duration::from_secs(dead_after_secs),
            poll,
        },
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
        alarms,
    }
}
