//! Delivers queued commands (CONTRACT §9) to the devices whose session is on this node.
//!
//! Every [`POLL`] (or `node.poll_ms`) — and at once when the API or, through PostgreSQL's
//! `NOTIFY`, another node queues a command, or a session subscribes to commands — the worker reads the queued, unexpired commands of the devices that hold a
//! command subscription on this node's broker, claims each in the store (a conditional UPDATE:
//! only one node can win it), and hands it to the session, which publishes it and reports the
//! device's PUBACK. A delivered command is recorded `delivered`; one the session could not
//! get acknowledged (it ended first) goes back to `queued` for the next session. Queued
//! commands past their time to live become `expired`.
//!
//! The store is the only thing nodes share: a command queued through any node reaches the
//! device on whichever node holds it within a poll, with no messaging between nodes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tms_broker::{Broker, CommandOutcome, OutgoingCommand};
use tms_model::{DeviceSerial, SharedClock};
use tms_store::{CommandRecord, Store, StoreError};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

/// How often the store is asked for commands to deliver, unless `node.poll_ms` is set.
pub(crate) const POLL: Duration = Duration::from_millis(250);
/// How often queued commands past their time to live are expired.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);
/// A claim this old belongs to a node that died holding it (a live session reports within
/// its keep-alive): the command is queued again.
const STALE_CLAIM: Duration = Duration::from_secs(600);
/// How often stale claims are looked for.
const STALE_EVERY: Duration = Duration::from_secs(60);
/// Commands handed out per round at most.
const PER_ROUND: i64 = 500;

