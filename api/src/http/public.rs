//! Routes anyone may call: health, readiness, the CA certificate and the CRL.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use time::OffsetDateTime;
use tms_certs::Revoked;

use super::{ApiError, ApiState};

pub(super) async fn healthz() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

pub(super) async fn readyz(State(s): State<ApiState>) -> Response {
    // An unreachable database must not hang the probe: two seconds, then "not ready".
    let store = tokio::time::timeout(std::time::Duration::from_secs(2), s.store.ping())
        .await
        .unwrap_or(false);
    let broker = s.broker_listening.load(Ordering::Relaxed);
    // Reachable but refusing writes (disk full, read-only) is not ready either: devices'
    // messages are not being acknowledged.
    let write_fault = s.store.write_fault();
    let status = if store && broker && write_fault.is_none() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(json!({
            "store": store && write_fault.is_none(),
            "store_fault": write_fault.map(|f| f.as_str()),
            "broker": broker,
        })),
    )
        .into_response()
}

pub(super) async fn ca_pem(State(s): State<ApiState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        s.ca.cert_pem().to_owned(),
    )
        .into_response()
}

pub(super) async fn crl_pem(State(s): State<ApiState>) -> Result<Response, ApiError> {
    let revoked: Vec<Revoked> = s
        .store
        .revocations()
        .await?
        .into_iter()
        .map(|(serial_number, at, _)| Revoked {
            serial_number,
            revoked_at: OffsetDateTime::from_unix_timestamp(at / 1000)
                .unwrap_or(OffsetDateTime::UNIX_EPOCH),
        })
        .collect();
    let now = s.clock.now_utc();
    // The CRL number must grow with each new list: seconds since the epoch do.
    let number = u64::try_from(now.unix_timestamp()).unwrap_or(0);
    let ca = s.ca.clone();
    let pem = tokio::task::spawn_blocking(move || ca.crl_pem(&revoked, number, now))
        .await
        .map_err(|e| ApiError::internal("signing the CRL", &e))?
        .map_err(|e| ApiError::internal("signing the CRL", &e))?;
    Ok(([(header::CONTENT_TYPE, "application/x-pem-file")], pem).into_response())
}

pub(super) async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

pub(super) async fn metrics(State(s): State<ApiState>) -> Response {
    // Bounded: a scrape must answer even when the store does not.
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        crate::monitoring::refresh_fleet_gauges(&s.store, s.clock.now_ms()),
    )
    .await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::monitoring::render(),
    )
        .into_response()
}
