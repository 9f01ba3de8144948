//! Ingest: broker events and device messages become batched store writes.
//!
//! Events arrive in order on one bounded queue (the broker waits while it is full, which is
//! what pushes back on publishers); connects found in it are batched first (`backlog`), so
//! a device is shown online without waiting behind the telemetry queued before it. [`Batcher`] turns them into a [`WriteBatch`] — parsing and
//! validating payloads, quarantining malformed ones, coalescing last-seen and refusals — and
//! [`Ingest::run`] commits whatever has queued up as one transaction (group commit) and then
//! releases the PUBACKs of the messages in it: a PUBACK means the message is durable.
//!
//! A commit that fails for a condition of the store (disk full, read-only, locked,
//! unreachable) is retried with backoff, with the PUBACKs withheld, until it succeeds; one
//! that fails because of its data is split in halves until the row the database refuses is
//! found and quarantined with the database's error, so one bad row never blocks good ones.
//! Not here: SQL (the store) or MQTT (the broker).

mod alarms;
mod backlog;
mod batcher;
mod payload;

pub use alarms::{AlarmEngine, AlarmSettings, severity};
pub use batcher::{
    ABUSE_ROWS_PER_MIN, Batcher, QUARANTINE_BYTES_PER_MIN, QUARANTINE_ROWS_PER_MIN, REFUSAL_WINDOW,
};
pub use payload::{
    LocationPayload, MAX_ALARM_CHARS, MAX_ALARMS, MAX_DEPTH, TelemetrySummary, clean_text,
    parse_info, parse_location, parse_reply, parse_status, parse_telemetry,
};

use std::sync::Arc;
use std::time::{Duration, Instant};

use tms_model::{Acks, BrokerEvent};
use tms_store::{AlarmChange, Split, Store, StoreError, StoreFault, WriteBatch};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use backlog::Backlog;

#[derive(Debug, Clone)]
pub struct IngestSettings {
    pub batch_max_rows: usize,
    /// How long a batch may wait for more events before it is committed. Zero (the default):
    /// commit at once what has queued; more queues while a commit runs, so batches grow
    /// with the load and the PUBACK latency stays one commit.
    pub flush_interval: Duration,
    /// Once draining starts, how long ingest keeps trying to write what is queued.
    pub drain_timeout: Duration,
    pub node_id: String,
    /// Thresholds of the alarms derived from telemetry.
    pub alarms: AlarmSettings,
    /// Times the commit for the presence latency metric.
    pub clock: tms_model::SharedClock,
    /// Shared with the broker: told of every connect committed and of the store's faults.
    pub presence: Arc<tms_model::PresenceGate>,
}

/// Called with the serial of a device that sends so much garbage it is to be disconnected.
pub type AbuseHook = Box<dyn Fn(&str) + Send + Sync>;

/// The ingest worker. Owns the receiving end of the broker's event queue.
pub struct Ingest {
    store: Store,
    rx: mpsc::Receiver<BrokerEvent>,
    settings: IngestSettings,
    on_abuse: Option<AbuseHook>,
    /// Cancelled when draining starts (the broker has stopped).
    drain: CancellationToken,
    /// Set when draining starts: writes stop being retried after this.
    give_up_at: Option<tokio::time::Instant>,
    /// Rows given up at shutdown (never acknowledged to a device).
    unwritten: usize,
    /// Open alarms (serial, code) read from the store at start.
    open_alarms: Vec<(String, String)>,
    /// Connect events in the batcher since the last flush, for the presence gate.
    connects: usize,
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

/// How far ingest looks into the queue for connects to write first, in batches: a storm's
/// queue is a few batches deep. The events it holds are off the broker's queue, so this
/// many more may wait in memory.
const LOOKAHEAD_BATCHES: usize = 4;

/// Longest pause between retries of a failing commit.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A commit that takes longer is treated as a store that stopped answering.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);
/// A commit still running after this opens the presence gate until it ends: a store that
/// stops answering without refusing (a network black hole) is a fault only after
/// [`COMMIT_TIMEOUT`], and until then the gate would hold every new device back (probed:
/// PostgreSQL behind a frozen proxy shed devices for 30 s). Healthy commits of a storm's
/// batches take a fraction of this.
const PRESENCE_STALL: Duration = Duration::from_secs(1);
/// A commit still running after this is told as a store that stopped answering (metric,
/// `/readyz`, log) while ingest keeps waiting for it up to [`COMMIT_TIMEOUT`]: an operator
/// learns of a black-holed database in seconds, not half a minute, and nothing is given up
/// that might still commit.
const STORE_SILENT: Duration = Duration::from_secs(5);

/// How writing a batch ended, once the store took writes.
enum Written {
    Stored,
    /// The database refused the batch's data.
    Refused(StoreError),
}

impl Ingest {
    pub fn new(store: Store, rx: mpsc::Receiver<BrokerEvent>, settings: IngestSettings) -> Self {
        Ingest {
            store,
            rx,
            settings,
            on_abuse: None,
            drain: CancellationToken::new(),
            give_up_at: None,
            unwritten: 0,
            open_alarms: Vec::new(),
            connects: 0,
        }
    }

