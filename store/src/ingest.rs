//! The ingest write path: one transaction per batch of telemetry, locations, device info,
//! quarantined payloads, status changes, refused connection attempts and command replies.

use crate::activity::Activity;
use crate::alarms::{self, AlarmChange};
use crate::commands::{self, ReplyRow};
use crate::peers::{self, PeerRefusal};
use crate::script::{IngestConn, Writer};
use crate::{Backend, Result, Store, query_err};

/// Everything ingest collected since its last flush, applied in one transaction.
#[derive(Debug, Default, Clone)]
pub struct WriteBatch {
    pub telemetry: Vec<TelemetryRow>,
    pub quarantine: Vec<QuarantineRow>,
    pub locations: Vec<LocationRow>,
    pub infos: Vec<InfoRow>,
    /// Applied in order: a device's connect, last-seen and disconnect keep their sequence.
    pub status: Vec<StatusEvent>,
    pub refusals: Vec<RefusalRow>,
    /// Refused attempts that belong to no device, per peer.
    pub peer_refusals: Vec<PeerRefusal>,
    /// Devices' answers to commands.
    pub replies: Vec<ReplyRow>,
    /// Alarm raises and clears, in the order of the telemetry (and connects) they come from.
    pub alarms: Vec<AlarmChange>,
}

impl WriteBatch {
    pub fn is_empty(&self) -> bool {
        self.telemetry.is_empty()
            && self.quarantine.is_empty()
            && self.locations.is_empty()
            && self.infos.is_empty()
            && self.status.is_empty()
            && self.refusals.is_empty()
            && self.peer_refusals.is_empty()
            && self.replies.is_empty()
            && self.alarms.is_empty()
    }

    /// Rows (or row updates) this batch writes.
    pub fn len(&self) -> usize {
        self.telemetry.len()
            + self.quarantine.len()
            + self.locations.len()
            + self.infos.len()
            + self.status.len()
            + self.refusals.len()
            + self.peer_refusals.len()
            + self.replies.len()
            + self.alarms.len()
    }

    /// Splits the batch into two of about half its rows each, keeping the order of each kind
    /// (status events stay in sequence: the first half's come first). A batch of one row
    /// comes back as it is.
    pub fn split(mut self) -> Split {
        let half = self.len() / 2;
        if half == 0 {
            return Split::One(self);
        }
        let mut first = WriteBatch::default();
        let mut left = half;
        fn take<T>(from: &mut Vec<T>, to: &mut Vec<T>, left: &mut usize) {
            let n = from.len().min(*left);
            to.extend(from.drain(..n));
            *left -= n;
        }
        take(&mut self.status, &mut first.status, &mut left);
        take(&mut self.telemetry, &mut first.telemetry, &mut left);
        take(&mut self.quarantine, &mut first.quarantine, &mut left);
        take(&mut self.locations, &mut first.locations, &mut left);
        take(&mut self.infos, &mut first.infos, &mut left);
        take(&mut self.refusals, &mut first.refusals, &mut left);
        take(&mut self.peer_refusals, &mut first.peer_refusals, &mut left);
        take(&mut self.replies, &mut first.replies, &mut left);
        take(&mut self.alarms, &mut first.alarms, &mut left);
        Split::Halves(first, Box::new(self))
    }

