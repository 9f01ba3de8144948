//! Records of issued certificates and their revocation. Private keys are never stored.

use crate::wakeup::Wake;
use crate::{Backend, Result, Store, query_err};

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct CertificateRecord {
    /// Lower-case hex.
    pub serial_number: String,
    pub device_serial: String,
    pub sha256_fingerprint: String,
    pub not_before: i64,
    pub not_after: i64,
    pub issued_at: i64,
    pub revoked_at: Option<i64>,
    pub revocation_reason: Option<String>,
}

const COLUMNS: &str = "serial_number, device_serial, sha256_fingerprint, not_before, not_after, \
    issued_at, revoked_at, revocation_reason";

impl Store {
    /// Records a certificate; returns the issue time recorded (see below).
    pub async fn add_certificate(&self, c: &CertificateRecord) -> Result<i64> {
        // Issue times order a device's certificates (rotation supersedes the older ones), so
        // the time recorded is `c.issued_at` or one past the device's newest, whichever is
        // later — decided in the same write transaction as the insert, so two issued at once
        // cannot share a time or pass each other.
        let mut tx = self.begin_write("starting to record a certificate").await?;
        if self.backend() == crate::Backend::Postgres {
            // Serializes issues per device (SQLite's BEGIN IMMEDIATE already serializes all).
            sqlx::query("SELECT serial FROM devices WHERE serial = $1 FOR UPDATE")
                .bind(&c.device_serial)
                .execute(&mut *tx)
                .await
                .map_err(query_err("recording a certificate"))?;
        }
        let newest: Option<i64> =
            sqlx::query_scalar("SELECT MAX(issued_at) FROM certificates WHERE device_serial = $1")
                .bind(&c.device_serial)
                .fetch_one(&mut *tx)
                .await
                .map_err(query_err("recording a certificate"))?;
        let issued_at = newest.map_or(c.issued_at, |n| c.issued_at.max(n.saturating_add(1)));
        sqlx::query(
            "INSERT INTO certificates (serial_number, device_serial, sha256_fingerprint, not_before, \
             not_after, issued_at, revoked_at, revocation_reason) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&c.serial_number)
        .bind(&c.device_serial)
        .bind(&c.sha256_fingerprint)
        .bind(c.not_before)
        .bind(c.not_after)
        .bind(issued_at)
        .bind(c.revoked_at)
        .bind(c.revocation_reason.as_deref())
        .execute(&mut *tx)
        .await
        .map_err(query_err("recording a certificate"))?;
        tx.commit()
            .await
            .map_err(query_err("recording a certificate"))?;
        Ok(issued_at)
    }

    /// Every certificate issued to a device, newest first.
    pub async fn certificates_of(&self, device_serial: &str) -> Result<Vec<CertificateRecord>> {
        sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM certificates WHERE device_serial = $1 ORDER BY issued_at DESC, serial_number"
        ))
        .bind(device_serial)
        .fetch_all(self.pool())
        .await
        .map_err(query_err("listing certificates"))
    }

    /// Revokes every still-valid certificate of a device; returns their serial numbers.
    pub async fn revoke_device_certificates(
        &self,
        device_serial: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<Vec<String>> {
        const OP: &str = "revoking certificates";
        let revoke = sqlx::query_scalar(
            "UPDATE certificates SET revoked_at = $1, revocation_reason = $2 \
             WHERE device_serial = $3 AND revoked_at IS NULL RETURNING serial_number",
        )
        .bind(now_ms)
        .bind(reason)
        .bind(device_serial);
        if self.backend() == Backend::Postgres {
            // The other nodes are woken when the revocation commits, not before.
            let mut tx = self.pool().begin().await.map_err(query_err(OP))?;
            let serials: Vec<String> = revoke.fetch_all(&mut *tx).await.map_err(query_err(OP))?;
            if !serials.is_empty() {
                crate::wakeup::notify(self.backend(), &mut *tx, Wake::Revocations).await?;
            }
            tx.commit().await.map_err(query_err(OP))?;
            Ok(serials)
        } else {
            revoke.fetch_all(self.pool()).await.map_err(query_err(OP))
        }
    }

    /// Ends rotation overlaps: a certificate with a newer one issued before `cutoff` is
    /// `superseded`, whether or not the device has used the new one yet.
    pub async fn end_overlaps(&self, cutoff_ms: i64, now_ms: i64) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE certificates SET revoked_at = $1, revocation_reason = 'superseded' \
             WHERE revoked_at IS NULL AND EXISTS (SELECT 1 FROM certificates n \
             WHERE n.device_serial = certificates.device_serial AND n.issued_at > certificates.issued_at \
             AND n.issued_at <= $2)",
        )
        .bind(now_ms)
        .bind(cutoff_ms)
        .execute(self.pool())
        .await
        .map_err(query_err("ending rotation overlaps"))?;
        Ok(done.rows_affected())
    }

    /// Revoked certificates with the reason, oldest revocation first:
    /// `(serial_number, revoked_at, reason)`. Feeds both the broker's revoked set and the CRL.
    pub async fn revocations(&self) -> Result<Vec<(String, i64, Option<String>)>> {
        sqlx::query_as(
            "SELECT serial_number, revoked_at, revocation_reason FROM certificates WHERE revoked_at IS NOT NULL \
             ORDER BY revoked_at, serial_number",
        )
        .fetch_all(self.pool())
        .await
        .map_err(query_err("listing revocations"))
    }

    /// A cheap fingerprint of the revocation list: `(count, newest revocation time)`. Pollers
    /// reload the full list only when it changes.
    pub async fn revocation_marker(&self) -> Result<(i64, i64)> {
        sqlx::query_as(
            "SELECT COUNT(*) AS n, COALESCE(MAX(revoked_at), 0) AS newest FROM certificates WHERE revoked_at IS NOT NULL",
        )
        .fetch_one(self.pool())
        .await
        .map_err(query_err("reading the revocation marker"))
    }
}
