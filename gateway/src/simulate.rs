//! `tms-gateway simulate`: N simulated RemotEye 4 devices, each registered with its own
//! certificate, connecting over mutual TLS and publishing realistic UPS telemetry — a demo
//! for newcomers and a load generator. Each device reports a location of its own (spread over
//! Europe, the same in every run) once it is connected, so the demo map fills. Keys stay in
//! memory; nothing is written but the device registrations and certificate records a real
//! onboarding would leave.
//!
//! With `--storm` the fleet behaves like one coming back after a power cut or a network
//! outage: every device dials at the same instant (after all are set up, none ahead of the
//! others), and a device that loses its connection or cannot connect waits a jittered,
//! growing back-off before it dials again, as real devices do, so the retries of a crowd do
//! not arrive in lockstep. It reports when the last device got its CONNACK and how many
//! connects timed out.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use tms_certs::DeviceKey;
use tms_config::Config;
use tms_model::{Clock, DeviceSerial, Mac, SharedClock, SystemClock};
use tms_registry::provisioning;
use tms_store::{DeviceDetails, NewDevice};
use tokio_util::sync::CancellationToken;

use crate::data_dir::open_parts;

/// What `simulate` is asked to do.
#[derive(Debug, Clone)]
pub struct SimulateOptions {
    pub devices: usize,
    pub interval: Duration,
    pub qos: QoS,
    /// Stop after this long; `None`: until Ctrl-C.
    pub duration: Option<Duration>,
    /// Broker address; `None`: from `<data_dir>/ports.json`, else `mqtt.listen`.
    pub mqtt: Option<SocketAddr>,
    /// A power cut on a share of the fleet, to show (and measure) the alarm flow.
    pub outage: Option<Outage>,
    /// Every device at once, reconnecting with a jittered back-off (`--storm`).
    pub storm: bool,
}

/// `--outage-after SECS --outage-share F --outage-secs SECS`: the first `share` of the devices
/// report `on_battery` (charge falling) from `after` for `length`, then `online` again.
#[derive(Debug, Clone, Copy)]
pub struct Outage {
    pub after: Duration,
    pub share: f64,
    pub length: Duration,
}

impl Outage {
    /// Whether device `index` of `devices` is on battery `elapsed` into the run.
    fn on_battery(&self, index: usize, devices: usize, elapsed: Duration) -> bool {
        let affected = (self.share * devices as f64).round() as usize;
        index < affected && elapsed >= self.after && elapsed < self.after + self.length
    }
}

#[derive(Default)]
struct Counters {
    connected: AtomicU64,
    published: AtomicU64,
    acked: AtomicU64,
    errors: AtomicU64,
    /// Connect attempts that got no CONNACK within the client's connection timeout.
    connect_timeouts: AtomicU64,
    /// Connections lost (or attempts failed) after which a device dialled again.
    reconnects: AtomicU64,
    /// Devices that have had a CONNACK at least once.
    first_connects: AtomicU64,
    /// When the devices were let go, and when the last of them first had its CONNACK.
    released: OnceLock<Instant>,
    all_connected: OnceLock<Instant>,
}

/// First wait of a storm device before it dials again; it doubles with each failure in a
/// row, up to [`STORM_MAX_BACKOFF`], and each wait is jittered ([`reconnect_delay`]).
const STORM_BACKOFF: Duration = Duration::from_secs(1);
const STORM_MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Without `--storm`, a device dials again after this fixed wait.
const RETRY: Duration = Duration::from_secs(1);
/// How long a device waits for its CONNACK (TCP, TLS and CONNECT) before it gives up.
const CONNECT_TIMEOUT_SECS: u64 = 5;

/// How long a device waits before it dials again after `failures` failures in a row (at
/// least 1). In a storm: [`STORM_BACKOFF`] × 2^(failures − 1), at most
/// [`STORM_MAX_BACKOFF`], times `jitter`, a random factor the caller draws from 0.5 to 1.5.
fn reconnect_delay(storm: bool, failures: u32, jitter: f64) -> Duration {
    if !storm {
        return RETRY;
    }
    let doublings = failures.saturating_sub(1).min(16);
    STORM_BACKOFF
        .saturating_mul(1 << doublings)
        .min(STORM_MAX_BACKOFF)
        .mul_f64(jitter.clamp(0.5, 1.5))
}

