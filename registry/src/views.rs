//! The JSON shapes of devices and statuses, shared by the HTTP API and `--json` on the CLI so
//! both always print the same objects.

use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tms_store::{
    CertificateRecord, DeviceStatus, DeviceView, LocationRecord, PeerRefusal, QuarantinedPayload,
    RefusalRow, SessionRecord,
};

/// Unix ms as RFC 3339 (UTC), or null.
pub fn time(ms: Option<i64>) -> Value {
    ms.and_then(|ms| OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok())
        .and_then(|t| t.format(&Rfc3339).ok())
        .map_or(Value::Null, Value::String)
}

/// How the views judge a device's presence: the `presence.*` settings of the configuration,
/// given once by whoever builds the views (the HTTP state, the command line).
#[derive(Debug, Clone)]
pub struct Views {
    /// `presence.silent_after_intervals`: an online device is "silent" after this many of its
    /// usual telemetry intervals without telemetry.
    pub silent_after_intervals: f64,
    /// `certs.rotation_overlap_days`: how long an earlier certificate stays valid at most
    /// once a newer one is issued (said on the page before Generate replaces one).
    pub rotation_overlap: std::time::Duration,
    /// "Silent" and "days left" are judged against this clock.
    pub clock: tms_model::SharedClock,
}

impl Views {
    /// Online but without telemetry for longer than `silent_after_intervals` of its usual
    /// interval (the keep-alive when the device has no usual interval yet).
    pub fn is_silent(&self, s: &DeviceStatus, now_ms: i64) -> bool {
        if s.state != tms_model::ConnState::Online {
            return false;
        }
        let usual = s
            .telemetry_interval_ms
            .filter(|i| *i > 0)
            .or(s.keep_alive_secs.map(|k| k * 1000))
            .unwrap_or(60_000);
        let since = s.last_telemetry_at.or(s.since).unwrap_or(now_ms);
        (now_ms - since) as f64 > self.silent_after_intervals * usual as f64
    }

    pub fn status(&self, s: &DeviceStatus) -> Value {
        json!({
            "state": s.state.as_str(),
            "since": time(s.since),
            "last_seen": time(s.last_seen),
            "peer_addr": s.peer_addr,
            "keep_alive_secs": s.keep_alive_secs,
            "last_disconnect_reason": s.last_disconnect_reason,
            "reported_status": s.reported_status,
            "last_telemetry_at": time(s.last_telemetry_at),
            "telemetry_interval_secs": s.telemetry_interval_ms.map(|ms| ms as f64 / 1000.0),
            "silent": self.is_silent(s, self.clock.now_ms()),
            "last_connect_error": s.last_connect_error,
            "last_connect_error_detail": s.last_connect_error_detail,
            "last_connect_error_at": time(s.last_connect_error_at),
        })
    }

    /// A device with its status, as in the device list.
    pub fn device(&self, v: &DeviceView) -> Value {
        let d = &v.device;
        let now = self.clock.now_ms();
        let days_left = |end: i64| (end - now).div_euclid(86_400_000);
        let lease_end = time(Some(d.details.lease_ends_at))
            .as_str()
            .map(|t| t[..10].to_owned());
        json!({
            "serial": d.serial,
            "mac": d.mac,
            "company": d.company,
            "device_type": d.details.device_type,
            "lease_months": d.details.lease_months,
            "start_date": d.details.start_date,
            "lease_end": lease_end,
            "lease_days_left": days_left(d.details.lease_ends_at),
            "certificate_not_after": time(d.certificate_not_after),
            "certificate_days_left": d.certificate_not_after.map(days_left),
            "ups_identity": {
                "system_name": d.system_name,
                "mismatch": d.identity_mismatch,
            },
            "ups": {
                "model": d.details.ups_model,
                "model_number": d.details.ups_model_number,
                "serial": d.details.ups_serial,
                "ship_date": d.details.ups_ship_date,
            },
            "sales_order": d.details.sales_order,
            "service_contract_sales_order": d.details.service_contract_sales_order,
            "created_at": time(Some(d.created_at)),
            "status": self.status(&v.status),
        })
    }

