//! Certificate issuance for a registered device — the "Generate Certificate" workflow shared
//! by the HTTP API and `tms-gateway device cert`.

use std::sync::Arc;

use time::{Date, Month, OffsetDateTime, Time};
use tms_certs::{Ca, CertError, DeviceKey, IssuedCert};
use tms_model::DeviceSerial;
use tms_store::{CertificateRecord, DeviceDetails, DeviceRecord, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ProvisioningError {
    #[error("device {0} is not registered")]
    UnknownDevice(String),
    #[error("device {serial} has an unreadable lease (start date {start_date:?})")]
    StartDate { serial: String, start_date: String },
    #[error(
        "the lease of device {serial} ended on {lease_end}; renew it before issuing a certificate"
    )]
    LeaseEnded { serial: String, lease_end: Date },
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the signing task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// Parses `YYYY-MM-DD`.
pub fn parse_date(s: &str) -> Option<Date> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    Date::parse(s, &format).ok()
}

/// The day the lease ends: start date plus `months`, clamped to the month's last day.
pub fn lease_end(start: Date, months: i64) -> Date {
    let total = i64::from(start.year()) * 12 + i64::from(u8::from(start.month()) - 1) + months;
    let year = i32::try_from(total.div_euclid(12))
        .unwrap_or(9999)
        .min(9999);
    let month = Month::try_from(u8::try_from(total.rem_euclid(12) + 1).unwrap_or(1))
        .unwrap_or(Month::January);
    let last_day = time::util::days_in_month(month, year);
    Date::from_calendar_date(year, month, start.day().min(last_day)).unwrap_or(start)
}

/// When a lease that starts on `start_date` (YYYY-MM-DD) for `months` ends: midnight UTC at
/// the start of the end day, in Unix ms. `None` for an unreadable date.
pub fn lease_ends_at_ms(start_date: &str, months: i64) -> Option<i64> {
    let end = lease_end(parse_date(start_date)?, months)
        .with_time(Time::MIDNIGHT)
        .assume_utc();
    Some(end.unix_timestamp() * 1000)
}

/// A device of `device_type` leased for `months` from `start_date` (`YYYY-MM-DD`; `None` if
/// it is not a date), with its lease end worked out; the caller adds UPS and order details.
pub fn leased(device_type: String, start_date: String, months: i64) -> Option<DeviceDetails> {
    Some(DeviceDetails {
        lease_ends_at: lease_ends_at_ms(&start_date, months)?,
        device_type,
        lease_months: months,
        start_date,
        ..DeviceDetails::default()
    })
}

/// `from_ms` plus `months` calendar months (same day of month, clamped), in Unix ms.
pub fn add_months_ms(from_ms: i64, months: i64) -> i64 {
    let from = OffsetDateTime::from_unix_timestamp(from_ms.div_euclid(1000))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let end = lease_end(from.date(), months)
        .with_time(from.time())
        .assume_utc();
    end.unix_timestamp() * 1000
}

/// Renews a device's lease by `months` (1–120) from its end, or from now if it has ended.
/// Returns the new end, Unix ms. A new certificate is then valid until the new end.
pub async fn renew_lease(
    store: &Store,
    serial: &DeviceSerial,
    months: i64,
    now_ms: i64,
) -> Result<i64, ProvisioningError> {
    Ok(store
        .renew_lease(serial.as_str(), months, now_ms, |from| {
            add_months_ms(from, months)
        })
        .await?)
}

/// The location source of a position set by a person (API `PUT …/location`, `device add
/// --lat --lon`, `device locate`): ranked below what the device itself reports.
pub const MANUAL_LOCATION_SOURCE: &str = "operator";

/// Sets a device's location by hand, as the API and the command line both do.
pub async fn set_manual_location(
    store: &Store,
    serial: &DeviceSerial,
    point: tms_model::LatLon,
    now_ms: i64,
) -> Result<(), StoreError> {
    store
        .set_location(
            serial.as_str(),
            point.lat(),
            point.lon(),
            MANUAL_LOCATION_SOURCE,
            now_ms,
        )
        .await
}

/// When a certificate for this device must stop being valid: the end of its lease (UTC).
pub fn lease_not_after(device: &DeviceRecord) -> Result<OffsetDateTime, ProvisioningError> {
    OffsetDateTime::from_unix_timestamp(device.details.lease_ends_at.div_euclid(1000)).map_err(
        |_| ProvisioningError::StartDate {
            serial: device.serial.clone(),
            start_date: device.details.start_date.clone(),
        },
    )
}