/// A realistic UPS reading: mostly online, load drifting, now and then on battery (or, with
/// an outage, on battery exactly when `outage` says).
fn telemetry(n: u64, device: usize, outage: Option<bool>, ts_ms: i64) -> String {
    let phase = (n as f64 / 10.0 + device as f64).sin();
    let on_battery = outage.unwrap_or((n + device as u64) % 97 == 0);
    let load = 35.0 + 20.0 * phase;
    let charge: f64 = if on_battery { 88.0 } else { 100.0 };
    serde_json::json!({
        "ts": ts_ms,
        "mode": if on_battery { "on_battery" } else { "online" },
        "load_pct": (load * 10.0).round() / 10.0,
        "battery": {"charge_pct": charge, "runtime_min": (charge * 0.4).round(), "voltage": 218.4, "temperature_c": 26.5},
        "input": {"voltage": if on_battery { 0.0 } else { 229.7 }, "frequency_hz": 50.0},
        "output": {"voltage": 230.0, "frequency_hz": 50.0, "current_a": (load * 0.35 * 10.0).round() / 10.0},
        "alarms": if on_battery { vec!["utility_failure"] } else { Vec::<&str>::new() },
    })
    .to_string()
}

/// Cities the simulated fleet is spread over (lat, lon): the demo map shows a fleet across
/// Europe, on land, instead of one dot or none.
const CITIES: [(f64, f64); 24] = [
    (52.52, 13.40), // Berlin
    (48.86, 2.35),  // Paris
    (51.51, -0.13), // London
    (40.42, -3.70), // Madrid
    (41.90, 12.50), // Rome
    (52.37, 4.90),  // Amsterdam
    (50.85, 4.35),  // Brussels
    (48.21, 16.37), // Vienna
    (50.08, 14.44), // Prague
    (52.23, 21.01), // Warsaw
    (47.50, 19.04), // Budapest
    (59.33, 18.07), // Stockholm
    (55.68, 12.57), // Copenhagen
    (59.91, 10.75), // Oslo
    (60.17, 24.94), // Helsinki
    (53.35, -6.26), // Dublin
    (38.72, -9.14), // Lisbon
    (37.98, 23.73), // Athens
    (44.43, 26.10), // Bucharest
    (47.37, 8.54),  // Zurich
    (45.46, 9.19),  // Milan
    (41.39, 2.17),  // Barcelona
    (53.55, 9.99),  // Hamburg
    (45.76, 4.84),  // Lyon
];

/// Where a simulated device is: one of [`CITIES`] and up to ±0.25° around it, both from a
/// hash of the serial, so a device is in the same place in every run.
fn location(serial: &DeviceSerial) -> serde_json::Value {
    // FNV-1a: stable across runs and Rust versions, unlike the std hasher.
    let hash = serial
        .as_str()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    let (lat, lon) = CITIES[(hash % CITIES.len() as u64) as usize];
    let jitter = |bits: u64| ((bits & 0xffff) as f64 / 65_535.0 - 0.5) * 0.5;
    let round = |x: f64| (x * 1e5).round() / 1e5;
    serde_json::json!({
        "lat": round(lat + jitter(hash >> 16)),
        "lon": round(lon + jitter(hash >> 32)),
        "accuracy_m": 50,
    })
}

fn broker_addr(config: &Config, explicit: Option<SocketAddr>) -> SocketAddr {
    if let Some(a) = explicit {
        return a;
    }
    let from_file = std::fs::read_to_string(config.ports_file())
        .ok()
        .and_then(|t| serde_json::from_str::<crate::PortsFile>(&t).ok())
        .map(|p| p.mqtt);
    let mut addr = from_file.unwrap_or(config.mqtt.listen);
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    addr
}