    /// A device's detail: the list object plus location, certificates and refused attempts.
    pub fn device_detail(
        &self,
        v: &DeviceView,
        locations: &[LocationRecord],
        certificates: &[CertificateRecord],
        refusals: &[RefusalRow],
    ) -> Value {
        let mut out = self.device(v);
        let current = certificates.iter().find(|c| c.revoked_at.is_none());
        out["location"] = locations.first().map_or(Value::Null, self::location);
        out["locations"] = locations.iter().map(self::location).collect();
        out["certificate"] = current.map_or(Value::Null, certificate);
        out["certificates"] = certificates.iter().map(certificate).collect();
        out["recent_refusals"] = refusals.iter().map(refusal).collect();
        out["rotation_overlap_days"] = json!(self.rotation_overlap.as_secs() / 86_400);
        out
    }
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

/// A quarantined payload for people: the bytes as text (invalid UTF-8 shown as U+FFFD), and
/// their true length, since the text may differ from what was sent.
pub fn quarantined(q: &QuarantinedPayload) -> Value {
    json!({
        "topic": q.topic,
        "error": q.error,
        "payload": String::from_utf8_lossy(&q.payload),
        "payload_bytes": q.payload.len(),
        "received_at": time(Some(q.received_at)),
    })
}

pub fn refusal(r: &RefusalRow) -> Value {
    json!({
        "reason": r.reason,
        "detail": r.detail,
        "peer_addr": r.peer_addr,
        "first_at": time(Some(r.first_at)),
        "last_at": time(Some(r.last_at)),
        "attempts": r.attempts,
    })
}

/// A gateway node as `GET /api/v1/nodes` shows it (CONTRACT §6).
pub fn node(n: &tms_store::NodeRecord) -> Value {
    json!({
        "id": n.id,
        "started_at": time(Some(n.started_at)),
        "last_heartbeat_at": time(Some(n.last_heartbeat_at)),
        "state": n.state,
        "devices_online": n.devices_online,
    })
}

/// A peer whose attempts named no device of ours (fleet view, admins only).
pub fn peer_refusal(r: &PeerRefusal) -> Value {
    json!({
        "peer_ip": r.peer_ip,
        "peer_addr": r.peer_addr,
        "reason": r.reason,
        "detail": r.detail,
        "first_at": time(Some(r.first_at)),
        "last_at": time(Some(r.last_at)),
        "attempts": r.attempts,
    })
}

/// Uptime of a device within `[from, to]` from its sessions: the share of the window covered
/// by sessions (an open session counts until `to`), as a percentage.
pub fn uptime_pct(sessions: &[SessionRecord], from: i64, to: i64) -> f64 {
    if to <= from {
        return 0.0;
    }
    let mut spans: Vec<(i64, i64)> = sessions
        .iter()
        .map(|s| (s.started_at.max(from), s.ended_at.unwrap_or(to).min(to)))
        .filter(|(a, b)| b > a)
        .collect();
    spans.sort_unstable();
    // Overlapping sessions (a takeover) count once.
    let mut covered = 0;
    let mut reach = from;
    for (a, b) in spans {
        let a = a.max(reach);
        if b > a {
            covered += b - a;
            reach = b;
        }
    }
    covered as f64 * 100.0 / (to - from) as f64
}

pub fn session(s: &SessionRecord) -> Value {
    json!({
        "started_at": time(Some(s.started_at)),
        "ended_at": time(s.ended_at),
        "end_reason": s.end_reason,
        "peer_addr": s.peer_addr,
    })
}

/// An alarm as the API and the CLI show it (CONTRACT §7).
pub fn alarm(a: &tms_store::AlarmRecord) -> Value {
    serde_json::json!({
        "id": a.id,
        "serial": a.serial,
        "company": a.company,
        "code": a.code,
        "severity": a.severity,
        "state": if a.cleared_at.is_some() { "cleared" } else { "active" },
        "raised_at": time(Some(a.raised_at)),
        "cleared_at": time(a.cleared_at),
        "acknowledged_at": time(a.acknowledged_at),
        "acknowledged_by": a.acknowledged_by,
        "detail": serde_json::from_str::<Value>(&a.detail).unwrap_or(Value::Null),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(start_h: i64, end_h: Option<i64>) -> SessionRecord {
        SessionRecord {
            session_id: format!("{start_h}"),
            started_at: start_h * 3_600_000,
            ended_at: end_h.map(|h| h * 3_600_000),
            end_reason: None,
            peer_addr: None,
        }
    }

    #[test]
    fn online_two_of_the_last_four_hours_is_fifty_percent() {
        let now = 10 * 3_600_000;
        let from = now - 4 * 3_600_000;
        // Online 5–7 h (partly before the window), and 8–9 h: 1 h + 1 h inside 6–10 h.
        let sessions = [s(5, Some(7)), s(8, Some(9))];
        assert!((uptime_pct(&sessions, from, now) - 50.0).abs() < 1e-9);
        // A session still open counts until now; a takeover overlap counts once.
        let sessions = [s(8, None), s(9, Some(10))];
        assert!((uptime_pct(&sessions, from, now) - 50.0).abs() < 1e-9);
        assert_eq!(uptime_pct(&[], from, now), 0.0);
    }

    #[test]
    fn silence_is_judged_by_the_configured_number_of_intervals() {
        // Online, telemetry every 10 s, the last one 45 s ago.
        let status = DeviceStatus {
            state: tms_model::ConnState::Online,
            since: Some(0),
            last_telemetry_at: Some(55_000),
            telemetry_interval_ms: Some(10_000),
            keep_alive_secs: Some(60),
            ..DeviceStatus::never_connected()
        };
        let now = 100_000;
        let clock = tms_model::ManualClock::shared(now);
        let strict = Views {
            silent_after_intervals: 3.0,
            rotation_overlap: std::time::Duration::ZERO,
            clock: clock.clone(),
        };
        let lenient = Views {
            silent_after_intervals: 5.0,
            ..strict.clone()
        };
        assert!(strict.is_silent(&status, now));
        assert!(!lenient.is_silent(&status, now));
        assert_eq!(strict.status(&status)["silent"], Value::Bool(true));
        // The page judges by the views' clock: 10 s later the lenient views call it silent too.
        assert_eq!(lenient.status(&status)["silent"], Value::Bool(false));
        clock.advance(std::time::Duration::from_secs(10));
        assert_eq!(lenient.status(&status)["silent"], Value::Bool(true));
        // A device that is not online is never silent.
        let offline = DeviceStatus {
            state: tms_model::ConnState::Offline,
            ..status
        };
        assert!(!strict.is_silent(&offline, now));
    }
}