    /// The alarms open in the store when ingest starts ([`Store::open_alarms`]): the engine
    /// starts from them, so a restart mid-outage raises nothing twice.
    pub fn with_open_alarms(mut self, open: Vec<(String, String)>) -> Self {
        self.open_alarms = open;
        self
    }

    /// Who to tell when a device sends more garbage than [`ABUSE_ROWS_PER_MIN`] a minute.
    pub fn on_abuse(mut self, hook: AbuseHook) -> Self {
        self.on_abuse = Some(hook);
        self
    }

    /// Runs until `drain` is cancelled (after the broker has stopped) and every queued event
    /// is committed or the drain deadline has passed, or until all senders are gone.
    pub async fn run(mut self, drain: CancellationToken) {
        self.drain = drain.clone();
        let mut batcher = Batcher::with_alarms(self.settings.node_id.clone(), self.settings.alarms);
        batcher
            .alarms
            .load(None, std::mem::take(&mut self.open_alarms));
        let mut draining = false;
        let mut backlog = Backlog::default();
        loop {
            if backlog.is_empty() {
                let due = batcher.next_due();
                let first = if draining {
                    self.rx.recv().await
                } else {
                    tokio::select! {
                        ev = self.rx.recv() => ev,
                        _ = drain.cancelled() => {
                            // No new events from now on; what is queued is still written.
                            self.rx.close();
                            draining = true;
                            self.start_deadline();
                            continue;
                        }
                        // Held-back refusals whose window has passed, while nothing else arrives.
                        _ = sleep_until_opt(due) => {
                            self.flush(&mut batcher, false).await;
                            continue;
                        }
                    }
                };
                let Some(first) = first else { break };
                backlog.push(first);
                let deadline = tokio::time::Instant::now() + self.settings.flush_interval;
                while backlog.len() < self.settings.batch_max_rows {
                    match self.rx.try_recv() {
                        Ok(ev) => {
                            backlog.push(ev);
                            continue;
                        }
                        Err(mpsc::error::TryRecvError::Disconnected) => break,
                        Err(mpsc::error::TryRecvError::Empty)
                            if draining || self.settings.flush_interval.is_zero() =>
                        {
                            break;
                        }
                        Err(mpsc::error::TryRecvError::Empty) => {}
                    }
                    match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                        Ok(Some(ev)) => backlog.push(ev),
                        Ok(None) | Err(_) => break,
                    }
                }
            }
            // Look past the next batch for connects queued behind messages.
            let lookahead = self
                .settings
                .batch_max_rows
                .saturating_mul(LOOKAHEAD_BATCHES);
            while backlog.len() < lookahead {
                match self.rx.try_recv() {
                    Ok(ev) => backlog.push(ev),
                    Err(_) => break,
                }
            }
            for ev in backlog.next(self.settings.batch_max_rows) {
                if matches!(ev, BrokerEvent::Connected { .. }) {
                    self.connects += 1;
                }
                batcher.add(ev);
            }
            metrics::gauge!("tms_ingest_queue_depth").set((self.rx.len() + backlog.len()) as f64);
            self.flush(&mut batcher, false).await;
        }
        // Everything still held back is written before ingest ends.
        self.flush(&mut batcher, true).await;
        if self.unwritten > 0 {
            tracing::error!(
                rows = self.unwritten,
                "shutdown deadline passed with the store failing: these rows were not written; none of them was acknowledged to a device"
            );
        }
        tracing::info!("ingest drained");
    }

    /// From the first call on, writes are retried only until the drain deadline.
    fn start_deadline(&mut self) {
        if self.give_up_at.is_none() {
            self.give_up_at = Some(tokio::time::Instant::now() + self.settings.drain_timeout);
        }
    }

