//! A device's history: sessions, telemetry, locations, quarantined payloads and refused
//! attempts — what the device page and the CLI read, and what housekeeping prunes.

use crate::devices::SOURCE_RANK;
use crate::ingest::RefusalRow;
use crate::row::JsonText;
use crate::{Result, Store, query_err};

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct TelemetryRecord {
    pub ts: i64,
    pub received_at: i64,
    #[sqlx(try_from = "JsonText")]
    pub payload: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct LocationRecord {
    pub lat: f64,
    pub lon: f64,
    pub accuracy_m: Option<f64>,
    pub source: String,
    pub updated_at: i64,
}

/// One session of a device (availability history); times in Unix ms.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct SessionRecord {
    pub session_id: String,
    pub started_at: i64,
    pub ended_at: Option<i64>,
    pub end_reason: Option<String>,
    pub peer_addr: Option<String>,
}

/// A malformed payload a device sent, kept for inspection (CONTRACT §4).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct QuarantinedPayload {
    /// The topic it came on, e.g. `tms/<serial>/telemetry`.
    pub topic: String,
    /// Why it was set aside.
    pub error: String,
    /// The bytes as received (not necessarily UTF-8).
    pub payload: Vec<u8>,
    pub received_at: i64,
}

impl Store {
    /// Sessions of a device that overlap `[from, to]`, oldest first.
    pub async fn sessions(&self, serial: &str, from: i64, to: i64) -> Result<Vec<SessionRecord>> {
        sqlx::query_as(
            "SELECT session_id, started_at, ended_at, end_reason, peer_addr FROM device_sessions \
             WHERE serial = $1 AND started_at <= $3 AND (ended_at IS NULL OR ended_at >= $2) ORDER BY started_at",
        )
        .bind(serial)
        .bind(from)
        .bind(to)
        .fetch_all(self.pool())
        .await
        .map_err(query_err("reading sessions"))
    }

    /// Deletes sessions that ended before `before` (history retention).
    pub async fn prune_sessions(&self, before: i64) -> Result<u64> {
        let done =
            sqlx::query("DELETE FROM device_sessions WHERE ended_at IS NOT NULL AND ended_at < $1")
                .bind(before)
                .execute(self.pool())
                .await
                .map_err(query_err("pruning sessions"))?;
        Ok(done.rows_affected())
    }

    /// Deletes quarantined payloads received before `before` (history retention): kept for
    /// inspection, not forever.
    pub async fn prune_quarantine(&self, before: i64) -> Result<u64> {
        let done = sqlx::query("DELETE FROM quarantine WHERE received_at < $1")
            .bind(before)
            .execute(self.pool())
            .await
            .map_err(query_err("pruning quarantine"))?;
        Ok(done.rows_affected())
    }

    /// Newest first, at most `limit` rows.
    pub async fn telemetry(&self, serial: &str, limit: i64) -> Result<Vec<TelemetryRecord>> {
        sqlx::query_as(
            "SELECT ts, received_at, payload FROM telemetry WHERE serial = $1 ORDER BY ts DESC, id DESC LIMIT $2",
        )
        .bind(serial)
        .bind(limit)
        .fetch_all(self.pool())
        .await
        .map_err(query_err("reading telemetry"))
    }

    pub async fn telemetry_count(&self, serial: &str) -> Result<i64> {
        sqlx::query_scalar("SELECT COUNT(*) AS n FROM telemetry WHERE serial = $1")
            .bind(serial)
            .fetch_one(self.pool())
            .await
            .map_err(query_err("counting telemetry"))
    }

    /// The best location of a device: device > operator > registration.
    pub async fn location(&self, serial: &str) -> Result<Option<LocationRecord>> {
        Ok(self.locations_of(serial).await?.into_iter().next())
    }

    /// Every source's location of a device, best first.
    pub async fn locations_of(&self, serial: &str) -> Result<Vec<LocationRecord>> {
        let sql = format!(
            "SELECT lat, lon, accuracy_m, source, updated_at FROM locations WHERE serial = $1 ORDER BY {SOURCE_RANK}"
        );
        sqlx::query_as(&sql)
            .bind(serial)
            .fetch_all(self.pool())
            .await
            .map_err(query_err("reading locations"))
    }

    /// Quarantined (malformed) messages of a device, newest first: `(topic, error, payload)`.
    pub async fn quarantined(
        &self,
        serial: &str,
        limit: i64,
    ) -> Result<Vec<(String, String, Vec<u8>)>> {
        Ok(self
            .quarantine(serial, limit)
            .await?
            .into_iter()
            .map(|q| (q.topic, q.error, q.payload))
            .collect())
    }

    /// Quarantined (malformed) messages of a device, newest first, with when they came.
    pub async fn quarantine(&self, serial: &str, limit: i64) -> Result<Vec<QuarantinedPayload>> {
        sqlx::query_as::<_, QuarantinedPayload>(
            "SELECT topic, error, payload, received_at FROM quarantine WHERE serial = $1 \
             ORDER BY received_at DESC, id DESC LIMIT $2",
        )
        .bind(serial)
        .bind(limit)
        .fetch_all(self.pool())
        .await
        .map_err(query_err("reading quarantine"))
    }

    /// Recent refused connection attempts of a device, newest first.
    pub async fn refusals(&self, serial: &str, limit: i64) -> Result<Vec<RefusalRow>> {
        sqlx::query_as(
            "SELECT serial, reason, detail, peer_addr, first_at, last_at, attempts FROM connect_refusals \
             WHERE serial = $1 ORDER BY last_at DESC, id DESC LIMIT $2",
        )
        .bind(serial)
        .bind(limit)
        .fetch_all(self.pool())
        .await
        .map_err(query_err("reading refusals"))
    }
}
