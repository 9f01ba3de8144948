//! The JSON shapes of devices and statuses, shared by the HTTP API and `--json` on the CLI so
//! both always print the same objects.

use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tms_store::{CertificateRecord, DeviceStatus, DeviceView, LocationRecord, Refusal};

/// Unix ms as RFC 3339 (UTC), or null.
pub fn time(ms: Option<i64>) -> Value {
    ms.and_then(|ms| OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok())
        .and_then(|t| t.format(&Rfc3339).ok())
        .map_or(Value::Null, Value::String)
}

pub fn status(s: &DeviceStatus) -> Value {
    json!({
        "state": s.state.as_str(),
        "since": time(s.since),
        "last_seen": time(s.last_seen),
        "peer_addr": s.peer_addr,
        "keep_alive_secs": s.keep_alive_secs,
        "last_disconnect_reason": s.last_disconnect_reason,
        "reported_status": s.reported_status,
        "last_connect_error": s.last_connect_error,
        "last_connect_error_detail": s.last_connect_error_detail,
        "last_connect_error_at": time(s.last_connect_error_at),
    })
}

/// A device with its status, as in the device list.
pub fn device(v: &DeviceView) -> Value {
    let d = &v.device;
    let now = tms_model::now_ms();
    let days_left = |end: i64| (end - now).div_euclid(86_400_000);
    let lease_end = time(Some(d.lease_ends_at))
        .as_str()
        .map(|t| t[..10].to_owned());
    json!({
        "serial": d.serial,
        "mac": d.mac,
        "company": d.company,
        "device_type": d.device_type,
        "lease_months": d.lease_months,
        "start_date": d.start_date,
        "lease_end": lease_end,
        "lease_days_left": days_left(d.lease_ends_at),
        "certificate_not_after": time(d.certificate_not_after),
        "certificate_days_left": d.certificate_not_after.map(days_left),
        "ups": {
            "model": d.ups_model,
            "model_number": d.ups_model_number,
            "serial": d.ups_serial,
            "ship_date": d.ups_ship_date,
        },
        "sales_order": d.sales_order,
        "service_contract_sales_order": d.service_contract_sales_order,
        "created_at": time(Some(d.created_at)),
        "status": status(&v.status),
    })
}

pub fn certificate(c: &CertificateRecord) -> Value {
    json!({
        "serial_number": c.serial_number,
        "sha256_fingerprint": c.sha256_fingerprint,
        "not_before": time(Some(c.not_before)),
        "not_after": time(Some(c.not_after)),
        "issued_at": time(Some(c.issued_at)),
        "revoked_at": time(c.revoked_at),
        "revocation_reason": c.revocation_reason,
    })
}

pub fn location(l: &LocationRecord) -> Value {
    json!({
        "lat": l.lat,
        "lon": l.lon,
        "accuracy_m": l.accuracy_m,
        "source": l.source,
        "updated_at": time(Some(l.updated_at)),
    })
}

pub fn refusal(r: &Refusal) -> Value {
    json!({
        "reason": r.reason,
        "detail": r.detail,
        "peer_addr": r.peer_addr,
        "first_at": time(Some(r.first_at)),
        "last_at": time(Some(r.last_at)),
        "attempts": r.attempts,
    })
}

/// A device's detail: the list object plus location, certificates and refused attempts.
pub fn device_detail(
    v: &DeviceView,
    location: Option<&LocationRecord>,
    certificates: &[CertificateRecord],
    refusals: &[Refusal],
) -> Value {
    let mut out = device(v);
    let current = certificates.iter().find(|c| c.revoked_at.is_none());
    out["location"] = location.map_or(Value::Null, self::location);
    out["certificate"] = current.map_or(Value::Null, certificate);
    out["certificates"] = certificates.iter().map(certificate).collect();
    out["recent_refusals"] = refusals.iter().map(refusal).collect();
    out
}
