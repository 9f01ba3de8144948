//! The HTTP routes (CONTRACT §5). Errors are `{"error": {"code", "message"}}` with a fitting
//! status, mapped in one place ([`ApiError`]); 5xx never shows internals.

mod accounts;
mod alarms;
mod commands;
mod devices;
mod error;
mod events;
mod input;
mod nodes;
mod openapi;
mod peers;
mod public;
mod registration;

pub(crate) use error::ApiError;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::handler::Handler;
use axum::routing::{MethodFilter, MethodRouter, get, on};
use tms_certs::Ca;
use tms_store::Store;
use tokio::sync::Notify;

/// Largest request body read (413 beyond): the biggest legitimate one, a registration or a
/// CSR, is a few KiB.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub store: Store,
    pub ca: Arc<Ca>,
    /// Set while the MQTT listener accepts connections.
    pub broker_listening: Arc<AtomicBool>,
    /// Sender and link base of emails.
    pub mail: tms_registry::mail::Composer,
    /// Wakes the mailer when mail is queued.
    pub mail_queued: Arc<Notify>,
    /// Wakes the revocation watcher so the broker enforces a revocation at once.
    pub revocations_changed: Arc<Notify>,
    /// Wakes the command delivery worker when a command is queued.
    pub commands_queued: Arc<Notify>,
    pub token_ttl: Duration,
    pub activation_ttl: Duration,
    /// Base-map tile URL for the web map; `None`: the built-in country outlines.
    pub map_tile_url: Option<String>,
    /// The MQTT host name devices are told to connect to (`Mqtt::public_host`).
    pub mqtt_host: String,
    /// Bounds the argon2 work of logins, password changes and registrations.
    pub passwords: tms_registry::auth::PasswordGate,
    /// The JSON views of devices, with the presence settings they judge by.
    pub views: tms_registry::views::Views,
    /// A node whose heartbeat is older than this is shown dead (`node.dead_after_secs`).
    pub node_dead_after: Duration,
    /// Token expiry, stamps and certificate validity are judged by this clock.
    pub clock: tms_model::SharedClock,
}

/// Who may call a route (documented in the OpenAPI document; enforced by the extractors).
#[derive(Clone, Copy)]
enum Access {
    Anyone,
    LoggedIn,
}

/// One route: what the OpenAPI document says about it, and its handler, built together so
/// the document cannot drift from what is served.
struct Route {
    method: &'static str,
    path: &'static str,
    summary: &'static str,
    access: Access,
    /// Name of the request body schema in `openapi::SCHEMAS`.
    body: Option<&'static str>,
    handler: MethodRouter<ApiState>,
}

fn route<H, T>(
    method: &'static str,
    path: &'static str,
    access: Access,
    summary: &'static str,
    body: Option<&'static str>,
    handler: H,
) -> Route
where
    H: Handler<T, ApiState>,
    T: 'static,
{
    let filter = match method {
        "GET" => MethodFilter::GET,
        "POST" => MethodFilter::POST,
        "PUT" => MethodFilter::PUT,
        _ => MethodFilter::DELETE,
    };
    Route {
        method,
        path,
        summary,
        access,
        body,
        handler: on(filter, handler),
    }
}

