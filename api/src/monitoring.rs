//! Prometheus metrics: the process-wide recorder, the `/metrics` text, the HTTP request
//! middleware, and the fleet gauges that come from the store rather than from events.
//!
//! Names follow `tms_<subsystem>_<name>_<unit>`; labels come only from small fixed sets
//! (reason, kind, state, route template, status class) — never a serial or a raw path.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tms_store::Store;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const ROWS_BUCKETS: &[f64] = &[1.0, 5.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0];

/// Installs the process-wide recorder once; later calls return the same handle. `None` if
/// another recorder was installed first (metrics then go there).
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("_rows".into()), ROWS_BUCKETS)
                });
            match builder.map(|b| b.install_recorder()) {
                Ok(Ok(handle)) => {
                    describe();
                    Some(handle)
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    None
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics buckets rejected");
                    None
                }
            }
        })
        .clone()
}

enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric this process records, with its help text.
const DESCRIPTIONS: &[(Kind, &str, &str)] = &[
    (
        Kind::Gauge,
        "tms_broker_connections",
        "Devices connected right now",
    ),
    (
        Kind::Counter,
        "tms_api_password_checks_refused_total",
        "Logins, password changes and registrations turned away (429) because every argon2 worker and place in line was taken",
    ),
    (
        Kind::Counter,
        "tms_broker_connects_accepted_total",
        "Sessions established (CONNACK sent)",
    ),
    (
        Kind::Counter,
        "tms_broker_connects_refused_total",
        "Refused handshakes, CONNECTs and packets, by reason",
    ),
    (
        Kind::Counter,
        "tms_broker_disconnects_total",
        "Ended sessions, by reason",
    ),
    (
        Kind::Histogram,
        "tms_broker_handshake_duration_seconds",
        "TLS handshake time",
    ),
    (
        Kind::Counter,
        "tms_broker_messages_received_total",
        "Device publishes accepted, by topic kind",
    ),
    (
        Kind::Counter,
        "tms_broker_acl_denied_total",
        "Publishes and subscribes outside the device's topics",
    ),
    (
        Kind::Counter,
        "tms_broker_bytes_received_total",
        "Bytes read from devices",
    ),
    (
        Kind::Gauge,
        "tms_ingest_queue_depth",
        "Events waiting for ingest",
    ),
    (
        Kind::Histogram,
        "tms_ingest_batch_rows",
        "Rows per ingest commit",
    ),
    (
        Kind::Histogram,
        "tms_ingest_commit_duration_seconds",
        "Time per ingest commit",
    ),
    (
        Kind::Gauge,
        "tms_store_wal_frames",
        "Pages in the SQLite write-ahead log at the last checkpoint",
    ),
    (
        Kind::Histogram,
        "tms_store_wal_restart_seconds",
        "Time ingest spent copying the rest of a long write-ahead log so it restarts",
    ),
    (
        Kind::Counter,
        "tms_ingest_rows_written_total",
        "Rows written by ingest",
    ),
    (
        Kind::Counter,
        "tms_ingest_write_errors_total",
        "Failed ingest commits (retried)",
    ),
    (
        Kind::Counter,
        "tms_ingest_messages_total",
        "Device messages by kind and outcome (stored, quarantined)",
    ),
    (
        Kind::Gauge,
        "tms_devices",
        "Registered devices by connection state",
    ),
    (
        Kind::Histogram,
        "tms_presence_online_latency_seconds",
        "From CONNACK to the online status committed in the store",
    ),
    (
        Kind::Gauge,
        "tms_devices_identity_mismatch",
        "Devices whose reported System Name names another UPS",
    ),
    (
        Kind::Counter,
        "tms_certs_issued_total",
        "Device certificates issued",
    ),
    (
        Kind::Counter,
        "tms_certs_revoked_total",
        "Device certificates revoked",
    ),
    (
        Kind::Gauge,
        "tms_certs_expiring_30d",
        "Valid device certificates ending within 30 days",
    ),
    (
        Kind::Gauge,
        "tms_leases_expiring_30d",
        "Device leases ending within 30 days",
    ),
    (
        Kind::Counter,
        "tms_http_requests_total",
        "HTTP requests by route template, method and status class",
    ),
    (
        Kind::Histogram,
        "tms_http_request_duration_seconds",
        "HTTP request time by route template",
    ),
    (Kind::Counter, "tms_mail_sent_total", "Emails delivered"),
    (
        Kind::Counter,
        "tms_mail_failed_total",
        "Email delivery attempts that failed (kept for retry)",
    ),
    (
        Kind::Gauge,
        "tms_mail_queued",
        "Emails waiting for delivery",
    ),
    (Kind::Gauge, "tms_alarms_active", "Open UPS alarms by code"),
    (
        Kind::Counter,
        "tms_alarm_notifications_total",
        "Alarm notices by channel (email, webhook) and outcome",
    ),
    (
        Kind::Gauge,
        "tms_build_info",
        "Version and git commit of this build",
    ),
    (
        Kind::Gauge,
        "tms_process_start_time_seconds",
        "Start time of the process, Unix seconds",
    ),
];

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    for (kind, name, help) in DESCRIPTIONS {
        match kind {
            Kind::Counter => describe_counter!(*name, *help),
            Kind::Gauge => describe_gauge!(*name, *help),
            Kind::Histogram => describe_histogram!(*name, *help),
        }
    }
    // Shown at zero from the start, so a dashboard and an alert on failures have a series
    // before the first notice.
    for (channel, outcome) in [
        ("email", "queued"),
        ("email", "no_recipient"),
        ("webhook", "delivered"),
        ("webhook", "failed"),
    ] {
        metrics::counter!("tms_alarm_notifications_total", "channel" => channel, "outcome" => outcome)
            .increment(0);
    }
}