    /// A one-row batch that the database refused, as the quarantine row that keeps what the
    /// device sent and why it could not be stored; `None` for rows that are not a device's
    /// payload (status bookkeeping, refusals), which are only logged.
    pub fn into_quarantine(self, error: &str) -> Option<QuarantineRow> {
        let row = |serial: String, topic: &str, payload: Vec<u8>, received_at: i64| {
            Some(QuarantineRow {
                topic: format!("tms/{serial}/{topic}"),
                serial,
                payload,
                error: format!("the database refused it: {error}"),
                received_at,
            })
        };
        if let Some(t) = self.telemetry.into_iter().next() {
            return row(t.serial, "telemetry", t.payload.into_bytes(), t.received_at);
        }
        if let Some(i) = self.infos.into_iter().next() {
            return row(i.serial, "info", i.payload.into_bytes(), i.at);
        }
        if let Some(l) = self.locations.into_iter().next() {
            let payload = format!(r#"{{"lat":{},"lon":{}}}"#, l.lat, l.lon);
            return row(l.serial, "location", payload.into_bytes(), l.at);
        }
        if let Some(r) = self.replies.into_iter().next() {
            return row(r.serial, "reply", r.payload.into_bytes(), r.at);
        }
        match self.status.into_iter().next() {
            Some(StatusEvent::Reported { serial, text, at }) => {
                row(serial, "status", text.into_bytes(), at)
            }
            _ => None,
        }
    }
}

/// What [`WriteBatch::split`] made of a batch.
#[derive(Debug)]
pub enum Split {
    Halves(WriteBatch, Box<WriteBatch>),
    /// It had one row (or none): nothing left to split.
    One(WriteBatch),
}

#[derive(Debug, Clone)]
pub struct TelemetryRow {
    pub serial: String,
    /// Device time when the payload had one, else the receive time (Unix ms).
    pub ts: i64,
    pub received_at: i64,
    pub mode: Option<String>,
    pub load_pct: Option<f64>,
    pub battery_charge_pct: Option<f64>,
    /// The whole JSON object, unknown fields included.
    pub payload: String,
}

#[derive(Debug, Clone)]
pub struct QuarantineRow {
    pub serial: String,
    pub topic: String,
    pub payload: Vec<u8>,
    pub error: String,
    pub received_at: i64,
}

#[derive(Debug, Clone)]
pub struct LocationRow {
    pub serial: String,
    pub lat: f64,
    pub lon: f64,
    pub accuracy_m: Option<f64>,
    pub source: String,
    pub at: i64,
}

#[derive(Debug, Clone)]
pub struct InfoRow {
    pub serial: String,
    pub system_name: Option<String>,
    pub firmware: Option<String>,
    pub payload: String,
    pub at: i64,
}

/// A change of a device's session state.
#[derive(Debug, Clone)]
pub enum StatusEvent {
    Connected {
        serial: String,
        session_id: String,
        at: i64,
        peer_addr: String,
        keep_alive_secs: i64,
        cert_serial: String,
        node_id: String,
    },
    /// Applies only while `session_id` is the device's current session, so a session that
    /// was taken over cannot mark its successor offline.
    Disconnected {
        serial: String,
        session_id: String,
        at: i64,
        reason: String,
    },
    Seen {
        serial: String,
        session_id: String,
        at: i64,
    },
    /// Telemetry arrived: `count` messages between `first_at` and `last_at` in this batch.
    /// Keeps the data-freshness axis: last telemetry time and the usual interval.
    Telemetry {
        serial: String,
        first_at: i64,
        last_at: i64,
        count: i64,
    },
    /// What the device itself last said on `tms/<serial>/status` (birth or will message).
    Reported {
        serial: String,
        text: String,
        at: i64,
    },
}

/// Refused connection attempts of one device with one reason, already coalesced: as ingest
/// writes them and as the device's history reads them back.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct RefusalRow {
    pub serial: String,
    pub reason: String,
    pub detail: String,
    pub peer_addr: Option<String>,
    pub first_at: i64,
    pub last_at: i64,
    pub attempts: i64,
}

/// Rows per multi-row INSERT: far below SQLite's and PostgreSQL's parameter limits.
const CHUNK: usize = 200;
/// Refusals of the same reason this close together extend one record instead of adding one.
const REFUSAL_COALESCE_MS: i64 = 60_000;

impl Store {
    /// Writes a batch in one transaction: all of it or none of it.
    pub async fn write_batch(&self, batch: &WriteBatch) -> Result<()> {
        let delay = self.write_delay();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        // The same connection from batch to batch: on SQLite ingest's own (see `lite.rs`);
        // on PostgreSQL one taken out of the pool, which would ping it each time it went back
        // (a round trip and a spawned task, as much CPU as the commit it followed).
        let mut held = self.ingest_conn().lock().await;
        let mut conn = match held.take() {
            Some(conn) => conn,
            None => match self.sqlite_target() {
                Some(target) => IngestConn::Sqlite(target.open()?),
                None => IngestConn::Postgres(
                    self.pool()
                        .acquire()
                        .await
                        .map_err(query_err("starting an ingest transaction"))?
                        .detach(),
                ),
            },
        };
        let result = self.write_batch_on(&mut conn, batch).await;
        if result.is_ok() {
            self.count_ingest_commit();
            *held = Some(conn);
        }
        // After a failure the connection is dropped. On SQLite a failed statement or COMMIT
        // (disk full, I/O error) may have rolled the transaction back by itself, and kept, the
        // connection could hold the write lock or refuse every later BEGIN ("database is
        // locked" for good); closing it rolls back what is left, and a new one starts clean,
        // so writes resume as soon as the cause goes away. On PostgreSQL a graceful close
        // would wait on a cut network.
        result
    }

