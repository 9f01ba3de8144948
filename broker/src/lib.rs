//! The device-facing MQTT broker: our own TCP + rustls listener in front of rumqttd's router.
//!
//! rumqttd's own listener cannot bind a client id to the certificate, check revocation or
//! bound the handshake (see the router proof in `shared/reference`), so each connection runs
//! in its own task here: TLS handshake and CONNECT under one deadline, identity (certificate
//! CN = device serial = client id), topic ACL, keep-alive, and a rumqttd `LinkBuilder` link for
//! subscriptions and downlink. Device publishes do not pass through the router: they are
//! handed to ingest over a bounded queue and acknowledged (PUBACK, PUBREC) only once ingest
//! has committed them ([`Acks`]), so a PUBACK means the message is durable and a slow or
//! failing store pushes back on publishers instead of losing acknowledged messages.
//!
//! Commands to devices go the other way ([`downlink`]): the delivery worker asks
//! [`Broker::command_route`] for the live session of a device subscribed to the command's
//! topic and hands it the command; the session publishes it and reports the device's PUBACK.
//!
//! The broker reports what happens — connected, disconnected (with reason), refused (with
//! reason and the device its certificate named), message — as [`BrokerEvent`]s. It never
//! touches the database.

mod acl;
mod admission;
mod codec;
mod downlink;
mod io;
mod pump;
mod session;
mod tls;

