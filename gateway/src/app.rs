//! Builds the parts from the configuration, runs them, and stops them in order:
//! listeners stop -> sessions report their disconnects -> ingest drains -> store closes.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tms_broker::{Broker, BrokerSettings, RevokedSet};
use tms_certs::Ca;
use tms_config::Config;
use tms_ingest::{Ingest, IngestSettings};
use tms_registry::mail::{Composer, Mailer};
use tms_registry::views::Views;
use tms_store::Store;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::node::NodeIdentity;
use crate::revocation;
use crate::supervisor::Parts;

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
    node_id: String,
    /// This process's start (Unix ms): the offline window of gateway-caused disconnects.
    started_at: i64,
}

/// The JSON views as the configuration's `presence.*` settings have them judge presence.
pub fn views(config: &Config) -> Views {
    Views {
        silent_after_intervals: config.presence.silent_after_intervals,
        rotation_overlap: config.certs.rotation_overlap,
    }
}

/// The configuration points where no gateway has run: the CLI creates nothing there
/// (a typo in a path must not start a second, empty fleet). Exit code 2.
#[derive(Debug, thiserror::Error)]
#[error(
    "no gateway data at {}; pass --config or TMS_DATA_DIR (`tms-gateway serve` or `tms-gateway init` creates it)",
    .0.display()
)]
pub struct NoGatewayData(pub PathBuf);

/// `path` made absolute against the current directory, for messages: a relative data
/// directory means a different one in every folder a command is run from.
pub fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

/// The database file of a `sqlite:` URL (`None` for other databases and in-memory ones).
fn sqlite_file(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or(rest);
    (!path.is_empty() && path != ":memory:").then(|| PathBuf::from(path))
}

/// Opens the store and loads the CA of a gateway that has run here before: what every
/// command but `serve` and `init` needs. Creates nothing; [`NoGatewayData`] when there is
/// no CA or no SQLite database where the configuration points.
pub async fn open_parts(config: &Config) -> Result<(Store, Arc<Ca>)> {
    let has_ca = config.data_dir.join("ca").join("ca.pem").is_file();
    let has_db = sqlite_file(&config.database_url).is_none_or(|f| f.is_file());
    if !has_ca || !has_db {
        return Err(NoGatewayData(absolute(&config.data_dir)).into());
    }
    create_parts(config).await
}

/// Opens the store and loads the CA, creating the data directory, the database and the CA
/// when they do not exist yet (first start).
pub async fn create_parts(config: &Config) -> Result<(Store, Arc<Ca>)> {
    create_private_dir(&config.data_dir)?;
    let store = Store::open(&config.database_url).await.with_context(|| {
        format!(
            "opening the store at {}",
            tms_config::redact_url(&config.database_url)
        )
    })?;
    let ca_dir = config.data_dir.join("ca");
    let passphrase = config.certs.ca_key_passphrase.clone();
    let (ca, created) = if store.backend() == tms_store::Backend::Postgres {
        // Nodes sharing the database share one CA (CONTRACT §6).
        let passphrase = passphrase.as_ref().map(|p| p.expose().to_owned());
        crate::cluster::shared_ca(&store, &ca_dir, passphrase, &known_node_id(config)).await?
    } else {
        tokio::task::spawn_blocking(move || {
            let passphrase = passphrase.as_ref().map(tms_config::Secret::expose);
            Ca::open(&ca_dir, OffsetDateTime::now_utc(), passphrase)
        })
        .await
        .context("CA task")?
        .context("loading the CA")?
    };
    if created {
        tracing::info!(fingerprint = %ca.info().sha256_fingerprint, "created a new CA");
    }
    Ok((store, Arc::new(ca)))
}

/// The exclusive hold of one `serve` on its data directory, for the life of the process:
/// a second `serve` there stops before it touches the database, the CA or any session.
/// The kernel releases it when the process ends, however it ends.
#[derive(Debug)]
pub struct DataDirLock {
    _file: std::fs::File,
}

/// Takes `<data_dir>/gateway.lock` (flock, exclusive, without waiting) and writes our pid
/// into it; fails naming the pid of the `serve` that holds it.
pub fn lock_data_dir(dir: &Path) -> Result<DataDirLock> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("gateway.lock");
    // Not truncated on open: the holder's pid must stay readable to whoever is refused.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", absolute(&path).display()))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
            let mut text = String::new();
            let holder = match file
                .read_to_string(&mut text)
                .map(|_| text.trim().parse::<u32>())
            {
                Ok(Ok(pid)) => format!("pid {pid}"),
                _ => "a process still starting".to_owned(),
            };
            bail!(
                "another tms-gateway serve ({holder}) is running on the data directory {}; \
                 stop it first, or give this one its own data_dir (--config or TMS_DATA_DIR)",
                absolute(dir).display()
            );
        }
        Err(e) => {
            return Err(std::io::Error::from(e))
                .with_context(|| format!("locking {}", absolute(&path).display()));
        }
    }
    file.set_len(0)
        .and_then(|()| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
        .with_context(|| format!("writing {}", absolute(&path).display()))?;
    Ok(DataDirLock { _file: file })
}