/// A certificate signed for a device but not yet recorded. Until [`SignedCertificate::record`]
/// nothing is known of it: a caller that cannot hand it out (files it cannot write, a
/// response it cannot build) drops it, and the device's working certificate is untouched.
#[derive(Debug)]
pub struct SignedCertificate {
    pub issued: IssuedCert,
    /// The device's certificates that are valid now; recording this one starts their
    /// rotation overlap (CONTRACT §5).
    pub earlier: Vec<CertificateRecord>,
    record: CertificateRecord,
}

impl SignedCertificate {
    /// When the issue is recorded (Unix ms): the rotation overlap of `earlier` counts from it.
    pub fn issued_at(&self) -> i64 {
        self.record.issued_at
    }

    /// Records the certificate (never its private key): from now on it is the device's newest.
    pub async fn record(self, store: &Store) -> Result<IssuedCert, ProvisioningError> {
        store.add_certificate(&self.record).await?;
        metrics::counter!("tms_certs_issued_total").increment(1);
        Ok(self.issued)
    }
}

/// When an earlier certificate is revoked as superseded at the latest, Unix ms: `overlap`
/// after the newer one was issued (sooner if the device connects with the newer one).
pub fn retired_by(newer_issued_at: i64, overlap: std::time::Duration) -> i64 {
    newer_issued_at.saturating_add(i64::try_from(overlap.as_millis()).unwrap_or(i64::MAX))
}

/// Signs a certificate for a registered device without recording it: see
/// [`SignedCertificate`].
pub async fn sign_device_certificate(
    store: &Store,
    ca: Arc<Ca>,
    serial: &DeviceSerial,
    key: DeviceKey,
    now: OffsetDateTime,
) -> Result<SignedCertificate, ProvisioningError> {
    let device = store
        .device(serial.as_str())
        .await?
        .ok_or_else(|| ProvisioningError::UnknownDevice(serial.to_string()))?
        .device;
    let not_after = lease_not_after(&device)?;
    if not_after <= now {
        return Err(ProvisioningError::LeaseEnded {
            serial: serial.to_string(),
            lease_end: not_after.date(),
        });
    }
    let owned_serial = serial.clone();
    let issued =
        tokio::task::spawn_blocking(move || ca.issue_device(&owned_serial, key, now, not_after))
            .await
            .map_err(ProvisioningError::Task)??;
    // The store makes issue times strictly increasing per device when it records them
    // (`Store::add_certificate`), even for two issued in the same millisecond.
    let now_ms = i64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX);
    let certificates = store.certificates_of(serial.as_str()).await?;
    let issued_at = now_ms;
    let earlier = certificates
        .into_iter()
        .filter(|c| c.revoked_at.is_none() && c.not_after > now_ms)
        .collect();
    let record = CertificateRecord {
        serial_number: issued.serial_number.clone(),
        device_serial: device.serial,
        sha256_fingerprint: issued.sha256_fingerprint.clone(),
        not_before: issued.not_before.unix_timestamp() * 1000,
        not_after: issued.not_after.unix_timestamp() * 1000,
        issued_at,
        revoked_at: None,
        revocation_reason: None,
    };
    Ok(SignedCertificate {
        issued,
        earlier,
        record,
    })
}

/// Signs and records a certificate for a registered device, for callers with nothing left
/// that can fail once it is signed (keys kept in memory).
pub async fn issue_device_certificate(
    store: &Store,
    ca: Arc<Ca>,
    serial: &DeviceSerial,
    key: DeviceKey,
    now: OffsetDateTime,
) -> Result<IssuedCert, ProvisioningError> {
    sign_device_certificate(store, ca, serial, key, now)
        .await?
        .record(store)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    #[test]
    fn lease_end_adds_calendar_months() {
        assert_eq!(lease_end(date!(2026 - 12 - 01), 12), date!(2027 - 12 - 01));
        assert_eq!(lease_end(date!(2026 - 01 - 31), 1), date!(2026 - 02 - 28));
        assert_eq!(lease_end(date!(2026 - 11 - 15), 14), date!(2028 - 01 - 15));
        assert_eq!(parse_date("2026-02-30"), None);
    }
}
