//! `tms-gateway simulate`: N simulated RemotEye 4 devices, each registered with its own
//! certificate, connecting over mutual TLS and publishing realistic UPS telemetry — a demo
//! for newcomers and a load generator. Each device reports a location of its own (spread over
//! Europe, the same in every run) once it is connected, so the demo map fills. Keys stay in
//! memory; nothing is written but the device registrations and certificate records a real
//! onboarding would leave.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
        mqtt.set_last_will(rumqttc::LastWill::new(
            format!("tms/{serial}/status"),
            "offline",
            QoS::AtLeastOnce,
            false,
        ));
        // The TLS name must be one the server certificate carries (mqtt.hostnames); the
        // port is the one the broker listens on.
        let (client, eventloop) = AsyncClient::new(mqtt, 64);
        tasks.spawn(device(
            index,
            serial,
            client,
            eventloop,
            opts.clone(),
            counters.clone(),
            stop.clone(),
        ));
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
    store.close().await;
    if connected < opts.devices as u64 {
        bail!("only {connected} of {} devices connected", opts.devices);
    }
    Ok(())
}

async fn device(
    index: usize,
    serial: DeviceSerial,
    client: AsyncClient,
    mut eventloop: rumqttc::EventLoop,
    opts: SimulateOptions,
    counters: Arc<Counters>,
    stop: CancellationToken,
) {
    let topic = format!("tms/{serial}/telemetry");
    // Spread the devices over one interval so they do not publish in lockstep.
    let offset = opts
        .interval
        .mul_f64(index as f64 / opts.devices.max(1) as f64);
    let started = tokio::time::Instant::now();
    let mut ticker = tokio::time::interval_at(started + offset, opts.interval);
    let mut n = 0u64;
    let mut connected = false;
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
                    counters.connected.fetch_add(1, Ordering::Relaxed);
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
                    if connected {
                        counters.connected.fetch_sub(1, Ordering::Relaxed);
                        connected = false;
                    }
                    tracing::warn!(device.serial = %serial, error = %e, "simulated device lost its connection; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
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