pub use acl::{filter_matches, may_subscribe, publish_kind};
pub use admission::default_handshake_slots;
pub use downlink::{CommandOutcome, CommandRoute, OutgoingCommand};
// The vocabulary shared with ingest lives in `tms-model`; re-exported so the broker's API
// still names it.
pub use codec::decode_client_stream;
pub use tls::{RevokedSet, server_config};
pub use tms_model::{Acks, BrokerEvent, DeviceMessage, DisconnectReason, RefusalReason, TopicKind};

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::{Notification, Router, RouterConfig};
use rustls::ServerConfig;
use tms_model::DeviceSerial;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("building the TLS configuration")]
    Tls(#[source] rustls::Error),
    #[error("building the client certificate verifier: {0}")]
    Verifier(String),
    #[error("accepting connections on {addr}")]
    Accept {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Limits and identity of this broker.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    /// TLS handshakes in progress at once, at most; more wait their turn, oldest first
    /// ([`default_handshake_slots`] sizes it to the cores).
    pub handshake_slots: usize,
    /// Shared with ingest: no new handshake starts while the connects it has not committed
    /// fill it (see `tms_model::PresenceGate`).
    pub presence: Arc<tms_model::PresenceGate>,
    pub max_packet_bytes: usize,
    /// Fixed offline deadline; `None`: 1.5 × the device's keep-alive.
    pub offline_after: Option<Duration>,
    /// Names this gateway node in status records.
    pub node_id: String,
    /// Unique per process start; prefixes session ids.
    pub boot_id: String,
    /// Stamps events and refusals.
    pub clock: tms_model::SharedClock,
}

/// What [`Broker::try_emit`] did with an event.
pub(crate) enum Handed {
    Now,
    /// Ingest's queue is full: here is the event back.
    Full(BrokerEvent),
    /// Ingest is gone.
    Closed,
}

/// How another part closes a live session (revocation, takeover).
#[derive(Debug)]
pub(crate) struct SessionControl {
    pub session_id: Arc<str>,
    pub cert_serial: String,
    /// End of the certificate's validity, Unix seconds.
    pub cert_not_after: i64,
    pub close: CancellationToken,
    pub reason: Mutex<Option<DisconnectReason>>,
    /// Commands for this session ([`downlink`]).
    pub downlink: downlink::Inbox,
    /// The command filters the device holds in this session.
    pub subscriptions: Mutex<downlink::Subscriptions>,
}

impl SessionControl {
    pub(crate) fn close_with(&self, reason: DisconnectReason) {
        if let Ok(mut r) = self.reason.lock() {
            r.get_or_insert(reason);
        }
        self.close.cancel();
    }
}

pub(crate) struct LinkRequest {
    pub client_id: String,
    pub clean_session: bool,
}

/// rumqttd's `LinkError` is over 800 bytes (it embeds a router event): boxed to keep
/// `Result`s small.
type LinkResult = Result<(LinkTx, LinkRx, Notification), Box<LinkError>>;
type MakeLink = Box<dyn Fn(LinkRequest) -> LinkResult + Send + Sync>;

/// The broker. Build it with [`Broker::new`], then [`Broker::run`] it on a bound listener.
pub struct Broker {
    settings: BrokerSettings,
    tls: ArcSwap<ServerConfig>,
    events: mpsc::Sender<BrokerEvent>,
    make_link: MakeLink,
    sessions: Mutex<HashMap<DeviceSerial, Arc<SessionControl>>>,
    next_session: AtomicU64,
    permits: Arc<Semaphore>,
    admission: admission::Admission,
    refusal_log: LogBudget,
    /// Notified when a session subscribes to commands, so queued ones go out at once.
    command_wake: Arc<Notify>,
    /// Command filters of persistent sessions (clean session off) that ended: the router
    /// keeps such a session's subscriptions, so a device resuming it need not subscribe again.
    retained_subscriptions: Mutex<HashMap<DeviceSerial, downlink::Subscriptions>>,
}

/// Refusal log lines written per second at most: a flood of refused handshakes is counted
/// and recorded (coalesced) in the store, not written to the log line by line.
const REFUSAL_LOG_PER_SEC: u32 = 20;

/// How many refusal lines this second has written, and how many were held back since the
/// last one written.
#[derive(Default)]
struct LogBudget {
    second: AtomicU64,
    used: AtomicU32,
    held_back: AtomicU64,
}

impl LogBudget {
    /// `Some(lines held back before this one)` when this line may be written at `now_s`.
    fn admit(&self, now_s: u64) -> Option<u64> {
        let second = self.second.load(Ordering::Relaxed);
        if second != now_s
            && self
                .second
                .compare_exchange(second, now_s, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.used.store(0, Ordering::Relaxed);
        }
        if self.used.fetch_add(1, Ordering::Relaxed) < REFUSAL_LOG_PER_SEC {
            Some(self.held_back.swap(0, Ordering::Relaxed))
        } else {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

impl Broker {
    /// Starts rumqttd's router thread.
    pub fn new(
        settings: BrokerSettings,
        tls: Arc<ServerConfig>,
        events: mpsc::Sender<BrokerEvent>,
    ) -> Result<Arc<Broker>, BrokerError> {
        let router = Router::new(
            0,
            RouterConfig {
                // Our own semaphore is the real limit; the router must never refuse first,
                // because it refuses by not answering, which would hang `LinkBuilder::build`.
                max_connections: settings.max_connections + 16,
                max_outgoing_packet_count: 200,
                max_segment_size: 256 * 1024,
                max_segment_count: 4,
                custom_segment: None,
                initialized_filters: None,
                shared_subscriptions_strategy: Default::default(),
            },
        );
        let router_tx = router.spawn();
        let make_link: MakeLink = Box::new(move |req: LinkRequest| {
            LinkBuilder::new(&req.client_id, router_tx.clone())
                .clean_session(req.clean_session)
                .build()
                .map_err(Box::new)
        });
        let permits = Arc::new(Semaphore::new(settings.max_connections));
        let admission =
            admission::Admission::new(settings.handshake_slots, settings.presence.clone());
        Ok(Arc::new(Broker {
            settings,
            tls: ArcSwap::new(tls),
            events,
            make_link,
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            permits,
            admission,
            refusal_log: LogBudget::default(),
            command_wake: Arc::new(Notify::new()),
            retained_subscriptions: Mutex::new(HashMap::new()),
        }))
    }

    /// Accepts connections until `shutdown`; then closes every session (reason
    /// `server_shutdown`) and returns once all of them have reported their disconnect.
    pub async fn run(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), BrokerError> {
        let addr = listener
            .local_addr()
            .map_err(|source| BrokerError::Accept {
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                source,
            })?;
        let tracker = TaskTracker::new();
        let result = loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(pair) => pair,
                Err(e) if is_transient_accept_error(&e) => {
                    tracing::warn!(error = %e, "accept failed; continuing");
                    // Out of file descriptors: give the process a moment to release some.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(source) => break Err(BrokerError::Accept { addr, source }),
            };
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                metrics::counter!("tms_broker_connects_refused_total", "reason" => RefusalReason::ConnectionLimit.as_str()).increment(1);
                tracing::warn!(peer.addr = %peer, "connection limit reached; refusing");
                drop(tcp);
                continue;
            };
            // Without NODELAY the small post-handshake writes wait for delayed ACKs (~40 ms).
            let _ = tcp.set_nodelay(true);
            let broker = self.clone();
            let shutdown = shutdown.clone();
            tracker.spawn(async move {
                session::run(broker, tcp, peer, shutdown).await;
                drop(permit);
            });
        };
        drop(listener);
        tracker.close();
        tracker.wait().await;
        result
    }

    /// Replaces the TLS configuration used by new handshakes (server certificate renewal).
    pub fn set_tls(&self, config: Arc<ServerConfig>) {
        self.tls.store(config);
    }

    /// Closes live sessions whose certificate serial is in `serials`, with `reason`.
    /// Returns how many were closed.
    pub fn close_sessions_with_certs(
        &self,
        serials: &HashSet<String>,
        reason: DisconnectReason,
    ) -> usize {
        let Ok(sessions) = self.sessions.lock() else {
            return 0;
        };
        let mut closed = 0;
        for control in sessions
            .values()
            .filter(|c| serials.contains(&c.cert_serial))
        {
            control.close_with(reason);
            closed += 1;
        }
        closed
    }

    /// Closes the live session of the device `serial`, if there is one, with `reason`.
    pub fn close_device(&self, serial: &str, reason: DisconnectReason) -> bool {
        let Ok(sessions) = self.sessions.lock() else {
            return false;
        };
        match sessions.iter().find(|(s, _)| s.as_str() == serial) {
            Some((_, control)) => {
                control.close_with(reason);
                true
            }
            None => false,
        }
    }

    /// The id of the device's live session on this broker, if it has one.
    pub fn session_of(&self, serial: &str) -> Option<Arc<str>> {
        let sessions = self.sessions.lock().ok()?;
        sessions
            .iter()
            .find(|(s, _)| s.as_str() == serial)
            .map(|(_, control)| control.session_id.clone())
    }

    /// Closes the device's live session with `reason` only while it is `session_id`: a later
    /// session of the same device is not the one that was meant.
    pub fn close_session(&self, serial: &str, session_id: &str, reason: DisconnectReason) -> bool {
        let Ok(sessions) = self.sessions.lock() else {
            return false;
        };
        match sessions
            .iter()
            .find(|(s, c)| s.as_str() == serial && &*c.session_id == session_id)
        {
            Some((_, control)) => {
                control.close_with(reason);
                true
            }
            None => false,
        }
    }

    /// Closes every live session with `reason`; returns how many.
    pub fn close_all(&self, reason: DisconnectReason) -> usize {
        let Ok(sessions) = self.sessions.lock() else {
            return 0;
        };
        for control in sessions.values() {
            control.close_with(reason);
        }
        sessions.len()
    }

    /// Closes live sessions whose certificate validity ended (lease end, expiry): a session
    /// must not outlive the certificate that opened it. Returns how many were closed.
    pub fn close_expired(&self, now_unix: i64) -> usize {
        let Ok(sessions) = self.sessions.lock() else {
            return 0;
        };
        let mut closed = 0;
        for control in sessions.values().filter(|c| c.cert_not_after <= now_unix) {
            control.close_with(DisconnectReason::CertificateExpired);
            closed += 1;
        }
        closed
    }

    /// Notified whenever a session subscribes to commands.
    pub fn command_wake(&self) -> Arc<Notify> {
        self.command_wake.clone()
    }

    /// Devices with a live session here that holds at least one command filter.
    pub fn command_targets(&self) -> Vec<DeviceSerial> {
        let Ok(sessions) = self.sessions.lock() else {
            return Vec::new();
        };
        sessions
            .iter()
            .filter(|(_, c)| c.subscriptions.lock().is_ok_and(|s| !s.is_empty()))
            .map(|(serial, _)| serial.clone())
            .collect()
    }

    /// The live session of `serial` when it is subscribed to `tms/<serial>/cmd/<name>` and
    /// has room for another command; `None` otherwise (the command stays queued).
    pub fn command_route(&self, serial: &DeviceSerial, name: &str) -> Option<CommandRoute> {
        let sessions = self.sessions.lock().ok()?;
        let control = sessions.get(serial)?;
        let subscribed = control
            .subscriptions
            .lock()
            .ok()?
            .route(serial.as_str(), name)
            .is_some();
        (subscribed && control.downlink.has_room()).then(|| CommandRoute::new(control.clone()))
    }

    pub(crate) fn wake_commands(&self) {
        self.command_wake.notify_one();
    }

    /// The command filters a resumed persistent session holds (`session_present`), or none:
    /// a clean session starts without.
    pub(crate) fn resumed_subscriptions(
        &self,
        serial: &DeviceSerial,
        session_present: bool,
    ) -> downlink::Subscriptions {
        let Ok(mut retained) = self.retained_subscriptions.lock() else {
            return Default::default();
        };
        match retained.remove(serial) {
            Some(subs) if session_present => subs,
            _ => Default::default(),
        }
    }

    /// Keeps the command filters of a persistent session that ended, for its resumption.
    pub(crate) fn retain_subscriptions(
        &self,
        serial: &DeviceSerial,
        subs: downlink::Subscriptions,
    ) {
        if let Ok(mut retained) = self.retained_subscriptions.lock() {
            retained.insert(serial.clone(), subs);
        }
    }

    /// The node this broker records sessions (and command claims) under.
    pub fn node_id(&self) -> &str {
        &self.settings.node_id
    }

    pub(crate) fn settings(&self) -> &BrokerSettings {
        &self.settings
    }

    /// Now, by the broker's clock, in Unix ms.
    pub(crate) fn now_ms(&self) -> i64 {
        self.settings.clock.now_ms()
    }

    pub(crate) fn new_session_id(&self) -> Arc<str> {
        let n = self.next_session.fetch_add(1, Ordering::Relaxed);
        Arc::from(format!("{}-{n}", self.settings.boot_id))
    }

    /// Makes `control` the device's live session; an earlier one is closed as taken over.
    pub(crate) fn register(&self, serial: &DeviceSerial, control: Arc<SessionControl>) {
        let previous = match self.sessions.lock() {
            Ok(mut s) => s.insert(serial.clone(), control),
            Err(_) => None,
        };
        if let Some(previous) = previous {
            previous.close_with(DisconnectReason::TakenOver);
        }
    }

    pub(crate) fn deregister(&self, serial: &DeviceSerial, session_id: &Arc<str>) {
        if let Ok(mut s) = self.sessions.lock()
            && s.get(serial)
                .is_some_and(|c| Arc::ptr_eq(&c.session_id, session_id))
        {
            s.remove(serial);
        }
    }

    pub(crate) fn link(&self, req: LinkRequest) -> LinkResult {
        (self.make_link)(req)
    }

    /// Reports an event; waits while ingest's queue is full (back-pressure).
    pub(crate) async fn emit(&self, event: BrokerEvent) -> bool {
        self.events.send(event).await.is_ok()
    }

    /// Hands `event` to ingest if its queue has room now; when it is full, the event comes
    /// back to be handed over with [`Broker::emit`].
    pub(crate) fn try_emit(&self, event: BrokerEvent) -> Handed {
        match self.events.try_send(event) {
            Ok(()) => Handed::Now,
            Err(mpsc::error::TrySendError::Full(event)) => Handed::Full(event),
            Err(mpsc::error::TrySendError::Closed(_)) => Handed::Closed,
        }
    }

    /// Reports a refusal without waiting: refusals must stay cheap under a retry storm.
    pub(crate) fn emit_refusal(
        &self,
        common_name: Option<String>,
        peer: SocketAddr,
        reason: RefusalReason,
        detail: String,
    ) {
        metrics::counter!("tms_broker_connects_refused_total", "reason" => reason.as_str())
            .increment(1);
        // A CN that is a serial is filed under the serial's one spelling, where the device's
        // page looks for it.
        let common_name = common_name.map(|cn| match tms_model::DeviceSerial::parse(&cn) {
            Ok(serial) => serial.as_str().to_owned(),
            Err(_) => cn,
        });
        let at_ms = self.now_ms();
        match self
            .refusal_log
            .admit(u64::try_from(at_ms / 1000).unwrap_or(0))
        {
            Some(0) => {
                tracing::info!(device.serial = common_name.as_deref().unwrap_or("-"), peer.addr = %peer, reason = reason.as_str(), detail = %detail, "connection refused")
            }
            Some(held_back) => {
                tracing::info!(device.serial = common_name.as_deref().unwrap_or("-"), peer.addr = %peer, reason = reason.as_str(), detail = %detail, held_back, "connection refused (and {held_back} more since the last line, counted in tms_broker_connects_refused_total)")
            }
            None => {}
        }
        let event = BrokerEvent::Refused {
            common_name,
            peer,
            reason,
            detail,
            at_ms,
        };
        if self.events.try_send(event).is_err() {
            metrics::counter!("tms_broker_refusal_events_dropped_total").increment(1);
        }
    }
}

fn is_transient_accept_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) || matches!(e.raw_os_error(), Some(23 | 24)) // ENFILE, EMFILE
}

#[cfg(test)]
mod log_budget_tests {
    use super::{LogBudget, REFUSAL_LOG_PER_SEC};

    #[test]
    fn refusal_lines_are_bounded_per_second_and_the_rest_counted() {
        let b = LogBudget::default();
        let written = (0..1000).filter(|_| b.admit(7).is_some()).count();
        assert_eq!(written, REFUSAL_LOG_PER_SEC as usize);
        assert_eq!(
            b.admit(8),
            Some(1000 - u64::from(REFUSAL_LOG_PER_SEC)),
            "the next second says how many were held back"
        );
        assert_eq!(b.admit(8), Some(0));
    }
}
