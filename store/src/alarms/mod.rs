//! Alarms (CONTRACT §7): the record, and what the ingest side writes: the open set ingest
//! starts from, the raise and clear statements of its batch (see `ingest.rs`), the
//! `device_offline` sweep and pruning. The views of the API and CLI and acknowledgement are in
//! [`views`]; the notification state of each alarm per channel is in [`notices`].
//!
//! A raise is `INSERT … ON CONFLICT DO NOTHING` against the partial unique index on open
//! alarms, so however often it is replayed (a retried batch, two nodes, a restart mid-outage)
//! a device has at most one open alarm per code. A clear closes the open one, if any.
//! Not here: deciding when a condition holds (ingest) or who is told and how (registry).

mod notices;
mod views;

use crate::{Result, Store, query_err};

pub use notices::{Channel, NoticeGroup, PendingNotice};
pub use views::AlarmFilter;

/// One alarm record (CONTRACT §7), with the device's company for views and notices.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct AlarmRecord {
    pub id: i64,
    pub serial: String,
    pub code: String,
    pub severity: String,
    pub raised_at: i64,
    pub cleared_at: Option<i64>,
    pub acknowledged_at: Option<i64>,
    pub acknowledged_by: Option<String>,
    /// JSON object text: the readings that raised it.
    pub detail: String,
    pub company_id: i64,
    pub company: String,
}

/// A change ingest writes in its batch, in the order the telemetry came.
#[derive(Debug, Clone, PartialEq)]
pub enum AlarmChange {
    Raise {
        serial: String,
        code: String,
        severity: &'static str,
        at: i64,
        /// JSON object text.
        detail: String,
    },
    Clear {
        serial: String,
        code: String,
        at: i64,
    },
}

impl AlarmChange {
    pub fn serial(&self) -> &str {
        match self {
            AlarmChange::Raise { serial, .. } | AlarmChange::Clear { serial, .. } => serial,
        }
    }

    pub fn code(&self) -> &str {
        match self {
            AlarmChange::Raise { code, .. } | AlarmChange::Clear { code, .. } => code,
        }
    }
}

/// The raise statement of a batch (`$1` serial … `$5` detail).
pub(crate) const RAISE: &str = "INSERT INTO alarms (serial, code, severity, raised_at, detail) \
     VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING";
/// The clear statement of a batch (`$1` at, `$2` serial, `$3` code). A clear at an earlier
/// time than the raise (device clocks) still closes it, at the raise time.
pub(crate) const CLEAR: &str = "UPDATE alarms SET cleared_at = CASE WHEN raised_at > $1 THEN raised_at ELSE $1 END \
     WHERE serial = $2 AND code = $3 AND cleared_at IS NULL";

/// The columns of an [`AlarmRecord`] (aliases `a` alarms, `d` devices, `c` companies).
pub(crate) const COLUMNS: &str = "a.id, a.serial, a.code, a.severity, a.raised_at, a.cleared_at, \
     a.acknowledged_at, a.acknowledged_by, a.detail, d.company_id, c.name AS company";

/// Offline reasons that are the gateway's own doing: the window then starts no earlier than
/// this process's start, so a restart the device survives raises nothing.
pub const GATEWAY_REASONS: &[&str] = &["server_shutdown", "node_lost", "gateway_restart"];

impl Store {
    /// Open alarms as (serial, code), of the given devices or (`None`) of all.
    pub async fn open_alarms(&self, serials: Option<&[String]>) -> Result<Vec<(String, String)>> {
        let op = "reading open alarms";
        let mut out = Vec::new();
        let all = [];
        let chunks: Vec<&[String]> = match serials {
            None => vec![&all[..]],
            Some(s) => s.chunks(200).collect(),
        };
        for chunk in chunks {
            let mut sql = String::from("SELECT serial, code FROM alarms WHERE cleared_at IS NULL");
            if serials.is_some() {
                if chunk.is_empty() {
                    continue;
                }
                let marks: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
                sql.push_str(&format!(" AND serial IN ({})", marks.join(", ")));
            }
            let mut q = sqlx::query_as(&sql);
            for s in chunk {
                q = q.bind(s);
            }
            out.extend(q.fetch_all(self.pool()).await.map_err(query_err(op))?);
        }
        Ok(out)
    }

    /// Raises `device_offline` for registered devices offline since before `cutoff`; when the
    /// reason is the gateway's own ([`GATEWAY_REASONS`]) the offline time counts from no
    /// earlier than `started_at` (this process's start). Returns how many were raised.
    /// Also clears `device_offline` of devices that are online (a connect that raced a sweep).
    pub async fn sweep_offline(
        &self,
        cutoff: i64,
        started_at: i64,
        now: i64,
    ) -> Result<(u64, u64)> {
        let reasons = GATEWAY_REASONS
            .iter()
            .map(|r| format!("'{r}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut tx = self.begin_write("raising device_offline alarms").await?;
        let raised = sqlx::query(&format!(
            "INSERT INTO alarms (serial, code, severity, raised_at, detail) \
             SELECT s.serial, 'device_offline', 'critical', $1, \
             '{{\"offline_since\": ' || s.since || ', \"reason\": \"' || COALESCE(s.last_disconnect_reason, 'unknown') || '\"}}' \
             FROM device_status s JOIN devices d ON d.serial = s.serial \
             WHERE s.state = 'offline' AND s.since IS NOT NULL \
             AND (CASE WHEN s.last_disconnect_reason IN ({reasons}) AND s.since < $3 THEN $3 ELSE s.since END) <= $2 \
             AND NOT EXISTS (SELECT 1 FROM alarms a WHERE a.serial = s.serial AND a.code = 'device_offline' AND a.cleared_at IS NULL) \
             ON CONFLICT DO NOTHING"
        ))
        .bind(now)
        .bind(cutoff)
        .bind(started_at)
        .execute(&mut *tx)
        .await
        .map_err(query_err("raising device_offline alarms"))?
        .rows_affected();
        let cleared = sqlx::query(
            "UPDATE alarms SET cleared_at = (SELECT CASE WHEN s.since > alarms.raised_at THEN s.since ELSE alarms.raised_at END \
             FROM device_status s WHERE s.serial = alarms.serial) \
             WHERE code = 'device_offline' AND cleared_at IS NULL \
             AND serial IN (SELECT serial FROM device_status WHERE state = 'online')",
        )
        .execute(&mut *tx)
        .await
        .map_err(query_err("clearing device_offline alarms"))?
        .rows_affected();
        tx.commit()
            .await
            .map_err(query_err("committing device_offline alarms"))?;
        Ok((raised, cleared))
    }

    /// Deletes alarms cleared before `before` whose notices are out (history retention).
    pub async fn prune_alarms(&self, before: i64) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM alarms WHERE cleared_at IS NOT NULL AND cleared_at < $1 \
             AND mailed_clear_at IS NOT NULL AND hooked_clear_at IS NOT NULL",
        )
        .bind(before)
        .execute(self.pool())
        .await
        .map_err(query_err("pruning alarms"))?;
        Ok(done.rows_affected())
    }
}
