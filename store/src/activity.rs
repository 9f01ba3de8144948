//! A batch's last-seen and telemetry-interval updates (device activity): one statement per
//! device on SQLite, one statement for all of them on PostgreSQL.
//!
//! On PostgreSQL every statement of a transaction is a round trip, and in a busy batch most
//! of them are these two updates: one of each per device that sent telemetry. A flood of 50
//! devices spent 18 µs of PostgreSQL's CPU per message, 1.9 × the SQLite path's whole cost
//! (`bench/pgflood.sh`). Here a run of them becomes `UPDATE … FROM (VALUES …)`, one row per
//! device, with the same conditions as the single-row statements used on SQLite, where a
//! statement is a step of a prepared statement on ingest's own thread (`lite.rs`).
//!
//! Only a run of consecutive such events is grouped, and written before the next event of
//! another kind, so the order of a batch's status events is kept. Within a run the events
//! touch different columns (last seen; telemetry interval) and name a session or a device at
//! most once each (the batcher coalesces them per session and per device).

use crate::ingest::StatusEvent;
use crate::script::Writer;
use crate::{Backend, Result};

/// Devices per grouped statement: 4 parameters a row, far below PostgreSQL's 65,535.
const ROWS: usize = 500;

/// SQLite's single-row updates (`$1` serial, `$2` at, `$3` session id; `$1` serial, `$2`
/// last at, `$3` first at, `$4` count). The usual interval is a running average (weight 1/4)
/// of the gaps seen.
const SEEN: &str = "UPDATE device_status SET last_seen = $2 WHERE serial = $1 AND session_id = $3 AND last_seen < $2";
const FRESH: &str = "UPDATE device_status SET telemetry_interval_ms = CASE \
     WHEN last_telemetry_at IS NULL THEN (CASE WHEN $4 > 1 THEN ($2 - $3) / ($4 - 1) ELSE NULL END) \
     ELSE (COALESCE(telemetry_interval_ms, ($2 - last_telemetry_at) / $4) * 3 + ($2 - last_telemetry_at) / $4) / 4 END, \
     last_telemetry_at = $2 WHERE serial = $1 AND (last_telemetry_at IS NULL OR last_telemetry_at < $2)";

/// Last-seen and telemetry updates gathered until the next status event of another kind.
pub(crate) struct Activity<'b> {
    backend: Backend,
    /// (serial, session id, at)
    seen: Vec<(&'b str, &'b str, i64)>,
    /// (serial, last at, first at, count)
    fresh: Vec<(&'b str, i64, i64, i64)>,
}

impl<'b> Activity<'b> {
    pub(crate) fn new(backend: Backend) -> Self {
        Activity {
            backend,
            seen: Vec::new(),
            fresh: Vec::new(),
        }
    }

    /// Keeps `event` if it is a last-seen or telemetry update.
    pub(crate) fn keep(&mut self, event: &'b StatusEvent) -> bool {
        match event {
            StatusEvent::Seen {
                serial,
                session_id,
                at,
            } => self.seen.push((serial, session_id, *at)),
            StatusEvent::Telemetry {
                serial,
                first_at,
                last_at,
                count,
            } => self.fresh.push((serial, *last_at, *first_at, *count)),
            _ => return false,
        }
        true
    }

    /// Writes what was kept, and starts empty again.
    pub(crate) async fn write(&mut self, w: &mut Writer<'b>) -> Result<()> {
        match self.backend {
            Backend::Sqlite => self.write_each(w).await?,
            Backend::Postgres => self.write_grouped(w).await?,
        }
        self.seen.clear();
        self.fresh.clear();
        Ok(())
    }

    async fn write_each(&self, w: &mut Writer<'b>) -> Result<()> {
        for &(serial, session_id, at) in &self.seen {
            w.execute("updating device status", SEEN, |b| {
                b.bind(serial).bind(at).bind(session_id);
            })
            .await?;
        }
        for &(serial, last_at, first_at, count) in &self.fresh {
            w.execute("updating device status", FRESH, |b| {
                b.bind(serial).bind(last_at).bind(first_at).bind(count);
            })
            .await?;
        }
        Ok(())
    }

    async fn write_grouped(&self, w: &mut Writer<'b>) -> Result<()> {
        for rows in self.seen.chunks(ROWS) {
            let sql = format!(
                "UPDATE device_status AS d SET last_seen = v.at FROM (VALUES {}) AS v (serial, session_id, at) \
                 WHERE d.serial = v.serial AND d.session_id = v.session_id AND d.last_seen < v.at",
                values(rows.len(), &["text", "text", "bigint"])
            );
            w.execute_positional("updating device status", &sql, |b| {
                for (serial, session_id, at) in rows {
                    b.bind(*serial).bind(*session_id).bind(*at);
                }
            })
            .await?;
        }
        for rows in self.fresh.chunks(ROWS) {
            let sql = format!(
                "UPDATE device_status AS d SET telemetry_interval_ms = CASE \
                 WHEN d.last_telemetry_at IS NULL THEN (CASE WHEN v.n > 1 THEN (v.last_at - v.first_at) / (v.n - 1) ELSE NULL END) \
                 ELSE (COALESCE(d.telemetry_interval_ms, (v.last_at - d.last_telemetry_at) / v.n) * 3 + (v.last_at - d.last_telemetry_at) / v.n) / 4 END, \
                 last_telemetry_at = v.last_at FROM (VALUES {}) AS v (serial, last_at, first_at, n) \
                 WHERE d.serial = v.serial AND (d.last_telemetry_at IS NULL OR d.last_telemetry_at < v.last_at)",
                values(rows.len(), &["text", "bigint", "bigint", "bigint"])
            );
            w.execute_positional("updating device status", &sql, |b| {
                for (serial, last_at, first_at, count) in rows {
                    b.bind(*serial).bind(*last_at).bind(*first_at).bind(*count);
                }
            })
            .await?;
        }
        Ok(())
    }
}

/// `($1::text, $2::bigint), ($3::text, $4::bigint), …`: `rows` rows of the given types.
fn values(rows: usize, types: &[&str]) -> String {
    let mut sql = String::with_capacity(rows * types.len() * 12);
    let mut n = 0;
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for (i, ty) in types.iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            n += 1;
            sql.push_str(&format!("${n}::{ty}"));
        }
        sql.push(')');
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_number_every_parameter_once_in_order() {
        assert_eq!(
            values(2, &["text", "bigint"]),
            "($1::text, $2::bigint), ($3::text, $4::bigint)"
        );
    }
}
