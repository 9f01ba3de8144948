//! PostgreSQL `LISTEN/NOTIFY` as a wake-up for the nodes' polls (docs/cluster.md).
//!
//! A write that other nodes must act on (a change log entry, a revocation, a queued command)
//! also calls `pg_notify` in its own transaction, so the notification goes out when the write
//! commits and never before. Each node keeps one [`WakeupListener`] connection that turns
//! the notifications into [`tokio::sync::Notify`] permits for its pollers, which then read the
//! store at once instead of at their next tick.
//!
//! The store stays the truth: a notification carries no data, only which poller to wake, and
//! a lost one costs a poll interval, not an event. After the listener's connection drops, it
//! reconnects and wakes every poller once, since notifications sent while it was away are
//! gone. Not here: the polling itself (the gateway), and anything on SQLite (one node, no
//! one to wake) or on engines without `LISTEN/NOTIFY` (their poll interval is the latency).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::Notify;

use crate::{Backend, Result, Store, query_err};

/// The channel the nodes sharing a schema use: named after the schema (channels are per
/// database), so gateways on other schemas of the same database do not wake these. Cut to
/// stay below PostgreSQL's 63-byte limit on names; a clash would only wake a poll early.
macro_rules! channel {
    () => {
        "'tms_wakeup_' || left(COALESCE(current_schema(), ''), 48)"
    };
}

/// Which of a node's pollers a write concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wake {
    /// A change log entry (`cluster_events`).
    Changes,
    /// A certificate was revoked.
    Revocations,
    /// A command was queued, or queued again.
    Commands,
}

impl Wake {
    pub(crate) fn payload(self) -> &'static str {
        match self {
            Wake::Changes => "changes",
            Wake::Revocations => "revocations",
            Wake::Commands => "commands",
        }
    }
}

/// The pollers a [`WakeupListener`] wakes. Each is notified with `notify_one`, so a
/// notification that arrives while its poller is busy is kept for its next wait.
#[derive(Debug, Clone, Default)]
pub struct Wakeups {
    pub changes: Arc<Notify>,
    pub revocations: Arc<Notify>,
    pub commands: Arc<Notify>,
}

impl Wakeups {
    fn wake(&self, payload: &str) {
        match payload {
            "changes" => self.changes.notify_one(),
            "revocations" => self.revocations.notify_one(),
            "commands" => self.commands.notify_one(),
            // A newer node's payload: waking everyone is always safe.
            _ => self.wake_all(),
        }
    }

    fn wake_all(&self) {
        self.changes.notify_one();
        self.revocations.notify_one();
        self.commands.notify_one();
    }
}

/// Sends the wake-up whose payload is `$1`. `pg_notify` returns void, a type the Any driver
/// cannot carry: this selects a constant.
pub(crate) const NOTIFY_SQL: &str = concat!("SELECT 1 FROM pg_notify(", channel!(), ", $1)");

/// Sends the wake-up for `wake` inside the caller's transaction (PostgreSQL only; it is
/// delivered when that transaction commits, and dropped with it on rollback).
pub(crate) async fn notify<'c, E>(backend: Backend, conn: E, wake: Wake) -> Result<()>
where
    E: sqlx::Executor<'c, Database = sqlx::Any>,
{
    if backend != Backend::Postgres {
        return Ok(());
    }
    sqlx::query(NOTIFY_SQL)
        .bind(wake.payload())
        .execute(conn)
        .await
        .map_err(query_err("sending a wake-up to the other nodes"))?;
    Ok(())
}

/// The first wait after a failed connection; doubled per failure up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// One node's `LISTEN` connection (see the module header).
pub struct WakeupListener {
    options: PgConnectOptions,
    wakeups: Wakeups,
}

impl Store {
    /// The wake-up listener for this node, named `application_name` in `pg_stat_activity`;
    /// `None` on SQLite, where there is no other node to hear from.
    pub fn wakeup_listener(
        &self,
        application_name: &str,
        wakeups: Wakeups,
    ) -> Result<Option<WakeupListener>> {
        let Some(url) = self.url.as_deref() else {
            return Ok(None);
        };
        let options = PgConnectOptions::from_str(url)
            .map_err(crate::StoreError::Url)?
            .application_name(application_name);
        Ok(Some(WakeupListener { options, wakeups }))
    }
}

impl WakeupListener {
    /// Listens until dropped, reconnecting with backoff whenever the connection fails. Every
    /// (re)connection wakes all pollers once: what was notified while nobody listened is
    /// found by that read.
    pub async fn run(self) {
        let mut backoff = MIN_BACKOFF;
        loop {
            let mut listener = match self.connect().await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "cannot listen for wake-ups from the other nodes; polling only");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            tracing::debug!("listening for wake-ups from the other nodes");
            self.wakeups.wake_all();
            let connected = tokio::time::Instant::now();
            loop {
                match listener.try_recv().await {
                    Ok(Some(n)) => self.wakeups.wake(n.payload()),
                    // The connection dropped and sqlx made a new one, listening again
                    // before it returned: catch up on what was sent in between.
                    Ok(None) => {
                        tracing::info!("wake-up connection re-established; catching up");
                        self.wakeups.wake_all();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "wake-up connection failed; reconnecting");
                        break;
                    }
                }
            }
            // A connection that held a while earns a quick retry; one that keeps failing
            // at once waits longer each time.
            if connected.elapsed() >= MAX_BACKOFF {
                backoff = MIN_BACKOFF;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn connect(&self) -> Result<PgListener, sqlx::Error> {
        // One connection, kept as long as it works: it only waits for notifications.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .idle_timeout(None)
            .max_lifetime(None)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(self.options.clone())
            .await?;
        let mut listener = PgListener::connect_with(&pool).await?;
        let channel: String = sqlx::query_scalar(concat!("SELECT ", channel!()))
            .fetch_one(&mut listener)
            .await?;
        listener.listen(&channel).await?;
        Ok(listener)
    }
}