/// Creates the data directory mode 0700, and tightens one found looser: it holds the
/// database, the CA key and mails with temporary passwords.
fn create_private_dir(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating data directory {}", dir.display()))?;
    let mode = std::fs::metadata(dir)
        .with_context(|| format!("reading data directory {}", dir.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making data directory {} private", dir.display()))?;
    }
    Ok(())
}

/// This machine's host name, if it has one: the node id of versions before `node.id`.
pub(crate) fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
}

/// The node id as far as it is known without creating anything (for records only).
fn known_node_id(config: &Config) -> String {
    config
        .node
        .id
        .clone()
        .or_else(|| {
            std::fs::read_to_string(config.data_dir.join("node-id"))
                .ok()
                .map(|t| t.trim().to_owned())
        })
        .unwrap_or_else(|| "a command-line tool".to_owned())
}

impl App {
    pub async fn build(config: Config) -> Result<App> {
        tms_api::monitoring::install();
        crate::process_metrics::install();
        tms_api::monitoring::record_process(env!("CARGO_PKG_VERSION"), env!("TMS_GIT_COMMIT"));
        let started_at = tms_model::now_ms();
        // Before anything else is touched: another `serve` may be running on this data.
        create_private_dir(&config.data_dir)?;
        let lock = lock_data_dir(&config.data_dir)?;
        let (node_id, new_node_id) = crate::node::node_id(&config)?;
        let (store, ca) = create_parts(&config).await?;
        let node = crate::node::claim(&config, &store, &node_id).await?;
        metrics::gauge!("tms_node_info", "node" => node_id.clone()).set(1.0);
        // Present from the start, so dashboards and alerts find them before the first loss.
        metrics::counter!("tms_cluster_nodes_lost_total").increment(0);
        metrics::gauge!("tms_cluster_nodes", "state" => "alive").set(1.0);
        metrics::gauge!("tms_cluster_nodes", "state" => "dead").set(0.0);
        let now = OffsetDateTime::now_utc();
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
        let broker = Broker::new(
            BrokerSettings {
                max_connections: config.mqtt.max_connections,
                handshake_timeout: config.mqtt.handshake_timeout,
                max_packet_bytes: config.mqtt.max_packet_bytes,
                offline_after: config.presence.offline_after,
                node_id: node_id.clone(),
                boot_id,
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
            },
        )
        .with_open_alarms(open_alarms)
        .on_abuse(Box::new(move |serial| {
            abuse_broker.close_device(serial, tms_broker::DisconnectReason::Abuse);
        }));
        // From the change log's end as it is now, before this node records any connect.
        let follower = match store.backend() {
            tms_store::Backend::Postgres => Some(
                crate::cluster::Follower::start(store.clone(), broker.clone(), node_id.clone())
                    .await?,
            ),
            tms_store::Backend::Sqlite => None,
        };

        let mqtt = TcpListener::bind(config.mqtt.listen)
            .await
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
            .end_stale_sessions(&node_id, tms_model::now_ms(), "gateway_restart")
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
                .end_stale_sessions(&host, tms_model::now_ms(), "gateway_restart")
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
            node_id,
            started_at,
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

    /// Serves until `shutdown` is cancelled or a part fails, then stops everything in order.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let App {
            config,
            ports,
            store,
            ca,
            broker,
            revoked,
            ingest,
            mqtt,
            http,
            metrics,
            lock,
            node,
            follower,
            node_id,
            started_at,
        } = self;
        // Held until every part has stopped and the store is closed.
        let _lock = lock;
        let stop = shutdown.child_token();
        let drain = CancellationToken::new();
        let listening = Arc::new(AtomicBool::new(true));

