//! Turns broker events into one [`WriteBatch`], coalescing what need not be written twice.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::Counter;
use tms_model::{Acks, BrokerEvent, DeviceMessage, TopicKind};
use tms_store::{
    AlarmChange, InfoRow, LocationRow, PeerRefusal, QuarantineRow, RefusalRow, ReplyRow,
    StatusEvent, TelemetryRow, WriteBatch,
};

use crate::alarms::{AlarmEngine, AlarmSettings, DEVICE_OFFLINE};
use crate::payload::{parse_info, parse_location, parse_reply, parse_status, parse_telemetry};

/// Collects events until [`Batcher::take`]. Pure: no I/O, so it can be tested alone.
pub struct Batcher {
    node_id: String,
    batch: WriteBatch,
    events: usize,
    /// Last message time per session: one last-seen update per batch, not per message.
    /// Keyed by session id (unique per connection): (device serial, time).
    seen: HashMap<Arc<str>, (String, i64)>,
    /// Telemetry per device in this batch: (first, last, count), for data freshness.
    fresh: HashMap<String, (i64, i64, i64)>,
    /// Refusals per (device or peer, reason), written at most once per [`REFUSAL_WINDOW`]: a
    /// device retrying in a tight loop costs one row update a second, not one per attempt.
    refusals: HashMap<(Refused, &'static str), PendingRefusal>,
    /// Messages whose PUBACK waits for this batch, per session: released after the commit.
    acks: HashMap<Arc<str>, (Arc<Acks>, u64)>,
    /// Malformed payloads kept per device in the current minute, so one device sending
    /// garbage cannot fill the disk.
    garbage: HashMap<String, Garbage>,
    /// Devices that sent more garbage than [`ABUSE_ROWS_PER_MIN`] since the last `take`.
    abusive: Vec<String>,
    /// Made on first use, after the metrics recorder is installed.
    counters: Option<KindCounters>,
    /// Open alarms per device; raises and clears go into the batch.
    pub(crate) alarms: AlarmEngine,
}

/// Malformed payloads of one device within one [`GARBAGE_WINDOW_MS`].
struct Garbage {
    window_start: i64,
    rows: u32,
    bytes: usize,
    dropped: u32,
    reported: bool,
}

/// Quarantine keeps at most this many malformed payloads (and bytes) per device per minute;
/// past that they are only counted (`tms_ingest_quarantine_dropped_total`).
pub const QUARANTINE_ROWS_PER_MIN: u32 = 100;
pub const QUARANTINE_BYTES_PER_MIN: usize = 1024 * 1024;
/// A device that sends this many malformed payloads in a minute is disconnected (`abuse`).
pub const ABUSE_ROWS_PER_MIN: u32 = 1000;
const GARBAGE_WINDOW_MS: i64 = 60_000;

/// `tms_ingest_messages_total` per outcome and kind (indexed by `TopicKind as usize`),
/// looked up once: a labelled lookup per message costs an allocation.
struct KindCounters {
    stored: [Counter; TopicKind::ALL.len()],
    quarantined: [Counter; TopicKind::ALL.len()],
}

impl KindCounters {
    fn new() -> Self {
        let by = |outcome: &'static str| {
            TopicKind::ALL.map(|k| {
                metrics::counter!("tms_ingest_messages_total", "kind" => k.as_str(), "outcome" => outcome)
            })
        };
        KindCounters {
            stored: by("stored"),
            quarantined: by("quarantined"),
        }
    }
}

/// Refusals of one device for one reason are written at most this often.
pub const REFUSAL_WINDOW: Duration = Duration::from_secs(1);

/// Whose refused attempts: a device's (the certificate was ours and named it), or those of
/// a peer address that named no device of ours.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Refused {
    Device(String),
    Peer(IpAddr),
}

struct PendingRefusal {
    /// Attempts since the last write; `attempts == 0` means nothing to write.
    row: RefusalRow,
    written_at: Option<Instant>,
}

impl Batcher {
    pub fn new(node_id: String) -> Self {
        Self::with_alarms(node_id, AlarmSettings::default())
    }

