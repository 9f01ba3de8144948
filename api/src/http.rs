//! The HTTP routes. Errors are `{"error": {"code", "message"}}`; 5xx never shows internals.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use time::OffsetDateTime;
use tms_certs::{Ca, Revoked};
use tms_store::Store;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub store: Store,
    pub ca: Arc<Ca>,
    /// Set while the MQTT listener accepts connections.
    pub broker_listening: Arc<AtomicBool>,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/ca.pem", get(ca_pem))
        .route("/crl.pem", get(crl_pem))
        .with_state(state)
}

/// One error shape for every route.
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub(crate) fn internal(context: &str, e: &dyn std::error::Error) -> Self {
        // Logged in full; the caller learns only that it failed.
        tracing::error!(error = %e, source = ?e.source(), "{context}");
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message: "internal error; see the gateway log".into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, axum::Json(body)).into_response()
    }
}

async fn healthz() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

async fn readyz(State(s): State<ApiState>) -> Response {
    let store = s.store.ping().await;
    let broker = s.broker_listening.load(Ordering::Relaxed);
    let body = json!({"store": store, "broker": broker});
    let status = if store && broker {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn ca_pem(State(s): State<ApiState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        s.ca.cert_pem().to_owned(),
    )
        .into_response()
}

async fn crl_pem(State(s): State<ApiState>) -> Result<Response, ApiError> {
    let revoked = s
        .store
        .revoked_certificates()
        .await
        .map_err(|e| ApiError::internal("listing revoked certificates", &e))?;
    let revoked: Vec<Revoked> = revoked
        .into_iter()
        .map(|(serial_number, at)| Revoked {
            serial_number,
            revoked_at: OffsetDateTime::from_unix_timestamp(at / 1000)
                .unwrap_or(OffsetDateTime::UNIX_EPOCH),
        })
        .collect();
    let now = OffsetDateTime::now_utc();
    // The CRL number must grow with each new list: seconds since the epoch do.
    let number = u64::try_from(now.unix_timestamp()).unwrap_or(0);
    let ca = s.ca.clone();
    let pem = tokio::task::spawn_blocking(move || ca.crl_pem(&revoked, number, now))
        .await
        .map_err(|e| ApiError::internal("signing the CRL", &e))?
        .map_err(|e| ApiError::internal("signing the CRL", &e))?;
    Ok(([(header::CONTENT_TYPE, "application/x-pem-file")], pem).into_response())
}