fn routes() -> Vec<Route> {
    use Access::*;
    vec![
        route("GET", "/healthz", Anyone, "Liveness", None, public::healthz),
        route(
            "GET",
            "/readyz",
            Anyone,
            "Readiness: store reachable and broker listening",
            None,
            public::readyz,
        ),
        route(
            "GET",
            "/ca.pem",
            Anyone,
            "The CA certificate (PEM)",
            None,
            public::ca_pem,
        ),
        route(
            "GET",
            "/crl.pem",
            Anyone,
            "The current certificate revocation list (PEM)",
            None,
            public::crl_pem,
        ),
        route(
            "POST",
            "/api/v1/auth/login",
            Anyone,
            "Log in; answers a bearer token",
            Some("Login"),
            accounts::login,
        ),
        route(
            "POST",
            "/api/v1/auth/logout",
            LoggedIn,
            "Revoke the caller's token",
            None,
            accounts::logout,
        ),
        route(
            "POST",
            "/api/v1/auth/activate",
            Anyone,
            "Activate an account with the emailed token (single use)",
            Some("Activate"),
            accounts::activate,
        ),
        route(
            "POST",
            "/api/v1/accounts/activation",
            LoggedIn,
            "Provider/admin: resend a customer's activation email",
            Some("Resend"),
            accounts::resend_activation,
        ),
        route(
            "GET",
            "/api/v1/me",
            LoggedIn,
            "The caller's account",
            None,
            accounts::me,
        ),
        route(
            "POST",
            "/api/v1/me/password",
            LoggedIn,
            "Change the caller's password",
            Some("ChangePassword"),
            accounts::change_password,
        ),
        route(
            "POST",
            "/api/v1/registrations",
            LoggedIn,
            "Provider/admin: register customer + company + device",
            Some("Registration"),
            registration::register,
        ),
        route(
            "GET",
            "/api/v1/devices",
            LoggedIn,
            "Devices the caller may see, with status (?q=, ?state=)",
            None,
            devices::list,
        ),
        route(
            "GET",
            "/api/v1/refusals",
            LoggedIn,
            "Admins: refused connection attempts that named no device, per peer (?limit=1..1000)",
            None,
            peers::list,
        ),
        route(
            "GET",
            "/api/v1/nodes",
            LoggedIn,
            "Admins: the gateway nodes sharing this database, alive or dead, with their devices online",
            None,
            nodes::list,
        ),
        route(
            "GET",
            "/api/v1/devices/{serial}",
            LoggedIn,
            "Registration data, status, location, certificates",
            None,
            devices::detail,
        ),
        route(
            "GET",
            "/api/v1/devices/{serial}/status",
            LoggedIn,
            "Connection status",
            None,
            devices::status,
        ),
        route(
            "GET",
            "/api/v1/devices/{serial}/telemetry",
            LoggedIn,
            "Telemetry, newest first (?limit=1..1000)",
            None,
            devices::telemetry,
        ),
        route(
            "GET",
            "/api/v1/devices/{serial}/quarantine",
            LoggedIn,
            "Malformed payloads the device sent, newest first (?limit=1..1000)",
            None,
            devices::quarantine,
        ),
        route(
            "PUT",
            "/api/v1/devices/{serial}/location",
            LoggedIn,
            "Set the location by hand",
            Some("Location"),
            devices::set_location,
        ),
        route(
            "POST",
            "/api/v1/devices/{serial}/certificate",
            LoggedIn,
            "Generate Certificate: JSON, zip (Accept: application/zip) or from a CSR",
            Some("CertificateRequest"),
            devices::generate_certificate,
        ),
        route(
            "DELETE",
            "/api/v1/devices/{serial}/certificate",
            LoggedIn,
            "Revoke every valid certificate of the device",
            None,
            devices::revoke_certificates,
        ),
        route(
            "POST",
            "/api/v1/devices/{serial}/lease",
            LoggedIn,
            "Provider/admin: renew the lease by N months",
            Some("Lease"),
            devices::renew_lease,
        ),
        route(
            "POST",
            "/api/v1/devices/{serial}/commands",
            LoggedIn,
            "Send the device a command (202 queued; delivered QoS 1 on tms/<serial>/cmd/<name>)",
            Some("Command"),
            commands::send,
        ),
        route(
            "GET",
            "/api/v1/devices/{serial}/commands",
            LoggedIn,
            "The device's commands, newest first (?limit=1..1000)",
            None,
            commands::list,
        ),
        route(
            "GET",
            "/api/v1/devices/{serial}/availability",
            LoggedIn,
            "Uptime and sessions (?window=24h|7d|30d)",
            None,
            devices::availability,
        ),
        route(
            "GET",
            "/api/v1/devices/{serial}/events",
            LoggedIn,
            "The device's timeline, newest first: registration, certificates, sessions, refusals, alarms, commands, lease changes (?limit=1..1000)",
            None,
            events::list,
        ),
        route(
            "GET",
            "/api/v1/alarms",
            LoggedIn,
            "Alarms of the caller's devices, newest first (?state=active|cleared|all, ?limit=1..1000)",
            None,
            alarms::list,
        ),
        route(
            "POST",
            "/api/v1/alarms/{id}/ack",
            LoggedIn,
            "Acknowledge an alarm (204); it stays open until cleared",
            None,
            alarms::acknowledge,
        ),
        route(
            "GET",
            "/api/v1/locations",
            LoggedIn,
            "GeoJSON FeatureCollection of the caller's located devices",
            None,
            devices::locations,
        ),
    ]
}

/// The HTTP listener's routes; `/metrics` among them unless it has a listener of its own
/// ([`metrics_router`], `metrics.listen`).
pub fn router(state: ApiState, with_metrics: bool) -> Router {
    let mut router = Router::new();
    for r in routes() {
        router = router.route(r.path, r.handler);
    }
    if with_metrics {
        router = router.route("/metrics", get(public::metrics));
    }
    let router = router
        .route("/api/v1/openapi.json", get(openapi::document))
        .merge(crate::web::routes())
        .fallback(public::not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(crate::monitoring::track_http))
        .with_state(state);
    json_errors_around(router)
}

/// [`error::json_errors`] around the whole router, not inside it: a layer added with
/// `Router::layer` wraps each route's handlers, and axum writes a 405's `Allow` header only
/// after them, so from inside the answer could not name the allowed methods.
fn json_errors_around(router: Router) -> Router {
    Router::new()
        .fallback_service(router)
        .layer(axum::middleware::from_fn(error::json_errors))
}

/// `/metrics` alone, for a separate listener (`metrics.listen`), e.g. on a private address.
pub fn metrics_router(state: ApiState) -> Router {
    json_errors_around(
        Router::new()
            .route("/metrics", get(public::metrics))
            .fallback(public::not_found)
            .with_state(state),
    )
}
