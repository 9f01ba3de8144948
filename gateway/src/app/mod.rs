//! Start-up: builds every part from the configuration (data directory held, store and CA
//! open, broker, ingest and listeners bound, ports written), ready to serve. Running them
//! under one supervisor and stopping them in order is `run`'s.

mod run;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tms_broker::{Broker, BrokerSettings, RevokedSet};
use tms_certs::Ca;
use tms_config::Config;
use tms_ingest::{Ingest, IngestSettings};
use tms_model::{SharedClock, SystemClock};
use tms_registry::views::Views;
use tms_store::Store;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::data_dir::{
    DataDirLock, absolute, create_parts, create_private_dir, host_name, lock_data_dir,
};
use crate::node::NodeIdentity;
use crate::revocation;

/// Login tokens live this long; activation links this long.
const TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(12 * 3600);
const ACTIVATION_TTL: std::time::Duration = std::time::Duration::from_secs(48 * 3600);

/// `<data_dir>/ports.json`: where the listeners actually are (port 0 picks one).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PortsFile {
    pub mqtt: SocketAddr,
    pub http: SocketAddr,
    /// Only when `metrics.listen` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<SocketAddr>,
}

/// A fully built gateway, listening but not yet serving.
pub struct App {
    config: Config,
    store: Store,
    ca: Arc<Ca>,
    broker: Arc<Broker>,
    revoked: RevokedSet,
    ingest: Ingest,
    mqtt: TcpListener,
    http: TcpListener,
    metrics: Option<TcpListener>,
    ports: PortsFile,
    lock: DataDirLock,
    node: NodeIdentity,
    /// The change log follower; PostgreSQL only (one SQLite node has nobody to hear from).
    follower: Option<crate::cluster::Follower>,
    /// This process's start (Unix ms): the offline window of gateway-caused disconnects.
    started_at: i64,
    /// The one clock every part is handed.
    clock: SharedClock,
}

/// The JSON views as the configuration's `presence.*` settings have them judge presence.
pub fn views(config: &Config, clock: SharedClock) -> Views {
    Views {
        silent_after_intervals: config.presence.silent_after_intervals,
        rotation_overlap: config.certs.rotation_overlap,
        clock,
    }
}

impl App {
    /// Builds the gateway on the system clock.
    pub async fn build(config: Config) -> Result<App> {
        Self::build_with_clock(config, SystemClock::shared()).await
    }