    /// Commits what the batcher holds, then releases the PUBACKs of its messages.
    async fn flush(&mut self, batcher: &mut Batcher, all: bool) {
        let batch = batcher.take(Instant::now(), all);
        let acks = batcher.take_acks();
        if let Some(hook) = &self.on_abuse {
            for serial in batcher.take_abusive() {
                tracing::warn!(device.serial = %serial, "device sends malformed payloads faster than {ABUSE_ROWS_PER_MIN} a minute; disconnecting it (abuse)");
                hook(&serial);
            }
        }
        let connected: Vec<String> = batch
            .status
            .iter()
            .filter_map(|s| match s {
                tms_store::StatusEvent::Connected { serial, .. } => Some(serial.clone()),
                _ => None,
            })
            .collect();
        let mut written = Vec::new();
        let stored = self.commit(batch, &mut written).await;
        // Committed, or given up at the drain deadline: either way no longer in flight.
        self.settings
            .presence
            .committed(std::mem::take(&mut self.connects));
        metrics::gauge!("tms_presence_connects_uncommitted")
            .set(self.settings.presence.uncommitted() as f64);
        // Only what is committed is open from now on.
        batcher.alarms.committed(&written);
        if stored {
            release(acks);
            // Between batches, with no PUBACK waiting on it.
            self.store.restart_wal_if_due().await;
        }
        // Not after a batch given up at the drain deadline: the store is not answering, and
        // a read of it would hold ingest past the deadline, unlogged.
        if stored && !connected.is_empty() {
            // Another node may have raised or cleared this device's alarms while it was away.
            match self.store.open_alarms(Some(&connected)).await {
                Ok(open) => batcher.alarms.load(Some(&connected), open),
                Err(e) => {
                    tracing::warn!(error = %e, devices = connected.len(), "cannot reload the open alarms of connected devices; keeping those in memory")
                }
            }
        }
    }

    /// Writes one batch: retried while the store is at fault, split while its data is.
    /// False when it was given up at the drain deadline (nothing of it is acknowledged).
    async fn commit(&mut self, batch: WriteBatch, written: &mut Vec<AlarmChange>) -> bool {
        if batch.is_empty() {
            return true;
        }
        // Halves still to write, in order: a refused batch is replaced by its two halves.
        let mut work = vec![batch];
        while let Some(batch) = work.pop() {
            match self.write_with_retry(&batch).await {
                Some(Written::Stored) => written.extend(batch.alarms),
                Some(Written::Refused(e)) => {
                    let rows = batch.len();
                    match batch.split() {
                        Split::Halves(first, second) => {
                            tracing::warn!(error = %e, source = ?std::error::Error::source(&e), rows, "the database refused a batch; splitting it to find the row");
                            work.push(*second);
                            work.push(first);
                        }
                        Split::One(row) => self.set_aside(row, &e).await,
                    }
                }
                None => {
                    self.unwritten += batch.len() + work.iter().map(WriteBatch::len).sum::<usize>();
                    return false;
                }
            }
        }
        true
    }

    /// One row the database refuses: kept in quarantine with the database's error.
    async fn set_aside(&mut self, batch: WriteBatch, e: &StoreError) {
        let cause = std::error::Error::source(e)
            .map(ToString::to_string)
            .unwrap_or_else(|| e.to_string());
        metrics::counter!("tms_ingest_rows_refused_total").increment(1);
        let Some(row) = batch.clone().into_quarantine(&cause) else {
            tracing::error!(error = %e, source = %cause, batch = ?batch, "the database refused a status row; it is dropped");
            return;
        };
        tracing::warn!(device.serial = %row.serial, topic = %row.topic, source = %cause, "the database refused a row; quarantined");
        let quarantined = WriteBatch {
            quarantine: vec![row],
            ..WriteBatch::default()
        };
        match self.write_with_retry(&quarantined).await {
            Some(Written::Refused(e)) => {
                tracing::error!(error = %e, source = ?std::error::Error::source(&e), "the database refused the quarantine row too; it is dropped");
            }
            None => self.unwritten += 1,
            _ => {}
        }
    }