pub async fn run(
    config: Config,
    opts: SimulateOptions,
    clock: &SharedClock,
    stop: CancellationToken,
) -> Result<()> {
    if opts.devices == 0 {
        bail!("--devices must be at least 1");
    }
    let (store, ca) = open_parts(&config, clock).await?;
    let addr = broker_addr(&config, opts.mqtt);
    let host = config
        .mqtt
        .hostnames
        .first()
        .cloned()
        .unwrap_or_else(|| "localhost".into());
    eprintln!(
        "registering {} simulated devices and issuing their certificates…",
        opts.devices
    );
    let started = Instant::now();
    let mut identities = Vec::with_capacity(opts.devices);
    let now = clock.now_utc();
    for i in 0..opts.devices {
        let serial = DeviceSerial::parse(&format!("SIM{i:07}")).context("simulated serial")?;
        if store.device(serial.as_str()).await?.is_none() {
            let octets = u32::try_from(i).unwrap_or(u32::MAX).to_be_bytes();
            // 02:… is a locally administered unicast MAC: never a real card's.
            let mac = Mac::parse(&format!(
                "02:54:4D:{:02X}:{:02X}:{:02X}",
                octets[1], octets[2], octets[3]
            ))?;
            let lease = provisioning::leased("RemotEye 4".into(), now.date().to_string(), 12)
                .context("a lease from today")?;
            store
                .add_device(
                    &NewDevice {
                        serial: serial.clone(),
                        mac,
                        company: "Simulated devices".into(),
                        details: DeviceDetails {
                            ups_model: Some("1600XP".into()),
                            ups_model_number: Some("1600XP-18K".into()),
                            ups_serial: Some(format!("16{i:07}")),
                            ..lease
                        },
                    },
                    clock.now_ms(),
                )
                .await
                .with_context(|| format!("registering {serial}"))?;
        }
        let issued = provisioning::issue_device_certificate(
            &store,
            ca.clone(),
            &serial,
            DeviceKey::Generate,
            now,
        )
        .await
        .with_context(|| format!("issuing a certificate for {serial}"))?;
        identities.push((serial, issued));
    }
    eprintln!(
        "{} certificates in {:.1?}; connecting to {addr}",
        opts.devices,
        started.elapsed()
    );

    let counters = Arc::new(Counters::default());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der().clone()).context("CA certificate")?;
    let roots = Arc::new(roots);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tasks = tokio::task::JoinSet::new();
    // Cancelled once every device is set up; storm devices wait for it before they dial.
    let go = CancellationToken::new();
    for (index, (serial, issued)) in identities.into_iter().enumerate() {
        let chain = tms_certs::parse_certificates(&issued.certificate_pem)?;
        let key =
            tms_certs::parse_private_key(issued.private_key_pem.as_deref().unwrap_or_default())?;
        let tls = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain, key)?;
        let mut mqtt = MqttOptions::new(serial.as_str(), host.clone(), addr.port());
        mqtt.set_keep_alive(Duration::from_secs(30));
        mqtt.set_transport(Transport::Tls(TlsConfiguration::Rustls(Arc::new(tls))));
        let mut network = rumqttc::NetworkOptions::new();
        network.set_connection_timeout(CONNECT_TIMEOUT_SECS);
        mqtt.set_last_will(rumqttc::LastWill::new(
            format!("tms/{serial}/status"),
            "offline",
            QoS::AtLeastOnce,
            false,
        ));
        // The TLS name must be one the server certificate carries (mqtt.hostnames); the
        // port is the one the broker listens on.
        let (client, mut eventloop) = AsyncClient::new(mqtt, 64);
        eventloop.set_network_options(network);
        tasks.spawn(device(
            index,
            serial,
            client,
            eventloop,
            opts.clone(),
            counters.clone(),
            stop.clone(),
            go.clone(),
        ));
    }
    // Every device dials now: in a storm they were all held until this moment.
    let _ = counters.released.set(Instant::now());
    go.cancel();
    if opts.storm {
        // bench/storm.sh times the fleet's arrival from this line (Unix ms).
        eprintln!(
            "storm: {} devices released at {}",
            opts.devices,
            clock.now_ms()
        );
    }

    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let deadline = opts.duration.map(|d| tokio::time::Instant::now() + d);
    let run_started = Instant::now();
    let mut last_published = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let published = counters.published.load(Ordering::Relaxed);
        eprintln!(
            "connected {}/{}  published {}  acked {}  errors {}  {} msg/s",
            counters.connected.load(Ordering::Relaxed),
            opts.devices,
            published,
            counters.acked.load(Ordering::Relaxed),
            counters.errors.load(Ordering::Relaxed),
            published - last_published,
        );
        last_published = published;
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            stop.cancel();
            break;
        }
    }
    while tasks.join_next().await.is_some() {}
    let connected = counters.connected.load(Ordering::Relaxed);
    let errors = counters.errors.load(Ordering::Relaxed);
    println!(
        "simulated {} devices for {:.1?}: {connected} connected, {} messages published, {} acknowledged, {errors} errors",
        opts.devices,
        run_started.elapsed(),
        counters.published.load(Ordering::Relaxed),
        counters.acked.load(Ordering::Relaxed),
    );
    if opts.storm {
        println!("storm: {}", storm_report(&counters, opts.devices));
    }
    store.close().await;
    if connected < opts.devices as u64 {
        bail!("only {connected} of {} devices connected", opts.devices);
    }
    Ok(())
}