    async fn write_batch_on(&self, conn: &mut IngestConn, batch: &WriteBatch) -> Result<()> {
        let mut w = Writer::begin(conn, "starting an ingest transaction").await?;

        for chunk in batch.telemetry.chunks(CHUNK) {
            let mut sql = String::from(
                "INSERT INTO telemetry (serial, ts, received_at, mode, load_pct, battery_charge_pct, payload) VALUES ",
            );
            for i in 0..chunk.len() {
                if i > 0 {
                    sql.push(',');
                }
                match self.backend() {
                    // Anonymous `?` on SQLite, bound in order.
                    Backend::Sqlite => sql.push_str("(?, ?, ?, ?, ?, ?, ?)"),
                    Backend::Postgres => {
                        let b = i * 7;
                        sql.push_str(&format!(
                            "(${}, ${}, ${}, ${}, ${}, ${}, ${})",
                            b + 1,
                            b + 2,
                            b + 3,
                            b + 4,
                            b + 5,
                            b + 6,
                            b + 7
                        ));
                    }
                }
            }
            w.execute_positional("storing telemetry", &sql, |b| {
                for t in chunk {
                    b.bind(&t.serial)
                        .bind(t.ts)
                        .bind(t.received_at)
                        .bind(t.mode.as_deref())
                        .bind(t.load_pct)
                        .bind(t.battery_charge_pct)
                        .bind(&t.payload);
                }
            })
            .await?;
        }

        for row in &batch.quarantine {
            w.execute("quarantining a payload", "INSERT INTO quarantine (serial, topic, payload, error, received_at) VALUES ($1, $2, $3, $4, $5)", |b| { b.bind(&row.serial).bind(&row.topic).bind(&row.payload).bind(&row.error).bind(row.received_at); }).await?;
        }

        for l in &batch.locations {
            w.execute("storing a location", "INSERT INTO locations (serial, lat, lon, accuracy_m, source, updated_at) VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (serial, source) DO UPDATE SET lat = excluded.lat, lon = excluded.lon, \
                 accuracy_m = excluded.accuracy_m, updated_at = excluded.updated_at", |b| { b.bind(&l.serial).bind(l.lat).bind(l.lon).bind(l.accuracy_m).bind(&l.source).bind(l.at); }).await?;
        }

        for i in &batch.infos {
            w.execute("storing device info", "INSERT INTO device_info (serial, system_name, firmware, payload, updated_at) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (serial) DO UPDATE SET system_name = excluded.system_name, \
                 firmware = excluded.firmware, payload = excluded.payload, updated_at = excluded.updated_at", |b| { b.bind(&i.serial).bind(i.system_name.as_deref()).bind(i.firmware.as_deref()).bind(&i.payload).bind(i.at); }).await?;
            // Seed step 2: the device's System Name should be "<UPS model> <rating> <UPS serial>"
            // of the UPS it was registered with; a mismatch is flagged, not accepted silently.
            w.execute("checking the UPS identity", "UPDATE device_info SET identity_mismatch = (SELECT CASE \
                 WHEN d.ups_model IS NULL OR d.ups_serial IS NULL OR device_info.system_name IS NULL THEN NULL \
                 WHEN LOWER(device_info.system_name) LIKE LOWER(d.ups_model) || ' %' \
                  AND LOWER(device_info.system_name) LIKE '% ' || LOWER(d.ups_serial) THEN 0 ELSE 1 END \
                 FROM devices d WHERE d.serial = device_info.serial) WHERE serial = $1", |b| { b.bind(&i.serial); }).await?;
        }

        let mut logged_connects = false;
        let mut activity = Activity::new(self.backend());
        for event in &batch.status {
            if activity.keep(event) {
                continue;
            }
            activity.write(&mut w).await?;
            const OP: &str = "updating device status";
            match event {
                StatusEvent::Connected {
                    serial,
                    session_id,
                    at,
                    peer_addr,
                    keep_alive_secs,
                    cert_serial,
                    node_id,
                } => {
                    w.execute(
                        OP,
                        "INSERT INTO device_status (serial, state, since, last_seen, peer_addr, session_id, \
                         keep_alive_secs, cert_serial, node_id) VALUES ($1, 'online', $2, $2, $3, $4, $5, $6, $7) \
                         ON CONFLICT (serial) DO UPDATE SET state = 'online', since = excluded.since, \
                         last_seen = excluded.last_seen, peer_addr = excluded.peer_addr, \
                         session_id = excluded.session_id, keep_alive_secs = excluded.keep_alive_secs, \
                         cert_serial = excluded.cert_serial, node_id = excluded.node_id, \
                         last_disconnect_reason = NULL",
                        |b| {
                            b.bind(serial)
                                .bind(*at)
                                .bind(peer_addr)
                                .bind(session_id)
                                .bind(*keep_alive_secs)
                                .bind(cert_serial)
                                .bind(node_id);
                        },
                    )
                    .await?
                }
                StatusEvent::Disconnected {
                    serial,
                    session_id,
                    at,
                    reason,
                } => {
                    w.execute(
                        OP,
                        "UPDATE device_status SET state = 'offline', since = $1, last_disconnect_reason = $2 \
                         WHERE serial = $3 AND session_id = $4 AND state = 'online'",
                        |b| {
                            b.bind(*at).bind(reason).bind(serial).bind(session_id);
                        },
                    )
                    .await?
                }
                // Kept by `activity` above.
                StatusEvent::Seen { .. } | StatusEvent::Telemetry { .. } => {}
                StatusEvent::Reported { serial, text, at } => {
                    w.execute(
                        OP,
                        "UPDATE device_status SET reported_status = $1, reported_status_at = $2 WHERE serial = $3",
                        |b| {
                            b.bind(text).bind(*at).bind(serial);
                        },
                    )
                    .await?
                }
            }
            if let StatusEvent::Connected {
                serial,
                cert_serial,
                at,
                ..
            } = event
            {
                // Rotation: the first connect with a newer certificate ends the older ones.
                w.execute(
                    "superseding older certificates",
                    "UPDATE certificates SET revoked_at = $1, revocation_reason = 'superseded' \
                     WHERE device_serial = $2 AND revoked_at IS NULL AND serial_number <> $3 \
                     AND issued_at < (SELECT issued_at FROM certificates WHERE serial_number = $3)",
                    |b| {
                        b.bind(*at).bind(serial).bind(cert_serial);
                    },
                )
                .await?;
            }
            match event {
                StatusEvent::Connected {
                    serial,
                    session_id,
                    at,
                    peer_addr,
                    node_id,
                    ..
                } => {
                    w.execute("recording a session", "INSERT INTO device_sessions (session_id, serial, node_id, peer_addr, started_at) \
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (session_id) DO NOTHING", |b| { b.bind(session_id).bind(serial).bind(node_id).bind(peer_addr).bind(*at); }).await?;
                    if self.backend() == Backend::Postgres {
                        // In the same transaction as the status row it makes this session
                        // the owner of: a node holding an older session of the device sees
                        // this entry and closes that one (`taken_over`).
                        let payload =
                            serde_json::json!({"session": session_id, "node": node_id}).to_string();
                        w.execute(
                            "logging a connect for the other nodes",
                            "INSERT INTO cluster_events (kind, serial, payload, created_at) \
                             VALUES ($1, $2, $3, $4)",
                            |b| {
                                b.bind(crate::EVENT_CONNECTED)
                                    .bind(serial)
                                    .bind(payload)
                                    .bind(*at);
                            },
                        )
                        .await?;
                        logged_connects = true;
                    }
                }
                StatusEvent::Disconnected {
                    session_id,
                    at,
                    reason,
                    ..
                } => {
                    w.execute("ending a session", "UPDATE device_sessions SET ended_at = $1, end_reason = $2 WHERE session_id = $3 AND ended_at IS NULL", |b| { b.bind(*at).bind(reason).bind(session_id); }).await?;
                }
                _ => {}
            }
        }
        activity.write(&mut w).await?;
        if logged_connects {
            // One wake-up per batch, delivered when the entries above commit.
            w.execute(
                "sending a wake-up to the other nodes",
                crate::wakeup::NOTIFY_SQL,
                |b| {
                    b.bind(crate::wakeup::Wake::Changes.payload());
                },
            )
            .await?;
        }

        for r in &batch.refusals {
            // An expired certificate of a device whose lease has ended is the lease's doing.
            let reason: &str =
                if r.reason == "expired" && lease_ended(&mut w, &r.serial, r.last_at).await? {
                    "lease_expired"
                } else {
                    &r.reason
                };
            // Only devices in the registry get records: a stranger presenting certificates
            // with made-up names must not be able to grow the database.
            w.execute("recording a refused connection", "INSERT INTO device_status (serial, state, last_connect_error, last_connect_error_detail, \
                 last_connect_error_at) SELECT $1, 'never_connected', $2, $3, $4 \
                 WHERE EXISTS (SELECT 1 FROM devices WHERE serial = $1) \
                 ON CONFLICT (serial) DO UPDATE SET last_connect_error = excluded.last_connect_error, \
                 last_connect_error_detail = excluded.last_connect_error_detail, \
                 last_connect_error_at = excluded.last_connect_error_at", |b| { b.bind(&r.serial).bind(reason).bind(&r.detail).bind(r.last_at); }).await?;
            let extended = w.execute_now("recording a refused connection", "UPDATE connect_refusals SET last_at = $1, attempts = attempts + $2, detail = $3, peer_addr = $4 \
                 WHERE id = (SELECT id FROM connect_refusals WHERE serial = $5 ORDER BY last_at DESC, id DESC LIMIT 1) \
                 AND reason = $6 AND last_at >= $7", |b| { b.bind(r.last_at).bind(r.attempts).bind(&r.detail).bind(r.peer_addr.as_deref()).bind(&r.serial).bind(reason).bind(r.first_at - REFUSAL_COALESCE_MS); }).await?;
            if extended == 0 {
                w.execute("recording a refused connection", "INSERT INTO connect_refusals (serial, reason, detail, peer_addr, first_at, last_at, attempts) \
                     SELECT $1, $2, $3, $4, $5, $6, $7 WHERE EXISTS (SELECT 1 FROM devices WHERE serial = $1)", |b| { b.bind(&r.serial).bind(reason).bind(&r.detail).bind(r.peer_addr.as_deref()).bind(r.first_at).bind(r.last_at).bind(r.attempts); }).await?;
            }
        }

        for p in &batch.peer_refusals {
            w.execute("recording a refused peer", peers::UPSERT, |b| {
                b.bind(&p.peer_ip)
                    .bind(&p.reason)
                    .bind(&p.detail)
                    .bind(&p.peer_addr)
                    .bind(p.first_at)
                    .bind(p.last_at)
                    .bind(p.attempts);
            })
            .await?;
        }
        if !batch.peer_refusals.is_empty() {
            w.execute("trimming refused peers", peers::TRIM, |b| {
                b.bind(peers::PEER_REFUSALS_KEPT - 1);
            })
            .await?;
        }

        for r in &batch.replies {
            let state = if r.ok { "succeeded" } else { "failed" };
            w.execute("recording a command reply", commands::RECORD_REPLY, |b| {
                b.bind(state)
                    .bind(r.at)
                    .bind(&r.payload)
                    .bind(&r.command_id)
                    .bind(&r.serial);
            })
            .await?;
        }
        for change in &batch.alarms {
            match change {
                AlarmChange::Raise {
                    serial,
                    code,
                    severity,
                    at,
                    detail,
                } => {
                    w.execute("raising an alarm", alarms::RAISE, |b| {
                        b.bind(serial)
                            .bind(code)
                            .bind(*severity)
                            .bind(*at)
                            .bind(detail);
                    })
                    .await?
                }
                AlarmChange::Clear { serial, code, at } => {
                    w.execute("clearing an alarm", alarms::CLEAR, |b| {
                        b.bind(*at).bind(serial).bind(code);
                    })
                    .await?
                }
            }
        }

        w.commit("committing an ingest batch").await
    }
}

async fn lease_ended<'c>(w: &mut Writer<'c>, serial: &'c str, at: i64) -> Result<bool> {
    w.exists_now(
        "checking a lease",
        "SELECT 1 AS ended FROM devices WHERE serial = $1 AND lease_ends_at <= $2",
        |b| {
            b.bind(serial).bind(at);
        },
    )
    .await
}