pub(crate) struct Delivery {
    store: Store,
    broker: Arc<Broker>,
    node_id: String,
    /// Notified by the API when it queues a command, and by the wake-up listener when any
    /// node queued one (PostgreSQL `NOTIFY`).
    queued: Arc<Notify>,
    /// How often the store is read when nothing woke the worker.
    poll: Duration,
    outcomes_tx: mpsc::UnboundedSender<CommandOutcome>,
    outcomes_rx: mpsc::UnboundedReceiver<CommandOutcome>,
    /// Outcomes the store could not take yet, written again next round.
    unwritten: Vec<CommandOutcome>,
    /// Stamps claims and decides which are stale.
    clock: SharedClock,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Delivery {
    pub(crate) fn new(
        store: Store,
        broker: Arc<Broker>,
        node_id: String,
        queued: Arc<Notify>,
        poll: Option<Duration>,
        clock: SharedClock,
    ) -> Self {
        let (outcomes_tx, outcomes_rx) = mpsc::unbounded_channel();
        Delivery {
            store,
            broker,
            node_id,
            queued,
            poll: poll.unwrap_or(POLL),
            outcomes_tx,
            outcomes_rx,
            unwritten: Vec::new(),
            clock,
        }
    }

    /// Runs until `stop`. Commands handed to sessions are reported back by the sessions as
    /// they end (the broker stops after this worker), and any claim left then is released at
    /// this node's next start.
    pub(crate) async fn run(mut self, stop: CancellationToken) {
        // Claims of an earlier run of this node: those sessions are gone.
        match self
            .store
            .release_stale_commands(&self.node_id, self.clock.now_ms() - millis(STALE_CLAIM))
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                commands = n,
                "queued again the commands an earlier run had claimed"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot release the claims of an earlier run"),
        }
        let subscribed = self.broker.command_wake();
        let mut last_expire = tokio::time::Instant::now() - EXPIRE_EVERY;
        let mut last_stale = tokio::time::Instant::now();
        loop {
            // Expiry keeps its own pace whatever the poll is; waking for it alone hands out
            // nothing (that is the poll's and the wake-ups' job).
            let expiry_only = tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.poll) => false,
                _ = self.queued.notified() => false,
                _ = subscribed.notified() => false,
                Some(outcome) = self.outcomes_rx.recv() => {
                    self.unwritten.push(outcome);
                    false
                }
                _ = tokio::time::sleep_until(last_expire + EXPIRE_EVERY) => true,
            };
            while let Ok(outcome) = self.outcomes_rx.try_recv() {
                self.unwritten.push(outcome);
            }
            self.write_outcomes().await;
            let now = self.clock.now_ms();
            if last_expire.elapsed() >= EXPIRE_EVERY {
                last_expire = tokio::time::Instant::now();
                match self.store.expire_commands(now).await {
                    Ok(0) => {}
                    Ok(n) => {
                        metrics::counter!("tms_commands_total", "outcome" => "expired")
                            .increment(n);
                        tracing::info!(commands = n, "commands expired undelivered");
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot expire commands"),
                }
            }
            if last_stale.elapsed() >= STALE_EVERY {
                last_stale = tokio::time::Instant::now();
                // No node id matches "": only claims older than the limit are released.
                match self
                    .store
                    .release_stale_commands("", now - millis(STALE_CLAIM))
                    .await
                {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::warn!(commands = n, "queued again commands whose claim went stale")
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot release stale command claims"),
                }
            }
            if expiry_only {
                continue;
            }
            if let Err(e) = self.hand_out(now).await {
                tracing::warn!(error = %e, "cannot read commands to deliver; retried next round");
            }
        }
    }

    /// Claims and hands to their sessions the queued commands of subscribed devices here.
    async fn hand_out(&mut self, now: i64) -> Result<(), StoreError> {
        let targets: HashMap<String, DeviceSerial> = self
            .broker
            .command_targets()
            .into_iter()
            .map(|s| (s.as_str().to_owned(), s))
            .collect();
        if targets.is_empty() {
            return Ok(());
        }
        let serials: Vec<String> = targets.keys().cloned().collect();
        let pending = self
            .store
            .pending_commands(&serials, now, PER_ROUND)
            .await?;
        for record in pending {
            let Some(serial) = targets.get(&record.serial) else {
                continue;
            };
            // Not subscribed to this command's topic, or its session is full: it waits.
            let Some(route) = self.broker.command_route(serial, &record.name) else {
                continue;
            };
            if !self
                .store
                .claim_command(&record.id, &self.node_id, now)
                .await?
            {
                continue; // another node (or an expiry) got there first
            }
            let command = self.outgoing(&record);
            if let Err(command) = route.send(command) {
                // The session ended between the look-up and now.
                self.unwritten
                    .push(CommandOutcome::Returned { id: command.id });
            } else {
                tracing::debug!(device.serial = %serial, command.id = %record.id, "command handed to the session");
            }
        }
        self.write_outcomes().await;
        Ok(())
    }

    fn outgoing(&self, record: &CommandRecord) -> OutgoingCommand {
        OutgoingCommand {
            id: record.id.clone(),
            name: record.name.clone(),
            payload: tms_registry::commands::payload(record).into(),
            outcome: self.outcomes_tx.clone(),
        }
    }

    /// Records what sessions reported; what the store refuses now is kept for next round.
    async fn write_outcomes(&mut self) {
        for outcome in std::mem::take(&mut self.unwritten) {
            let written = match &outcome {
                CommandOutcome::Delivered { id, at_ms } => self
                    .store
                    .command_delivered(id, &self.node_id, *at_ms)
                    .await
                    .map(|done| {
                        if done {
                            metrics::counter!("tms_commands_total", "outcome" => "delivered")
                                .increment(1);
                        }
                    }),
                CommandOutcome::Returned { id } => self
                    .store
                    .release_command(id, &self.node_id)
                    .await
                    .map(|_| {
                        metrics::counter!("tms_commands_total", "outcome" => "requeued")
                            .increment(1);
                    }),
            };
            if let Err(e) = written {
                tracing::warn!(error = %e, ?outcome, "cannot record a command's delivery; retried next round");
                self.unwritten.push(outcome);
            }
        }
    }
}