    /// Builds the gateway on `clock`: every part that reads the time is handed it.
    pub async fn build_with_clock(config: Config, clock: SharedClock) -> Result<App> {
        tms_api::monitoring::install();
        crate::process_metrics::install();
        tms_api::monitoring::record_process(env!("CARGO_PKG_VERSION"), env!("TMS_GIT_COMMIT"));
        let started_at = clock.now_ms();
        // Before anything else is touched: another `serve` may be running on this data.
        create_private_dir(&config.data_dir)?;
        let lock = lock_data_dir(&config.data_dir)?;
        let (node_id, new_node_id) = crate::node::node_id(&config)?;
        let (store, ca) = create_parts(&config, &clock).await?;
        let node = crate::node::claim(&config, &store, &node_id, clock.now_ms()).await?;
        metrics::gauge!("tms_node_info", "node" => node_id.clone()).set(1.0);
        // Present from the start, so dashboards and alerts find them before the first loss.
        metrics::counter!("tms_cluster_nodes_lost_total").increment(0);
        metrics::gauge!("tms_cluster_nodes", "state" => "alive").set(1.0);
        metrics::gauge!("tms_cluster_nodes", "state" => "dead").set(0.0);
        let now = clock.now_utc();
        let (server, reissued) = ca
            .ensure_server_cert(&config.data_dir.join("server"), &config.mqtt.hostnames, now)
            .context("preparing the broker's server certificate")?;
        let names = tms_certs::certificate_names(&server.cert_pem).join(", ");
        if reissued {
            tracing::info!(names = %names, "issued the broker's server certificate; devices may connect by any of its names");
        } else {
            tracing::info!(names = %names, "server certificate; devices may connect by any of its names");
        }
        let chain =
            tms_certs::parse_certificates(&server.cert_pem).context("reading server.pem")?;
        let key = tms_certs::parse_private_key(&server.key_pem).context("reading server.key")?;

        let revoked: RevokedSet = Arc::new(ArcSwap::from_pointee(Default::default()));
        revocation::reload(&store, &revoked)
            .await
            .context("loading revocations")?;
        let tls = tms_broker::server_config(ca.cert_der(), chain, key, revoked.clone())
            .context("building the TLS configuration")?;

        let mut boot = [0u8; 4];
        rand::fill(&mut boot);
        let boot_id = hex::encode(boot);
        let (events_tx, events_rx) = mpsc::channel(config.ingest.queue_capacity);
        let presence = Arc::new(tms_model::PresenceGate::default());
        let broker = Broker::new(
            BrokerSettings {
                max_connections: config.mqtt.max_connections,
                handshake_timeout: config.mqtt.handshake_timeout,
                handshake_slots: tms_broker::default_handshake_slots(),
                presence: presence.clone(),
                max_packet_bytes: config.mqtt.max_packet_bytes,
                offline_after: config.presence.offline_after,
                node_id: node_id.clone(),
                boot_id,
                clock: clock.clone(),
            },
            tls,
            events_tx,
        )
        .context("starting the broker")?;
        let abuse_broker = broker.clone();
        let open_alarms = store
            .open_alarms(None)
            .await
            .context("loading the open alarms")?;
        let ingest = Ingest::new(
            store.clone(),
            events_rx,
            IngestSettings {
                batch_max_rows: config.ingest.batch_max_rows,
                flush_interval: config.ingest.flush_interval,
                drain_timeout: config.ingest.drain_timeout,
                node_id: node_id.clone(),
                alarms: tms_ingest::AlarmSettings {
                    low_battery_pct: config.alarms.low_battery_pct,
                    low_runtime_min: config.alarms.low_runtime_min,
                },
                clock: clock.clone(),
                presence,
            },
        )
        .with_open_alarms(open_alarms)
        .on_abuse(Box::new(move |serial| {
            abuse_broker.close_device(serial, tms_broker::DisconnectReason::Abuse);
        }));
        // From the change log's end as it is now, before this node records any connect.
        let follower = match store.backend() {
            tms_store::Backend::Postgres => Some(
                crate::cluster::Follower::start(
                    store.clone(),
                    broker.clone(),
                    node_id.clone(),
                    clock.clone(),
                )
                .await?,
            ),
            tms_store::Backend::Sqlite => None,
        };

        let mqtt = listen_for_devices(config.mqtt.listen)
            .with_context(|| format!("binding mqtt.listen {}", config.mqtt.listen))?;
        let http = TcpListener::bind(config.http.listen)
            .await
            .with_context(|| format!("binding http.listen {}", config.http.listen))?;
        let metrics = match config.metrics.listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding metrics.listen {addr}"))?,
            ),
            None => None,
        };
        let ports = PortsFile {
            mqtt: mqtt.local_addr().context("mqtt address")?,
            http: http.local_addr().context("http address")?,
            metrics: match &metrics {
                Some(l) => Some(l.local_addr().context("metrics address")?),
                None => None,
            },
        };
        // Only now, holding the data directory and both listeners, and before the broker
        // accepts anyone: sessions an earlier run of this node left "online" are over.
        let ended = store
            .end_stale_sessions(&node_id, clock.now_ms(), "gateway_restart")
            .await
            .context("ending sessions of an earlier run")?;
        if ended > 0 {
            tracing::info!(
                devices = ended,
                "marked devices of an earlier run offline (gateway_restart)"
            );
        }
        // The first start with a node id of its own, after versions that used the host
        // name: on SQLite (one node) the sessions under the host name are this data
        // directory's. On PostgreSQL they may be another node's, which its own start ends.
        if new_node_id
            && store.backend() == tms_store::Backend::Sqlite
            && let Some(host) = host_name()
        {
            store
                .end_stale_sessions(&host, clock.now_ms(), "gateway_restart")
                .await
                .context("ending sessions of an earlier run")?;
        }
        write_ports(&config.ports_file(), &ports)?;
        let data_dir = absolute(&config.data_dir);
        match ports.metrics {
            Some(metrics) => {
                tracing::info!(node = %node_id, mqtt = %ports.mqtt, http = %ports.http, metrics = %metrics, data_dir = %data_dir.display(), "listening")
            }
            None => {
                tracing::info!(node = %node_id, mqtt = %ports.mqtt, http = %ports.http, data_dir = %data_dir.display(), "listening")
            }
        }
        Ok(App {
            config,
            store,
            ca,
            broker,
            revoked,
            ingest,
            mqtt,
            http,
            metrics,
            ports,
            lock,
            node,
            follower,
            started_at,
            clock,
        })
    }

    pub fn ports(&self) -> &PortsFile {
        &self.ports
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn config(&self) -> &Config {
        &self.config
    }
}

fn write_ports(path: &Path, ports: &PortsFile) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string(ports).context("encoding ports.json")?;
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Connections the kernel queues for the MQTT listener before it accepts them (it caps this
/// at `net.core.somaxconn`, 4096 on Debian). A reconnect storm's SYNs arrive at once; past a
/// full queue they are dropped, and the device sends its SYN again after 1 s, then 3 s — time
/// lost from its connect time-out before the handshake starts. Tokio's `bind` queues 1,024:
/// in one `bench/storm.sh 10000` run, 88 devices that dialled at the release timed out at
/// 5 s together; with 4,096, none in two runs.
const MQTT_LISTEN_BACKLOG: u32 = 4096;

fn listen_for_devices(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restarted gateway rebinds at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(MQTT_LISTEN_BACKLOG)
}