/// The Prometheus text exposition, or an empty string without a recorder.
pub fn render() -> String {
    HANDLE
        .get()
        .and_then(Option::as_ref)
        .map(PrometheusHandle::render)
        .unwrap_or_default()
}

/// Records every HTTP request by its route template (never the raw path).
pub async fn track_http(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let class = match response.status().as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    metrics::counter!("tms_http_requests_total", "route" => route.clone(), "method" => method, "status" => class).increment(1);
    metrics::histogram!("tms_http_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// Build information and start time, set once at start-up. Counters that are often zero are
/// created at zero, so dashboards and `rate()` see them before the first event.
pub fn record_process(version: &'static str, git_commit: &'static str) {
    for action in ["publish", "subscribe"] {
        metrics::counter!("tms_broker_acl_denied_total", "action" => action).increment(0);
    }
    for name in [
        "tms_broker_connects_accepted_total",
        "tms_broker_bytes_received_total",
        "tms_ingest_rows_written_total",
        "tms_ingest_write_errors_total",
        "tms_certs_issued_total",
        "tms_certs_revoked_total",
        "tms_mail_sent_total",
        "tms_mail_failed_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    metrics::gauge!("tms_broker_connections").increment(0.0);
    metrics::gauge!("tms_ingest_queue_depth").set(0.0);
    metrics::gauge!("tms_build_info", "version" => version, "git_commit" => git_commit).set(1.0);
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    metrics::gauge!("tms_process_start_time_seconds").set(start);
}

/// Sets the gauges that describe the fleet (devices by state, expiring certificates and
/// leases) from the store. Called on every scrape, so they are never stale.
pub async fn refresh_fleet_gauges(store: &Store, now_ms: i64) {
    match store.fleet_counts(now_ms).await {
        Ok(c) => {
            metrics::gauge!("tms_devices", "state" => "online").set(c.online as f64);
            metrics::gauge!("tms_devices", "state" => "offline").set(c.offline as f64);
            metrics::gauge!("tms_devices", "state" => "never_connected")
                .set(c.never_connected as f64);
            metrics::gauge!("tms_certs_expiring_30d").set(c.certificates_expiring_30d as f64);
            metrics::gauge!("tms_leases_expiring_30d").set(c.leases_expiring_30d as f64);
            metrics::gauge!("tms_devices_identity_mismatch").set(c.identity_mismatches as f64);
        }
        Err(e) => tracing::warn!(error = %e, "cannot refresh fleet gauges"),
    }
}