/// The storm's figures as one JSON object: `all_connected_secs` from the release of the
/// devices to the first CONNACK of the last of them (`null` if some never connected).
fn storm_report(counters: &Counters, devices: usize) -> serde_json::Value {
    let all = match (counters.released.get(), counters.all_connected.get()) {
        (Some(released), Some(all)) => {
            serde_json::json!(
                (all.duration_since(*released).as_secs_f64() * 1000.0).round() / 1000.0
            )
        }
        _ => serde_json::Value::Null,
    };
    serde_json::json!({
        "devices": devices,
        "all_connected_secs": all,
        "connect_timeouts": counters.connect_timeouts.load(Ordering::Relaxed),
        "reconnects": counters.reconnects.load(Ordering::Relaxed),
        "errors": counters.errors.load(Ordering::Relaxed),
    })
}

#[expect(
    clippy::too_many_arguments,
    reason = "one simulated device's parts, handed over once to its task"
)]
async fn device(
    index: usize,
    serial: DeviceSerial,
    client: AsyncClient,
    mut eventloop: rumqttc::EventLoop,
    opts: SimulateOptions,
    counters: Arc<Counters>,
    stop: CancellationToken,
    go: CancellationToken,
) {
    if opts.storm {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = go.cancelled() => {}
        }
    }
    let topic = format!("tms/{serial}/telemetry");
    // Spread the devices over one interval so they do not publish in lockstep.
    let offset = opts
        .interval
        .mul_f64(index as f64 / opts.devices.max(1) as f64);
    let started = tokio::time::Instant::now();
    let mut ticker = tokio::time::interval_at(started + offset, opts.interval);
    let mut n = 0u64;
    let mut connected = false;
    let mut ever_connected = false;
    // Failed attempts (or lost connections) in a row, for the storm's back-off.
    let mut failures = 0u32;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticker.tick(), if connected => {
                n += 1;
                // A simulated device stamps its readings by its own clock, as a real one does.
                let outage = opts.outage.map(|o| o.on_battery(index, opts.devices, started.elapsed()));
                if client.try_publish(topic.as_str(), opts.qos, false, telemetry(n, index, outage, SystemClock.now_ms())).is_ok() {
                    counters.published.fetch_add(1, Ordering::Relaxed);
                }
            }
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    connected = true;
                    failures = 0;
                    counters.connected.fetch_add(1, Ordering::Relaxed);
                    if !ever_connected {
                        ever_connected = true;
                        let first = counters.first_connects.fetch_add(1, Ordering::Relaxed) + 1;
                        if first == opts.devices as u64 {
                            let _ = counters.all_connected.set(Instant::now());
                        }
                    }
                    let info = serde_json::json!({"system_name": format!("1600XP 18kVA 16{index:07}"), "firmware": "RE4 2.1.0-sim"});
                    let place = location(&serial).to_string();
                    for (kind, payload) in [("status", "online".to_owned()), ("info", info.to_string()), ("location", place)] {
                        if client.try_publish(format!("tms/{serial}/{kind}"), QoS::AtLeastOnce, false, payload).is_ok() {
                            counters.published.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    counters.acked.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(e) => {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                    counters.reconnects.fetch_add(1, Ordering::Relaxed);
                    if !connected && is_timeout(&e) {
                        counters.connect_timeouts.fetch_add(1, Ordering::Relaxed);
                    }
                    if connected {
                        counters.connected.fetch_sub(1, Ordering::Relaxed);
                        connected = false;
                    }
                    failures = failures.saturating_add(1);
                    let wait = reconnect_delay(opts.storm, failures, rand::random_range(0.5..1.5));
                    tracing::warn!(device.serial = %serial, error = %e, retry_in = ?wait, "simulated device lost its connection; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }
    // A clean goodbye: DISCONNECT, and let the event loop send it.
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
}

/// Whether a failed connect ran out of time (the client's own timeout, or the system's).
fn is_timeout(e: &rumqttc::ConnectionError) -> bool {
    match e {
        rumqttc::ConnectionError::NetworkTimeout => true,
        rumqttc::ConnectionError::Io(io) => io.kind() == std::io::ErrorKind::TimedOut,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_puts_its_share_on_battery_for_its_length() {
        let o = Outage {
            after: Duration::from_secs(10),
            share: 0.3,
            length: Duration::from_secs(60),
        };
        let at = |secs| {
            (0..20)
                .filter(|&i| o.on_battery(i, 20, Duration::from_secs(secs)))
                .count()
        };
        assert_eq!((at(9), at(10), at(69), at(70)), (0, 6, 6, 0));
        let on: serde_json::Value = serde_json::from_str(&telemetry(1, 0, Some(true), 0)).unwrap();
        assert_eq!(on["mode"], "on_battery");
        let off: serde_json::Value =
            serde_json::from_str(&telemetry(97, 0, Some(false), 0)).unwrap();
        assert_eq!(off["mode"], "online", "no random blip during an outage run");
    }

    #[test]
    fn storm_devices_back_off_with_jitter_and_others_retry_each_second() {
        let secs = |failures, jitter| reconnect_delay(true, failures, jitter).as_secs_f64();
        assert_eq!((secs(1, 0.5), secs(1, 1.0), secs(1, 1.5)), (0.5, 1.0, 1.5));
        assert_eq!((secs(2, 1.0), secs(3, 1.0), secs(5, 1.0)), (2.0, 4.0, 16.0));
        assert_eq!((secs(6, 1.0), secs(40, 1.5)), (30.0, 45.0), "capped");
        assert_eq!(secs(1, 9.0), 1.5, "jitter is kept within 0.5-1.5");
        // Two devices failing together wait different times when their jitter differs.
        assert_ne!(secs(3, 0.7), secs(3, 1.3));
        assert_eq!(
            reconnect_delay(false, 7, 0.5),
            RETRY,
            "no back-off without --storm"
        );
    }

    #[test]
    fn each_device_has_its_own_place_in_europe_the_same_every_time() {
        let places: Vec<(f64, f64)> = (0..50)
            .map(|i| {
                let serial = DeviceSerial::parse(&format!("SIM{i:07}")).unwrap();
                let l = location(&serial);
                assert_eq!(l, location(&serial), "deterministic");
                (l["lat"].as_f64().unwrap(), l["lon"].as_f64().unwrap())
            })
            .collect();
        for &(lat, lon) in &places {
            assert!(
                (34.0..=62.0).contains(&lat) && (-10.0..=27.0).contains(&lon),
                "{lat},{lon}"
            );
        }
        let cities: std::collections::HashSet<_> = places
            .iter()
            .map(|&(lat, lon)| ((lat * 2.0).round() as i64, (lon * 2.0).round() as i64))
            .collect();
        assert!(cities.len() >= 12, "spread over the region: {cities:?}");
    }
}