    /// A batcher whose alarm engine judges by `alarms`.
    pub fn with_alarms(node_id: String, alarms: AlarmSettings) -> Self {
        Self::with_engine(node_id, AlarmEngine::new(alarms))
    }

    /// The alarm engine, e.g. to load the alarms open in the store.
    pub fn alarm_engine(&mut self) -> &mut AlarmEngine {
        &mut self.alarms
    }

    /// A batcher that raises no alarms: only to measure what the engine costs.
    pub fn without_alarms(node_id: String) -> Self {
        Self::with_engine(node_id, AlarmEngine::disabled())
    }

    fn with_engine(node_id: String, alarms: AlarmEngine) -> Self {
        Batcher {
            alarms,
            node_id,
            batch: WriteBatch::default(),
            events: 0,
            seen: HashMap::new(),
            fresh: HashMap::new(),
            refusals: HashMap::new(),
            acks: HashMap::new(),
            garbage: HashMap::new(),
            abusive: Vec::new(),
            counters: None,
        }
    }

    /// The acknowledgements that the batch last returned by [`Batcher::take`] releases once
    /// it is committed: (session, how many of its messages).
    pub fn take_acks(&mut self) -> Vec<(Arc<Acks>, u64)> {
        self.acks.drain().map(|(_, v)| v).collect()
    }

    /// Devices to disconnect for sending garbage, since the last call.
    pub fn take_abusive(&mut self) -> Vec<String> {
        std::mem::take(&mut self.abusive)
    }

    fn counters(&mut self) -> &KindCounters {
        self.counters.get_or_insert_with(KindCounters::new)
    }

    /// Events added since the last `take`.
    pub fn len(&self) -> usize {
        self.events
    }

    pub fn is_empty(&self) -> bool {
        self.events == 0
    }

    pub fn add(&mut self, event: BrokerEvent) {
        self.events += 1;
        match event {
            BrokerEvent::Connected {
                serial,
                session_id,
                peer,
                cert_serial,
                keep_alive_secs,
                at_ms,
            } => {
                self.batch.status.push(StatusEvent::Connected {
                    serial: serial.to_string(),
                    session_id: session_id.to_string(),
                    at: at_ms,
                    peer_addr: peer.to_string(),
                    keep_alive_secs: i64::from(keep_alive_secs),
                    cert_serial,
                    node_id: self.node_id.clone(),
                });
                // Back online: a device_offline alarm (the timer's, on any node) ends here.
                self.batch.alarms.push(AlarmChange::Clear {
                    serial: serial.to_string(),
                    code: DEVICE_OFFLINE.to_owned(),
                    at: at_ms,
                });
            }
            BrokerEvent::Disconnected {
                serial,
                session_id,
                reason,
                at_ms,
            } => {
                self.flush_seen_of(serial.as_str(), &session_id);
                self.batch.status.push(StatusEvent::Disconnected {
                    serial: serial.to_string(),
                    session_id: session_id.to_string(),
                    at: at_ms,
                    reason: reason.as_str().to_owned(),
                });
            }
            BrokerEvent::Refused {
                common_name,
                peer,
                reason,
                detail,
                at_ms,
            } => {
                // Without a name of one of our devices, the attempts are the peer's.
                let who = match common_name {
                    Some(serial) => Refused::Device(serial),
                    None => Refused::Peer(peer.ip()),
                };
                let serial = match &who {
                    Refused::Device(serial) => serial.clone(),
                    Refused::Peer(ip) => ip.to_string(),
                };
                let pending = self
                    .refusals
                    .entry((who, reason.as_str()))
                    .or_insert_with(|| PendingRefusal {
                        row: RefusalRow {
                            serial,
                            reason: reason.as_str().to_owned(),
                            detail: String::new(),
                            peer_addr: None,
                            first_at: at_ms,
                            last_at: at_ms,
                            attempts: 0,
                        },
                        written_at: None,
                    });
                if pending.row.attempts == 0 {
                    pending.row.first_at = at_ms;
                }
                pending.row.attempts += 1;
                pending.row.last_at = at_ms;
                pending.row.detail = detail;
                pending.row.peer_addr = Some(peer.to_string());
            }
            BrokerEvent::Message(m) => self.add_message(m),
        }
    }