        // Two sets, stopped in this order: everything that faces the outside and the
        // background duties, told by `stop`; then ingest, told by `drain` once every
        // session has reported its disconnect.
        let mut parts = Parts::new();
        let mut writer = Parts::new();
        let broker_stop = stop.clone();
        let broker_run = broker.clone();
        parts.spawn("broker", async move {
            Ok(broker_run.run(mqtt, broker_stop).await?)
        });
        let ingest_drain = drain.clone();
        writer.spawn("ingest", async move {
            ingest.run(ingest_drain).await;
            Ok(())
        });
        let mail_queued = Arc::new(Notify::new());
        let revocations_changed = Arc::new(Notify::new());
        let commands_queued = Arc::new(Notify::new());
        let public_url = config
            .http
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", ports.http));
        let mailer = Mailer::new(
            store.clone(),
            config.mail.outbox_dir.clone(),
            config.mail.smtp_url.as_deref(),
            config.mail.from.clone(),
            config.mail.retry_base,
            mail_queued.clone(),
        )
        .context("setting up mail delivery")?
        .with_lease_notices(Composer {
            from: config.mail.from.clone(),
            public_url: public_url.clone(),
        });
        let mailer_stop = stop.clone();
        parts.spawn("mailer", async move { Ok(mailer.run(mailer_stop).await?) });
        let notifier = tms_registry::alarms::Notifier::new(
            store.clone(),
            Composer {
                from: config.mail.from.clone(),
                public_url: public_url.clone(),
            },
            config.alarms.group,
            config
                .alarms
                .webhook_url
                .clone()
                .map(|url| tms_registry::alarms::Webhook {
                    url,
                    secret: config
                        .alarms
                        .webhook_secret
                        .as_ref()
                        .map(|s| s.expose().to_owned()),
                }),
            mail_queued.clone(),
            &node_id,
        );
        let notifier_stop = stop.clone();
        parts.spawn("alarm notifier", async move {
            notifier.run(notifier_stop).await;
            Ok(())
        });
        let offline = crate::offline_alarms::OfflineAlarms {
            store: store.clone(),
            offline_after: config.alarms.offline_after,
            started_at,
        };
        let offline_stop = stop.clone();
        parts.spawn("offline alarms", async move {
            // Single statements and reads: safe to drop half-way when the drain starts.
            until_stopped(&offline_stop, offline.run(offline_stop.clone())).await;
            Ok(())
        });
        let ca_for_certs = ca.clone();
        let state = tms_api::ApiState {
            store: store.clone(),
            ca,
            broker_listening: listening.clone(),
            mail: Composer {
                from: config.mail.from.clone(),
                public_url,
            },
            mail_queued,
            revocations_changed: revocations_changed.clone(),
            commands_queued: commands_queued.clone(),
            token_ttl: TOKEN_TTL,
            activation_ttl: ACTIVATION_TTL,
            map_tile_url: config.http.map_tile_url.clone(),
            mqtt_host: config.mqtt.public_host().to_owned(),
            passwords: tms_registry::auth::PasswordGate::for_this_machine(),
            views: views(&config),
            node_dead_after: config.node.dead_after,
        };
        let api = tms_api::router(state.clone(), metrics.is_none());
        let limits = tms_api::server::Limits {
            max_connections: config.http.max_connections,
            header_timeout: config.http.header_timeout,
            request_timeout: config.http.request_timeout,
        };
        let http_stop = stop.clone();
        parts.spawn("http", async move {
            tms_api::server::serve(http, api, limits, http_stop).await;
            Ok(())
        });
        if let Some(listener) = metrics {
            let metrics_stop = stop.clone();
            let router = tms_api::metrics_router(state);
            parts.spawn("metrics", async move {
                tms_api::server::serve(listener, router, limits, metrics_stop).await;
                Ok(())
            });
        }
        let server_cert = crate::server_cert::watch(
            ca_for_certs,
            config.data_dir.join("server"),
            config.mqtt.hostnames.clone(),
            revoked.clone(),
            broker.clone(),
            stop.clone(),
        );
        parts.spawn("server certificate", async move {
            server_cert.await;
            Ok(())
        });
        let process_metrics = crate::process_metrics::run(stop.clone());
        parts.spawn("process metrics", async move {
            process_metrics.await;
            Ok(())
        });
        // SQLite checkpoints beside the writers, never inside a commit (see Store::checkpoint).
        let checkpoint_store = store.clone();
        let checkpoint_stop = stop.clone();
        parts.spawn("checkpoint", async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            while tokio::select! {
                _ = checkpoint_stop.cancelled() => false,
                _ = tick.tick() => true,
            } {
                let checkpoint = until_stopped(&checkpoint_stop, checkpoint_store.checkpoint());
                if let Some(Err(e)) = checkpoint.await {
                    tracing::debug!(error = %e, "checkpoint failed; retried in a second");
                }
            }
            Ok(())
        });
        // PostgreSQL's NOTIFY wakes the pollers below as soon as another node writes.
        let wakeups = tms_store::Wakeups {
            changes: Arc::new(Notify::new()),
            revocations: revocations_changed.clone(),
            commands: commands_queued.clone(),
        };
        if let Some(listener) = store
            .wakeup_listener(&format!("tms-wakeup {node_id}"), wakeups.clone())
            .context("setting up the wake-up listener")?
        {
            let wakeup_stop = stop.clone();
            parts.spawn("wake-ups", async move {
                until_stopped(&wakeup_stop, listener.run()).await;
                Ok(())
            });
        }
        let revocation = revocation::watch(
            store.clone(),
            revoked,
            broker.clone(),
            revocations_changed,
            config.certs.rotation_overlap,
            config.presence.history_retention,
            config.node.poll,
            stop.clone(),
        );
        let heartbeat = crate::node::run(
            store.clone(),
            broker.clone(),
            node.clone(),
            config.node.heartbeat,
            config.node.dead_after,
            stop.clone(),
        );
        // Both may wait on a store that stopped answering; they must not hold up the drain.
        let heartbeat_stop = stop.clone();
        parts.spawn("heartbeat", async move {
            until_stopped(&heartbeat_stop, heartbeat)
                .await
                .unwrap_or(Ok(()))
        });
        if let Some(follower) = follower {
            let follower_stop = stop.clone();
            let follow = follower.run(stop.clone(), wakeups.changes.clone(), config.node.poll);
            parts.spawn("change log", async move {
                until_stopped(&follower_stop, follow)
                    .await
                    .unwrap_or(Ok(()))
            });
        }
        let revocation_stop = stop.clone();
        parts.spawn("revocation", async move {
            // Its reads and single-statement updates may be dropped half-way: a store that
            // has stopped answering must not hold up the drain, where ingest needs the time.
            until_stopped(&revocation_stop, revocation).await;
            Ok(())
        });

        let delivery = crate::commands::Delivery::new(
            store.clone(),
            broker.clone(),
            broker.node_id().to_owned(),
            commands_queued,
            config.node.poll,
        );
        let delivery_stop = stop.clone();
        parts.spawn("commands", async move {
            delivery.run(delivery_stop).await;
            Ok(())
        });

        // Serve until told to stop or until the first part ends. `biased`: on shutdown the
        // parts end too, and the shutdown branch must be seen first; a part that returns
        // after `stop` is cancelled has done as told (see `report_exit`).
        let stopping = || stop.is_cancelled();
        let mut failures = Vec::new();
        tokio::select! {
            biased;
            _ = stop.cancelled() => {}
            Some(exit) = parts.next(stopping) => failures.extend(exit.failure),
            Some(exit) = writer.next(stopping) => failures.extend(exit.failure),
        }
        stop.cancel();
        listening.store(false, Ordering::Relaxed);
        // One deadline for the whole drain: a part that talks to a store that no longer
        // answers must not hold the process past it.
        let deadline = Instant::now() + config.ingest.drain_timeout + DRAIN_GRACE;
        // Listeners close, sessions report their disconnects, the mailer finishes its send.
        let stopped = parts.wait_all(deadline, || true).await;
        failures.extend(stopped.into_iter().filter_map(|exit| exit.failure));
        // Every session has ended: commands this node claimed and no device acknowledged go
        // back to the queue now, for whichever node the device reconnects to.
        match tokio::time::timeout(STORE_CLOSE, store.release_stale_commands(&node.id, 0)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(commands = n, "queued again the commands sessions held"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot queue again the commands sessions held; the next start does")
            }
            Err(_) => tracing::warn!(
                "the store did not answer; the next start queues again the commands sessions held"
            ),
        }
        drop(broker);
        // Now write everything that is queued. Ingest gives up by itself at its drain
        // deadline while the store fails; the grace is for a store that does not answer.
        drain.cancel();
        let drained = writer.wait_all(deadline, || true).await;
        failures.extend(drained.into_iter().filter_map(|exit| exit.failure));
        // Every session has been recorded ended: no other node needs to declare this one lost.
        // Briefly: a store that does not answer has the others declare this node lost instead.
        let _ = tokio::time::timeout(LEAVE, crate::node::leave(&store, &node)).await;
        if tokio::time::timeout(STORE_CLOSE, store.close())
            .await
            .is_err()
        {
            tracing::error!("the store did not close within {STORE_CLOSE:?}; leaving it");
        }
        tracing::info!("stopped");
        match failures.into_iter().next() {
            Some(e) if !shutdown.is_cancelled() => Err(e),
            _ => Ok(()),
        }
    }
}

/// Runs `work` until it ends or `stop` is cancelled, whichever comes first.
async fn until_stopped<T>(stop: &CancellationToken, work: impl Future<Output = T>) -> Option<T> {
    tokio::select! {
        _ = stop.cancelled() => None,
        done = work => Some(done),
    }
}

/// How long past `ingest.drain_timeout_secs` the drain may take: ingest's own deadline runs
/// from when it is told to drain, after the listeners have stopped.
const DRAIN_GRACE: std::time::Duration = std::time::Duration::from_secs(1);
/// How long marking this node stopped may take at shutdown.
const LEAVE: std::time::Duration = std::time::Duration::from_millis(500);
/// How long the store's connections are given to close.
const STORE_CLOSE: std::time::Duration = std::time::Duration::from_secs(2);

fn write_ports(path: &Path, ports: &PortsFile) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string(ports).context("encoding ports.json")?;
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}
