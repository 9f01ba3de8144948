//! Runs a built [`App`]: every long-running part goes into the supervisor ([`Parts`]) under
//! its name; the first to end unasked (error, panic, early return) is reported by that name
//! and stops the rest. Then the drain stops them in order, within one deadline
//! (`ingest.drain_timeout_secs` plus a grace): listeners and background duties -> sessions
//! report their disconnects -> ingest writes what is queued -> the store closes.
//! Building the parts is start-up's (`app/mod.rs`).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use tms_broker::Broker;
use tms_model::SharedClock;
use tms_registry::mail::{Composer, Mailer};
use tms_store::Store;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{ACTIVATION_TTL, App, TOKEN_TTL, views};
use crate::node::NodeIdentity;
use crate::revocation;
use crate::supervisor::Parts;

impl App {
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
            started_at,
            clock,
        } = self;
        let node_id = &node.id;
        // Held until every part has stopped and the store is closed.
        let _lock = lock;
        let stop = shutdown.child_token();
        let drain = CancellationToken::new();
        let listening = Arc::new(AtomicBool::new(true));

        // Three sets, all told by `stop` but ingest, which is told by `drain` once the broker
        // has stopped and every session has reported its disconnect: the broker is the only
        // part that feeds ingest, so ingest drains while the other parts stop.
        let mut front = Parts::new();
        let mut parts = Parts::new();
        let mut writer = Parts::new();
        let broker_stop = stop.clone();
        let broker_run = broker.clone();
        front.spawn("broker", async move {
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
            clock.clone(),
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
            node_id,
            clock.clone(),
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
            clock: clock.clone(),
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
            views: views(&config, clock.clone()),
            node_dead_after: config.node.dead_after,
            clock: clock.clone(),
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
            clock.clone(),
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
            // Every 100 ms under load, so each checkpoint's fsync covers a tenth of a second
            // of log, a short stall for the commits beside it (once a second it was a long
            // one); when few commits come, once a second at most (each is two fsyncs).
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last = tokio::time::Instant::now();
            while tokio::select! {
                _ = checkpoint_stop.cancelled() => false,
                _ = tick.tick() => true,
            } {
                let commits = checkpoint_store.commits_since_checkpoint();
                let due = commits >= 32
                    || (commits > 0 && last.elapsed() >= std::time::Duration::from_secs(1));
                if !due {
                    continue;
                }
                last = tokio::time::Instant::now();
                let checkpoint = until_stopped(&checkpoint_stop, checkpoint_store.checkpoint());
                if let Some(Err(e)) = checkpoint.await {
                    tracing::debug!(error = %e, "checkpoint failed; retried at the next tick");
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
            clock.clone(),
            stop.clone(),
        );
        let heartbeat = crate::node::run(
            store.clone(),
            broker.clone(),
            node.clone(),
            config.node.heartbeat,
            config.node.dead_after,
            clock.clone(),
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
            clock.clone(),
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
            Some(exit) = front.next(stopping) => failures.extend(exit.failure),
            Some(exit) = writer.next(stopping) => failures.extend(exit.failure),
        }
        stop.cancel();
        listening.store(false, Ordering::Relaxed);
        let deadline = Instant::now() + config.ingest.drain_timeout + DRAIN_GRACE;
        failures.extend(
            stop_in_order(
                [front, parts, writer],
                &drain,
                deadline,
                &store,
                &node,
                broker,
                &clock,
            )
            .await,
        );
        match failures.into_iter().next() {
            Some(e) if !shutdown.is_cancelled() => Err(e),
            _ => Ok(()),
        }
    }
}

/// Stops the parts in order, all by `deadline` (but for the store's own close): a part that
/// talks to a store that no longer answers must not hold the process past it. First the
/// broker (`front`): sessions end and report their disconnects. Then ingest (`writer`, told
/// by `drain`) writes what is queued while the other parts (`parts`, already told) finish,
/// the mailer its current send: waiting for them in turn would leave ingest no time when the
/// store hangs them. Then the store closes. Returns the failures of the parts that ended.
async fn stop_in_order(
    [mut front, mut parts, mut writer]: [Parts; 3],
    drain: &CancellationToken,
    deadline: Instant,
    store: &Store,
    node: &NodeIdentity,
    broker: Arc<Broker>,
    clock: &SharedClock,
) -> Vec<anyhow::Error> {
    let mut failures: Vec<anyhow::Error> = Vec::new();
    let mut keep = |exits: Vec<crate::supervisor::Exit>| {
        failures.extend(exits.into_iter().filter_map(|exit| exit.failure));
    };
    keep(front.wait_all(deadline, || true).await);
    drop(broker);
    // Ingest gives up by itself at its drain deadline while the store fails; the grace
    // is for a store that does not answer at all.
    drain.cancel();
    let others = async {
        let stopped = parts.wait_all(deadline, || true).await;
        // Every session has ended and delivery has stopped: commands this node claimed and
        // no device acknowledged go back to the queue, for whichever node the device
        // reconnects to.
        match tokio::time::timeout_at(deadline, store.release_stale_commands(&node.id, 0)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(commands = n, "queued again the commands sessions held"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot queue again the commands sessions held; the next start does")
            }
            Err(_) => tracing::warn!(
                "the store did not answer; the next start queues again the commands sessions held"
            ),
        }
        stopped
    };
    let (stopped, drained) = tokio::join!(others, writer.wait_all(deadline, || true));
    keep(stopped);
    keep(drained);
    // Every session has been recorded ended: no other node needs to declare this one lost.
    // Briefly: a store that does not answer has the others declare this node lost instead.
    let _ = tokio::time::timeout(LEAVE, crate::node::leave(store, node, clock.now_ms())).await;
    if tokio::time::timeout(STORE_CLOSE, store.close())
        .await
        .is_err()
    {
        tracing::error!("the store did not close within {STORE_CLOSE:?}; leaving it");
    }
    tracing::info!("stopped");
    failures
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