    fn add_message(&mut self, m: DeviceMessage) {
        let serial = m.serial.as_str();
        let at = m.received_at_ms;
        if let Some(ack) = &m.ack {
            match self.acks.get_mut(&*m.session_id) {
                Some(owed) => owed.1 += 1,
                None => {
                    self.acks.insert(m.session_id.clone(), (ack.clone(), 1));
                }
            }
        }
        match self.seen.get_mut(&*m.session_id) {
            Some(seen) => seen.1 = at,
            None => {
                self.seen
                    .insert(m.session_id.clone(), (serial.to_owned(), at));
            }
        }
        let outcome = match m.kind {
            TopicKind::Telemetry => parse_telemetry(&m.payload, at).map(|summary| {
                match self.fresh.get_mut(serial) {
                    Some(fresh) => {
                        fresh.1 = at;
                        fresh.2 += 1;
                    }
                    None => {
                        self.fresh.insert(serial.to_owned(), (at, at, 1));
                    }
                }
                self.alarms
                    .evaluate(serial, &summary, at, &mut self.batch.alarms);
                self.batch.telemetry.push(TelemetryRow {
                    serial: serial.to_owned(),
                    ts: summary.ts.unwrap_or(at),
                    received_at: at,
                    mode: summary.mode,
                    load_pct: summary.load_pct,
                    battery_charge_pct: summary.battery_charge_pct,
                    // Validated as a JSON object; stored exactly as the device sent it.
                    payload: String::from_utf8_lossy(&m.payload).into_owned(),
                });
            }),
            TopicKind::Location => parse_location(&m.payload).map(|l| {
                self.batch.locations.push(LocationRow {
                    serial: serial.to_owned(),
                    lat: l.lat,
                    lon: l.lon,
                    accuracy_m: l.accuracy_m,
                    source: "device".into(),
                    at,
                });
            }),
            TopicKind::Info => parse_info(&m.payload).map(|(system_name, firmware)| {
                self.batch.infos.push(InfoRow {
                    serial: serial.to_owned(),
                    system_name,
                    firmware,
                    payload: String::from_utf8_lossy(&m.payload).into_owned(),
                    at,
                });
            }),
            TopicKind::Status => parse_status(&m.payload).map(|text| {
                self.batch.status.push(StatusEvent::Reported {
                    serial: serial.to_owned(),
                    text,
                    at,
                });
            }),
            // Recorded only on a command sent to this same device (the store's UPDATE names
            // the serial): a device cannot answer for another.
            TopicKind::Reply => parse_reply(&m.payload).map(|(command_id, ok)| {
                self.batch.replies.push(ReplyRow {
                    serial: serial.to_owned(),
                    command_id,
                    ok,
                    payload: String::from_utf8_lossy(&m.payload).into_owned(),
                    at,
                });
            }),
        };
        match outcome {
            Ok(()) => self.counters().stored[m.kind as usize].increment(1),
            Err(error) => {
                if !self.may_quarantine(serial, m.payload.len(), at) {
                    return;
                }
                self.counters().quarantined[m.kind as usize].increment(1);
                tracing::warn!(device.serial = %serial, topic = m.kind.as_str(), %error, "malformed payload quarantined");
                self.batch.quarantine.push(QuarantineRow {
                    serial: serial.to_owned(),
                    topic: String::from_utf8_lossy(&m.topic).into_owned(),
                    payload: m.payload.to_vec(),
                    error,
                    received_at: at,
                });
            }
        }
    }

    /// Counts a malformed payload against its device's budget: true while it may be kept.
    fn may_quarantine(&mut self, serial: &str, bytes: usize, at: i64) -> bool {
        let g = match self.garbage.get_mut(serial) {
            Some(g) => g,
            None => self.garbage.entry(serial.to_owned()).or_insert(Garbage {
                window_start: at,
                rows: 0,
                bytes: 0,
                dropped: 0,
                reported: false,
            }),
        };
        if at - g.window_start >= GARBAGE_WINDOW_MS {
            *g = Garbage {
                window_start: at,
                rows: 0,
                bytes: 0,
                dropped: 0,
                reported: false,
            };
        }
        if g.rows < QUARANTINE_ROWS_PER_MIN && g.bytes + bytes <= QUARANTINE_BYTES_PER_MIN {
            g.rows += 1;
            g.bytes += bytes;
            return true;
        }
        g.dropped += 1;
        metrics::counter!("tms_ingest_quarantine_dropped_total").increment(1);
        if g.dropped == 1 {
            tracing::warn!(device.serial = %serial, kept = g.rows, "quarantine budget of this device used up for this minute; further malformed payloads are only counted");
        }
        if g.rows + g.dropped >= ABUSE_ROWS_PER_MIN && !g.reported {
            g.reported = true;
            self.abusive.push(serial.to_owned());
        }
        false
    }

