//! Configuration from files and the environment, as a user would set them.
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
    let file = "bogus = 1\n[mqtt]\nlisten = \"nowhere\"\nmax_connections = 0\ncolour = \"red\"\n";
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
    let c = Config::from_sources(None, &env(&[("TMS_CA_KEY_PASSPHRASE", "hunter2-x")])).unwrap();
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

#[test]
fn node_settings_default_to_the_contract_and_a_bad_id_is_named() {
    let c = Config::from_sources(None, &HashMap::new()).unwrap();
    assert_eq!(c.node.id, None);
    assert_eq!(c.node.heartbeat, Duration::from_secs(5));
    assert_eq!(c.node.dead_after, Duration::from_secs(15));

    let c = Config::from_sources(
        Some("[node]\nid = \"gw-1.eu_west\"\nheartbeat_secs = 1\ndead_after_secs = 3\n"),
        &HashMap::new(),
    )
    .unwrap();
    assert_eq!(c.node.id.as_deref(), Some("gw-1.eu_west"));
    assert_eq!(c.node.dead_after, Duration::from_secs(3));

    for bad in ["", "gw 1", "gw/1", &"x".repeat(65)] {
        let err = Config::from_sources(None, &env(&[("TMS_NODE_ID", bad)])).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("node.id") && text.contains("TMS_NODE_ID"),
            "{text}"
        );
    }
    let err = Config::from_sources(
        None,
        &env(&[
            ("TMS_NODE_HEARTBEAT_SECS", "5"),
            ("TMS_NODE_DEAD_AFTER_SECS", "5"),
        ]),
    )
    .unwrap_err();
    assert!(err.to_string().contains("node.dead_after_secs"), "{err}");

    // The safety-net poll: unset keeps each poller's own interval; out of range is named.
    assert_eq!(c.node.poll, None);
    let c = Config::from_sources(None, &env(&[("TMS_NODE_POLL_MS", "30000")])).unwrap();
    assert_eq!(c.node.poll, Some(Duration::from_secs(30)));
    for bad in ["0", "5", "60001", "soon"] {
        let err = Config::from_sources(None, &env(&[("TMS_NODE_POLL_MS", bad)])).unwrap_err();
        assert!(err.to_string().contains("node.poll_ms"), "{err}");
    }
}

#[test]
fn alarm_keys_are_typed_and_bad_values_named() {
    let c = Config::from_sources(
        Some("[alarms]\ngroup_secs = 5\nlow_battery_pct = 35.5\n"),
        &env(&[
            ("TMS_ALARMS_OFFLINE_AFTER_SECS", "42"),
            ("TMS_ALARMS_WEBHOOK_URL", "http://hooks.example/tms"),
            ("TMS_ALARMS_WEBHOOK_SECRET", "s3cret"),
        ]),
    )
    .unwrap();
    assert_eq!(c.alarms.group, Duration::from_secs(5));
    assert_eq!(c.alarms.low_battery_pct, 35.5);
    assert_eq!(c.alarms.low_runtime_min, 5.0);
    assert_eq!(c.alarms.offline_after, Duration::from_secs(42));
    assert_eq!(
        c.alarms.webhook_url.as_deref(),
        Some("http://hooks.example/tms")
    );
    assert!(
        !format!("{c:?}").contains("s3cret"),
        "the secret is redacted"
    );
    let err = Config::from_sources(
        Some("[alarms]\nlow_battery_pct = 120\nwebhook_url = \"https://x.example\"\n"),
        &HashMap::new(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("alarms.low_battery_pct"), "{err}");
    assert!(err.contains("alarms.webhook_url"), "{err}");
}
