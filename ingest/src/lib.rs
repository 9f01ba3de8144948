//! Ingest: broker events and device messages become batched store writes.
//!
//! Events arrive in order on one bounded queue (the broker waits while it is full, which is
//! what pushes back on publishers). [`Batcher`] turns them into a [`WriteBatch`] — parsing and
//! validating payloads, quarantining malformed ones, coalescing last-seen and refusals — and
//! [`Ingest::run`] commits a batch when it is full or a short time after its first event.
//! A failed commit is retried, never dropped. Not here: SQL (the store) or MQTT (the broker).

mod batcher;
mod payload;

pub use batcher::{Batcher, REFUSAL_WINDOW};
pub use payload::{LocationPayload, TelemetrySummary, parse_location, parse_telemetry};

use std::time::{Duration, Instant};

use tms_broker::BrokerEvent;
use tms_store::{Store, WriteBatch};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct IngestSettings {
    pub batch_max_rows: usize,
    pub flush_interval: Duration,
    pub node_id: String,
}

/// The ingest worker. Owns the receiving end of the broker's event queue.
pub struct Ingest {
    store: Store,
    rx: mpsc::Receiver<BrokerEvent>,
    settings: IngestSettings,
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

/// Longest pause between retries of a failing commit.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

impl Ingest {
    pub fn new(store: Store, rx: mpsc::Receiver<BrokerEvent>, settings: IngestSettings) -> Self {
        Ingest {
            store,
            rx,
            settings,
        }
    }

    /// Runs until `drain` is cancelled (after the broker has stopped) and every queued event
    /// is committed, or until all senders are gone.
    pub async fn run(mut self, drain: CancellationToken) {
        let mut batcher = Batcher::new(self.settings.node_id.clone());
        let mut draining = false;
        loop {
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
                        continue;
                    }
                    // Held-back refusals whose window has passed, while nothing else arrives.
                    _ = sleep_until_opt(due) => {
                        self.commit(batcher.take(Instant::now(), false)).await;
                        continue;
                    }
                }
            };
            let Some(first) = first else { break };
            batcher.add(first);
            let deadline = tokio::time::Instant::now() + self.settings.flush_interval;
            while batcher.len() < self.settings.batch_max_rows {
                match self.rx.try_recv() {
                    Ok(ev) => {
                        batcher.add(ev);
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                    Err(mpsc::error::TryRecvError::Empty) if draining => break,
                    Err(mpsc::error::TryRecvError::Empty) => {}
                }
                match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                    Ok(Some(ev)) => batcher.add(ev),
                    Ok(None) | Err(_) => break,
                }
            }
            metrics::gauge!("tms_ingest_queue_depth").set(self.rx.len() as f64);
            self.commit(batcher.take(Instant::now(), false)).await;
        }
        // Everything still held back is written before ingest ends.
        self.commit(batcher.take(Instant::now(), true)).await;
        tracing::info!("ingest drained");
    }

    /// Commits one batch, retrying with backoff until it is stored.
    async fn commit(&self, batch: WriteBatch) {
        if batch.is_empty() {
            return;
        }
        let rows = batch.len();
        let refusal_rows = batch.refusals.len();
        let mut backoff = Duration::from_millis(50);
        loop {
            let started = std::time::Instant::now();
            match self.store.write_batch(&batch).await {
                Ok(()) => {
                    metrics::histogram!("tms_ingest_commit_duration_seconds")
                        .record(started.elapsed().as_secs_f64());
                    metrics::histogram!("tms_ingest_batch_rows").record(rows as f64);
                    // How long after CONNACK a device became visible as online in the store.
                    let committed = tms_model::now_ms();
                    for event in &batch.status {
                        if let tms_store::StatusEvent::Connected { at, .. } = event {
                            metrics::histogram!("tms_presence_online_latency_seconds")
                                .record((committed - at).max(0) as f64 / 1000.0);
                        }
                    }
                    metrics::counter!("tms_ingest_rows_written_total").increment(rows as u64);
                    metrics::counter!("tms_ingest_refusal_writes_total")
                        .increment(refusal_rows as u64);
                    return;
                }
                Err(e) => {
                    metrics::counter!("tms_ingest_write_errors_total").increment(1);
                    tracing::error!(error = %e, source = ?std::error::Error::source(&e), rows, retry_in = ?backoff, "ingest commit failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}