    /// Writes the pending last-seen of a session before its disconnect, keeping order.
    fn flush_seen_of(&mut self, serial: &str, session_id: &Arc<str>) {
        if let Some((_, at)) = self.seen.remove(&**session_id) {
            self.batch.status.push(StatusEvent::Seen {
                serial: serial.to_owned(),
                session_id: session_id.to_string(),
                at,
            });
        }
    }

    /// The batch so far; the batcher starts empty again. Refusals are included when their
    /// window has passed (the first of a burst at once), or all of them with `all`.
    pub fn take(&mut self, now: Instant, all: bool) -> WriteBatch {
        for (session_id, (serial, at)) in self.seen.drain() {
            self.batch.status.push(StatusEvent::Seen {
                serial,
                session_id: session_id.to_string(),
                at,
            });
        }
        for (serial, (first_at, last_at, count)) in self.fresh.drain() {
            self.batch.status.push(StatusEvent::Telemetry {
                serial,
                first_at,
                last_at,
                count,
            });
        }
        for ((who, _), pending) in self.refusals.iter_mut() {
            let due = pending
                .written_at
                .is_none_or(|w| now.duration_since(w) >= REFUSAL_WINDOW);
            if pending.row.attempts > 0 && (all || due) {
                let row = pending.row.clone();
                match who {
                    Refused::Device(_) => self.batch.refusals.push(row),
                    Refused::Peer(_) => self.batch.peer_refusals.push(PeerRefusal {
                        peer_addr: row.peer_addr.unwrap_or_default(),
                        peer_ip: row.serial,
                        reason: row.reason,
                        detail: row.detail,
                        first_at: row.first_at,
                        last_at: row.last_at,
                        attempts: row.attempts,
                    }),
                }
                pending.row.attempts = 0;
                pending.written_at = Some(now);
            }
        }
        if let Some(latest) = self.garbage.values().map(|g| g.window_start).max() {
            self.garbage
                .retain(|_, g| latest - g.window_start < GARBAGE_WINDOW_MS);
        }
        // Forget quiet devices, so the map stays as small as the set of misbehaving ones.
        self.refusals.retain(|_, p| {
            p.row.attempts > 0
                || p.written_at
                    .is_some_and(|w| now.duration_since(w) < 10 * REFUSAL_WINDOW)
        });
        self.events = 0;
        self.alarms.batch_taken();
        std::mem::take(&mut self.batch)
    }

