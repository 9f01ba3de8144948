//! Running the gateway through the real binary: a slow store pushes back on devices and loses
//! nothing acknowledged, metrics count exactly what happened, readiness follows the store,
//! `simulate` fills the fleet, the CA key can be kept encrypted. Stopping: tests/shutdown.rs.

mod support;

use std::time::Duration;

use rumqttc::{ConnectReturnCode, Event, Packet, QoS};
use support::proxy::Proxy;
use support::*;
use tms_model::ConnState;
use tms_store::Store;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_store_pushes_back_and_every_acknowledged_message_is_stored() {
    const DEVICES: usize = 4;
    const MESSAGES: usize = 300;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Provisioned before the first start: only `init` (or `serve`) creates a data directory.
    cli_in(&data, &["init"]);
    let mut devices = Vec::new();
    for i in 0..DEVICES {
        let serial = format!("RE4B{i:06}");
        cli_in(
            &data,
            &[
                "device",
                "add",
                "--serial",
                &serial,
                "--mac",
                &format!("02:00:00:00:01:{i:02X}"),
                "--company",
                "Acme",
            ],
        );
        let out = dir.path().join(&serial);
        cli_in(
            &data,
            &["device", "cert", &serial, "--out", out.to_str().unwrap()],
        );
        devices.push(DeviceFiles {
            key: out.join(format!("{serial}.key")),
            pem: out.join(format!("{serial}.pem")),
            ca: out.join("ca.pem"),
            serial,
        });
    }
    let env: std::collections::HashMap<String, String> = [
        ("TMS_DATA_DIR", data.to_str().unwrap()),
        ("TMS_MQTT_LISTEN", "127.0.0.1:0"),
        ("TMS_HTTP_LISTEN", "127.0.0.1:0"),
        // A queue far smaller than the burst, and a store that takes 100 ms per batch.
        ("TMS_INGEST_QUEUE_CAPACITY", "16"),
        ("TMS_INGEST_BATCH_MAX_ROWS", "50"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let config = tms_gateway::Config::from_sources(None, &env).unwrap();
    let app = tms_gateway::App::build(config).await.unwrap();
    app.store().set_write_delay(Duration::from_millis(100));
    let port = app.ports().mqtt.port();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(app.run(shutdown.clone()));

    let mut publishers = Vec::new();
    for files in devices.clone() {
        publishers.push(tokio::spawn(async move {
            let mut opts = rumqttc::MqttOptions::new(&files.serial, "localhost", port);
            opts.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(
                client_tls(&files.ca, Some((&files.pem, &files.key))),
            )));
            let (client, mut el) = rumqttc::AsyncClient::new(opts, 10);
            let serial = files.serial.clone();
            tokio::spawn(async move {
                for n in 0..MESSAGES {
                    let payload = format!(r#"{{"load_pct":{n}}}"#);
                    client
                        .publish(
                            format!("tms/{serial}/telemetry"),
                            QoS::AtLeastOnce,
                            false,
                            payload,
                        )
                        .await
                        .unwrap();
                }
            });
            let mut acked = 0;
            while acked < MESSAGES {
                match tokio::time::timeout(Duration::from_secs(60), el.poll()).await {
                    Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => panic!("{e}"),
                    Err(_) => panic!("no progress for 60 s after {acked} acks"),
                }
            }
            acked
        }));
    }
    let mut acked = 0;
    for p in publishers {
        acked += p.await.unwrap();
    }
    assert_eq!(acked, DEVICES * MESSAGES);
    // Stop right away: whatever was acknowledged but still queued must be written on drain.
    shutdown.cancel();
    running.await.unwrap().unwrap();
    let store = Store::open(&format!("sqlite://{}", data.join("tms.db").display()))
        .await
        .unwrap();
    for files in &devices {
        assert_eq!(
            store.telemetry_count(&files.serial).await.unwrap(),
            MESSAGES as i64,
            "{}",
            files.serial
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_what_a_scripted_session_did() {
    let gw = TestGateway::start().await;
    let files = gw.provision("RE4A000900", "00:1B:2C:3D:4E:90");
    let store = gw.store().await;
    let before = scrape(&gw).await;

    // A refused CONNECT (client id is not the CN).
    let (_c, mut el) = mqtt_client(
        &gw,
        "IMPOSTOR",
        client_tls(&files.ca, Some((&files.pem, &files.key))),
    );
    assert!(!matches!(
        connack(&mut el).await,
        Ok(ConnectReturnCode::Success)
    ));
    // A session: two good telemetry messages, one malformed, one location, then DISCONNECT.
    let (client, mut el) = device_client(&gw, &files);
    assert_eq!(connack(&mut el).await, Ok(ConnectReturnCode::Success));
    let driver = tokio::spawn(async move { while el.poll().await.is_ok() {} });
    publish(&client, "RE4A000900", "telemetry", TELEMETRY).await;
    publish(&client, "RE4A000900", "telemetry", TELEMETRY).await;
    publish(&client, "RE4A000900", "telemetry", "not json").await;
    publish(&client, "RE4A000900", "location", r#"{"lat": 1, "lon": 2}"#).await;
    wait_for("stored", Duration::from_secs(3), || async {
        (store.telemetry_count("RE4A000900").await.unwrap() == 2
            && store.location("RE4A000900").await.unwrap().is_some())
        .then_some(())
    })
    .await;
    client.disconnect().await.unwrap();
    driver.await.unwrap();
    wait_state(
        &store,
        "RE4A000900",
        ConnState::Offline,
        Duration::from_secs(2),
    )
    .await;

    let after = scrape(&gw).await;
    let d = |key: &str| delta(&before, &after, key);
    assert_eq!(d("tms_broker_connects_accepted_total"), 1.0);
    assert_eq!(
        d("tms_broker_connects_refused_total{reason=\"client_id_mismatch\"}"),
        1.0
    );
    assert_eq!(
        d("tms_broker_disconnects_total{reason=\"client_disconnect\"}"),
        1.0
    );
    assert_eq!(
        d("tms_broker_messages_received_total{kind=\"telemetry\"}"),
        3.0
    );
    assert_eq!(
        d("tms_broker_messages_received_total{kind=\"location\"}"),
        1.0
    );
    assert_eq!(
        d("tms_ingest_messages_total{kind=\"telemetry\",outcome=\"stored\"}"),
        2.0
    );
    assert_eq!(
        d("tms_ingest_messages_total{kind=\"telemetry\",outcome=\"quarantined\"}"),
        1.0
    );
    assert_eq!(
        d("tms_ingest_messages_total{kind=\"location\",outcome=\"stored\"}"),
        1.0
    );
    assert_eq!(after.get("tms_broker_connections").copied(), Some(0.0));
    assert!(d("tms_broker_bytes_received_total") > 0.0);
    assert!(d("tms_broker_handshake_duration_seconds_count") >= 2.0);
    assert_eq!(
        after
            .get("tms_devices{state=\"offline\"}")
            .copied()
            .unwrap_or(0.0)
            + after
                .get("tms_devices{state=\"never_connected\"}")
                .copied()
                .unwrap_or(0.0),
        1.0
    );

    // Every metric the shipped Grafana dashboard queries exists in a real scrape.
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/tms-gateway.json"
    ))
    .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let families: std::collections::HashSet<String> = after
        .keys()
        .map(|k| k.split('{').next().unwrap().to_owned())
        .collect();
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for name in expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("tms_"))
            {
                queried += 1;
                let family = name.to_owned();
                assert!(
                    families.contains(&family),
                    "dashboard queries {family}, which /metrics does not expose"
                );
            }
        }
    }
    assert!(queried > 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_while_the_store_is_unreachable_and_recovers() {
    use sqlx::{Connection, Executor};
    let Ok(base) = std::env::var("TMS_TEST_DATABASE_URL") else {
        skip("TMS_TEST_DATABASE_URL is not set: this test needs PostgreSQL (CI sets it)");
        return;
    };
    sqlx::any::install_default_drivers();
    let schema = format!("t_ready_{}", std::process::id());
    let mut conn = sqlx::AnyConnection::connect(&base).await.unwrap();
    conn.execute(format!("DROP SCHEMA IF EXISTS {schema} CASCADE").as_str())
        .await
        .unwrap();
    conn.execute(format!("CREATE SCHEMA {schema}").as_str())
        .await
        .unwrap();
    let upstream = base
        .split('@')
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), upstream.clone()).await;
    let via_proxy = base.replace(&upstream, &proxy.addr.to_string());
    let sep = if via_proxy.contains('?') { '&' } else { '?' };
    let url = format!("{via_proxy}{sep}options=-c%20search_path%3D{schema}");
    let gw = TestGateway::start_with(&[("TMS_DATABASE_URL", &url)]).await;
    let ready = gw.url("/readyz");
    let status = |url: String| async move {
        reqwest::get(url)
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    };
    assert_eq!(status(ready.clone()).await, 200);

    proxy.cut.cancel();
    wait_for(
        "readyz 503 with the store cut off",
        Duration::from_secs(10),
        || {
            let url = ready.clone();
            async move { (status(url).await == 503).then_some(()) }
        },
    )
    .await;
    assert_eq!(status(gw.url("/healthz")).await, 200, "alive all the same");

    let _back = Proxy::start(proxy.addr, upstream).await;
    wait_for("readyz 200 again", Duration::from_secs(15), || {
        let url = ready.clone();
        async move { (status(url).await == 200).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_connects_every_device_and_their_telemetry_is_stored() {
    let gw = TestGateway::start().await;
    let out = gw.cli_output(&[
        "simulate",
        "--devices",
        "20",
        "--interval",
        "0.2",
        "--duration",
        "3",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("20 connected"), "{stdout}");
    assert!(stdout.contains(" 0 errors"), "{stdout}");
    let store = gw.store().await;
    for i in 0..20 {
        let serial = format!("SIM{i:07}");
        assert!(
            store.telemetry_count(&serial).await.unwrap() >= 5,
            "{serial} stored too little telemetry"
        );
        // The simulator has exited; its devices' disconnects reach the store a batch later.
        let s = wait_state(&store, &serial, ConnState::Offline, Duration::from_secs(2)).await;
        assert_eq!(
            s.last_disconnect_reason.as_deref(),
            Some("client_disconnect")
        );
        assert_eq!(
            s.reported_status.as_deref(),
            Some("online"),
            "birth message stored"
        );
    }
}

/// Issue #17: `simulate --storm` lets every device dial at once and all of them come online;
/// it reports when the last had its CONNACK and that no connect timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_simulated_devices_all_come_online() {
    const DEVICES: usize = 8;
    let gw = TestGateway::start().await;
    let devices = DEVICES.to_string();
    let args = [
        "simulate",
        "--storm",
        "--devices",
        &devices,
        "--interval",
        "60",
        "--duration",
        "10",
    ];
    let sim = gw.cli_spawn(&args);
    let store = gw.store().await;
    let serials: Vec<String> = (0..DEVICES).map(|i| format!("SIM{i:07}")).collect();
    wait_for("every storm device online", Duration::from_secs(60), || {
        let (store, serials) = (store.clone(), serials.clone());
        async move {
            for serial in &serials {
                let device = store.device(serial).await.unwrap()?;
                if device.status.state != ConnState::Online {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;

    let out = tokio::task::spawn_blocking(move || sim.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&format!("{DEVICES} connected")), "{stdout}");
    // bench/storm.sh times the fleet's arrival from this line.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("storm: {DEVICES} devices released at 1")),
        "{stderr}"
    );
    let report: serde_json::Value = stdout
        .lines()
        .find_map(|l| l.strip_prefix("storm: "))
        .and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or_else(|| panic!("no storm report in {stdout}"));
    assert_eq!(report["devices"], DEVICES, "{report}");
    assert_eq!(report["connect_timeouts"], 0, "{report}");
    let all = report["all_connected_secs"].as_f64();
    assert!(all.is_some_and(|s| s < 10.0), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_have_a_listener_of_their_own() {
    let gw = TestGateway::start_with(&[("TMS_METRICS_LISTEN", "127.0.0.1:0")]).await;
    let metrics = gw
        .ports
        .metrics
        .expect("ports.json names the metrics listener");
    assert_ne!(metrics, gw.ports.http);
    let http = reqwest::Client::new();
    let scrape = http
        .get(format!("http://{metrics}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(scrape.status(), reqwest::StatusCode::OK);
    assert!(
        scrape
            .text()
            .await
            .unwrap()
            .contains("tms_broker_connections")
    );
    // The public HTTP listener no longer answers /metrics; the metrics one serves nothing else.
    let public = http.get(gw.url("/metrics")).send().await.unwrap();
    assert_eq!(public.status(), reqwest::StatusCode::NOT_FOUND);
    let other = http
        .get(format!("http://{metrics}/api/v1/devices"))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), reqwest::StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_key_kept_encrypted_with_a_passphrase() {
    let gw = TestGateway::start_with(&[("TMS_CA_KEY_PASSPHRASE", "long passphrase 1")]).await;
    let key = std::fs::read_to_string(gw.data_dir().join("ca/ca.key")).unwrap();
    assert!(key.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"));
    // The CLI, given the passphrase like the server, issues; the device connects with it.
    let files = gw.provision("RE4A000555", "00:1B:2C:3D:4E:55");
    let (_client, mut eventloop) = device_client(&gw, &files);
    assert_eq!(
        connack(&mut eventloop).await.unwrap(),
        ConnectReturnCode::Success
    );
    // Without the passphrase nothing can sign: the CLI stops and says what is missing.
    let out = std::process::Command::new(BIN)
        .env("TMS_DATA_DIR", gw.data_dir())
        .args(["device", "cert", "RE4A000555", "--out"])
        .arg(gw.dir.path().join("nope"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("TMS_CA_KEY_PASSPHRASE"), "{stderr}");
}