    /// Writes `batch`, retrying with backoff while the store is at fault. `None` when the
    /// drain deadline passed first.
    async fn write_with_retry(&mut self, batch: &WriteBatch) -> Option<Written> {
        let mut backoff = Duration::from_millis(50);
        loop {
            let written = match self.attempt(batch).await {
                Ok(()) => Written::Stored,
                Err(e) => match e.fault() {
                    None => Written::Refused(e),
                    Some(fault) => {
                        metrics::counter!("tms_ingest_write_errors_total", "fault" => fault.as_str())
                        .increment(1);
                        // Told once per cause (a silent store told first, then its error).
                        if self.store.write_fault() != Some(fault) {
                            tracing::error!(fault = fault.as_str(), error = %e, source = ?std::error::Error::source(&e), rows = batch.len(), "the store cannot take writes; PUBACKs are withheld until it can");
                        } else {
                            tracing::debug!(fault = fault.as_str(), error = %e, "store still failing");
                        }
                        self.set_write_fault(Some(fault));
                        if self.drain.is_cancelled() {
                            self.start_deadline();
                        }
                        let now = tokio::time::Instant::now();
                        if self.give_up_at.is_some_and(|t| now >= t) {
                            return None;
                        }
                        let wake = match self.give_up_at {
                            Some(t) => t.min(now + backoff),
                            None => now + backoff,
                        };
                        // Shutdown while waiting starts the drain deadline at once.
                        tokio::select! {
                            _ = tokio::time::sleep_until(wake) => {}
                            _ = self.drain.cancelled(), if self.give_up_at.is_none() => {}
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                },
            };
            if self.store.write_fault().is_some() {
                tracing::info!("the store takes writes again");
                self.set_write_fault(None);
            }
            return Some(written);
        }
    }

    /// Where a store fault is told, and cleared: the store (`/readyz`), the metric, and the
    /// presence gate (which stands open while the store cannot take writes).
    fn set_write_fault(&self, fault: Option<StoreFault>) {
        self.store.set_write_fault(fault);
        self.settings.presence.set_store_faulted(fault.is_some());
        metrics::gauge!("tms_store_write_failing").set(if fault.is_some() { 1.0 } else { 0.0 });
    }

    /// One write of `batch`, bounded in time (a store that stops answering is a fault). A
    /// write under way when the drain starts is bounded by the drain deadline too, which
    /// then starts: otherwise a hung commit would hold ingest for its whole timeout.
    async fn attempt(&mut self, batch: &WriteBatch) -> Result<(), StoreError> {
        let started = Instant::now();
        let limit = match self.give_up_at {
            Some(t) => COMMIT_TIMEOUT.min(t.saturating_duration_since(tokio::time::Instant::now())),
            None => COMMIT_TIMEOUT,
        };
        let drain_timeout = self.settings.drain_timeout;
        let drain = self.drain.clone();
        let drained_out = async move {
            drain.cancelled().await;
            let give_up_at = tokio::time::Instant::now() + drain_timeout;
            tokio::time::sleep_until(give_up_at).await;
            give_up_at
        };
        let timed_out = || StoreError::Timeout {
            op: "committing an ingest batch",
        };
        let write = tokio::time::timeout(limit, self.store.write_batch(batch));
        let stall = tokio::time::sleep(PRESENCE_STALL);
        let silent = tokio::time::sleep(STORE_SILENT);
        tokio::pin!(write, drained_out, stall, silent);
        let mut stalled = false;
        let mut told_silent = false;
        let result = loop {
            tokio::select! {
                result = &mut write => break result.unwrap_or_else(|_| Err(timed_out())),
                give_up_at = &mut drained_out, if self.give_up_at.is_none() => {
                    self.give_up_at = Some(give_up_at);
                    break Err(timed_out());
                }
                _ = &mut stall, if !stalled => {
                    stalled = true;
                    self.settings.presence.set_store_faulted(true);
                }
                _ = &mut silent, if !told_silent => {
                    told_silent = true;
                    if self.store.write_fault().is_none() {
                        tracing::error!(waited_secs = STORE_SILENT.as_secs(), rows = batch.len(), "the store has not answered a commit; PUBACKs are withheld until it does");
                        self.set_write_fault(Some(StoreFault::Unreachable));
                    }
                }
            }
        };
        if stalled {
            // A fault keeps it open: `write_with_retry` closes it once a write succeeds.
            let faulted = result.as_ref().err().and_then(StoreError::fault).is_some();
            self.settings.presence.set_store_faulted(faulted);
        }
        if result.is_ok() {
            record_commit(batch, started, self.settings.clock.now_ms());
        }
        result
    }
}

/// Metrics of a committed batch.
fn record_commit(batch: &WriteBatch, started: Instant, committed: i64) {
    let rows = batch.len();
    metrics::histogram!("tms_ingest_commit_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    metrics::histogram!("tms_ingest_batch_rows").record(rows as f64);
    // How long after CONNACK a device became visible as online in the store.
    for event in &batch.status {
        if let tms_store::StatusEvent::Connected { at, .. } = event {
            metrics::histogram!("tms_presence_online_latency_seconds")
                .record((committed - at).max(0) as f64 / 1000.0);
        }
    }
    metrics::counter!("tms_ingest_rows_written_total").increment(rows as u64);
    metrics::counter!("tms_ingest_refusal_writes_total").increment(batch.refusals.len() as u64);
}

fn release(acks: Vec<(Arc<Acks>, u64)>) {
    for (session, n) in acks {
        session.release(n);
    }
}