    /// When held-back refusals are due to be written, if any are.
    pub fn next_due(&self) -> Option<Instant> {
        self.refusals
            .values()
            .filter(|p| p.row.attempts > 0)
            .map(|p| {
                p.written_at
                    .map_or_else(Instant::now, |w| w + REFUSAL_WINDOW)
            })
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tms_model::DeviceSerial;
    use tms_model::RefusalReason;

    fn msg(kind: TopicKind, payload: &'static str, at: i64) -> BrokerEvent {
        BrokerEvent::Message(DeviceMessage {
            serial: DeviceSerial::parse("RE4A1").unwrap(),
            session_id: Arc::from("b-1"),
            kind,
            topic: Bytes::from_static(b"tms/RE4A1/x"),
            payload: Bytes::from_static(payload.as_bytes()),
            received_at_ms: at,
            ack: None,
        })
    }

    #[test]
    fn malformed_payloads_are_quarantined_and_good_ones_stored() {
        let mut b = Batcher::new("n1".into());
        b.add(msg(TopicKind::Telemetry, "{broken", 1));
        b.add(msg(
            TopicKind::Telemetry,
            r#"{"load_pct": 12, "vendor_x": 1}"#,
            2,
        ));
        b.add(msg(TopicKind::Location, r#"{"lat": 10, "lon": 20}"#, 3));
        b.add(msg(TopicKind::Status, "offline", 4));
        let batch = b.take(Instant::now(), false);
        assert_eq!(batch.quarantine.len(), 1);
        assert_eq!(batch.telemetry.len(), 1);
        assert_eq!(
            batch.telemetry[0].payload, r#"{"load_pct": 12, "vendor_x": 1}"#,
            "kept as sent, unknown fields too"
        );
        assert_eq!(
            batch.telemetry[0].ts, 2,
            "no ts in the payload: receive time"
        );
        assert_eq!(batch.locations.len(), 1);
        let seen: Vec<_> = batch
            .status
            .iter()
            .filter(|s| matches!(s, StatusEvent::Seen { .. }))
            .collect();
        assert_eq!(seen.len(), 1, "one last-seen per session per batch");
        let fresh: Vec<_> = batch
            .status
            .iter()
            .filter(|s| matches!(s, StatusEvent::Telemetry { .. }))
            .collect();
        assert!(
            matches!(
                fresh[..],
                [StatusEvent::Telemetry {
                    count: 1,
                    last_at: 2,
                    ..
                }]
            ),
            "{fresh:?}"
        );
        assert!(b.take(Instant::now(), false).is_empty());
    }

    #[test]
    fn a_retry_storm_becomes_one_refusal_row_per_window() {
        let mut b = Batcher::new("n1".into());
        let t0 = Instant::now();
        let refused = |at_ms| BrokerEvent::Refused {
            common_name: Some("RE4A1".into()),
            peer: "10.0.0.1:1".parse().unwrap(),
            reason: RefusalReason::Expired,
            detail: "expired".into(),
            at_ms,
        };
        // The first refusal is written at once, so the operator sees it immediately.
        b.add(refused(0));
        assert_eq!(b.take(t0, false).refusals.len(), 1);
        // The storm that follows within the window is held back and counted...
        for i in 1..=999 {
            b.add(refused(i));
            assert!(
                b.take(t0 + Duration::from_millis(i as u64 / 2), false)
                    .refusals
                    .is_empty()
            );
        }
        assert_eq!(b.next_due(), Some(t0 + REFUSAL_WINDOW));
        // ...and written as one row when the window ends.
        let batch = b.take(t0 + REFUSAL_WINDOW, false);
        assert_eq!(batch.refusals.len(), 1);
        assert_eq!(
            (
                batch.refusals[0].attempts,
                batch.refusals[0].first_at,
                batch.refusals[0].last_at
            ),
            (999, 1, 999)
        );
        assert_eq!(b.next_due(), None);
    }

    #[test]
    fn refusals_without_a_name_are_the_peers_not_a_devices() {
        let mut b = Batcher::new("n1".into());
        for i in 0..1000 {
            b.add(BrokerEvent::Refused {
                common_name: Some("RE4A1".into()),
                peer: "10.0.0.1:1".parse().unwrap(),
                reason: RefusalReason::Expired,
                detail: "expired".into(),
                at_ms: i,
            });
        }
        for port in [5, 6, 7] {
            b.add(BrokerEvent::Refused {
                common_name: None,
                peer: format!("10.0.0.2:{port}").parse().unwrap(),
                reason: RefusalReason::ServerNameMismatch,
                detail: format!("try {port}"),
                at_ms: i64::from(port),
            });
        }
        let batch = b.take(Instant::now(), true);
        assert_eq!(batch.refusals.len(), 1, "only the named device's");
        assert_eq!(batch.refusals[0].attempts, 1000);
        assert_eq!(
            batch.peer_refusals.len(),
            1,
            "one row per peer IP and reason"
        );
        let p = &batch.peer_refusals[0];
        assert_eq!(
            (p.peer_ip.as_str(), p.peer_addr.as_str(), p.attempts),
            ("10.0.0.2", "10.0.0.2:7", 3)
        );
        assert_eq!((p.first_at, p.last_at, p.detail.as_str()), (5, 7, "try 7"));
    }
}
