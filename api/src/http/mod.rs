//! The HTTP routes (CONTRACT §5). Errors are `{"error": {"code", "message"}}` with a fitting
//! status, mapped in one place ([`ApiError`]); 5xx never shows internals.

mod accounts;
mod devices;
mod error;
mod public;
mod registration;

pub(crate) use error::ApiError;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use tms_certs::Ca;
use tms_store::Store;
use tokio::sync::Notify;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub store: Store,
    pub ca: Arc<Ca>,
    /// Set while the MQTT listener accepts connections.
    pub broker_listening: Arc<AtomicBool>,
    /// Sender and link base of emails.
    pub mail: crate::mail::Composer,
    /// Wakes the mailer when mail is queued.
    pub mail_queued: Arc<Notify>,
    /// Wakes the revocation watcher so the broker enforces a revocation at once.
    pub revocations_changed: Arc<Notify>,
    pub token_ttl: Duration,
    pub activation_ttl: Duration,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(public::healthz))
        .route("/readyz", get(public::readyz))
        .route("/ca.pem", get(public::ca_pem))
        .route("/crl.pem", get(public::crl_pem))
        .route("/api/v1/auth/login", post(accounts::login))
        .route("/api/v1/auth/logout", post(accounts::logout))
        .route("/api/v1/auth/activate", post(accounts::activate))
        .route(
            "/api/v1/accounts/activation",
            post(accounts::resend_activation),
        )
        .route("/api/v1/me", get(accounts::me))
        .route("/api/v1/me/password", post(accounts::change_password))
        .route("/api/v1/registrations", post(registration::register))
        .route("/api/v1/devices", get(devices::list))
        .route("/api/v1/devices/{serial}", get(devices::detail))
        .route("/api/v1/devices/{serial}/status", get(devices::status))
        .route(
            "/api/v1/devices/{serial}/telemetry",
            get(devices::telemetry),
        )
        .route(
            "/api/v1/devices/{serial}/location",
            axum::routing::put(devices::set_location),
        )
        .route(
            "/api/v1/devices/{serial}/certificate",
            post(devices::generate_certificate).delete(devices::revoke_certificates),
        )
        .route("/api/v1/locations", get(devices::locations))
        .fallback(public::not_found)
        .with_state(state)
}
