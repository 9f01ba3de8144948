//! The fleet: list, detail, status, telemetry, quarantine, location, and Generate Certificate.
//!
//! Every route goes through [`visible_device`]: a device the caller may not see answers 404
//! exactly like one that does not exist. Customers see their company's devices, providers
//! the devices they registered, admins all.

use std::io::Write;

use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use tms_certs::DeviceKey;
use tms_model::{ConnState, DeviceSerial};
use tms_registry::provisioning::{ProvisioningError, sign_device_certificate};
use tms_registry::views;
use tms_store::{DeviceFilter, DeviceView, Store};

use super::accounts::Caller;
use super::input::{Query, body};
use super::{ApiError, ApiState};

/// The devices a caller may see.
pub(crate) fn scope(caller: &Caller) -> DeviceFilter {
    match caller.user.account.role.as_str() {
        "admin" => DeviceFilter::default(),
        "provider" => DeviceFilter {
            registered_by: Some(caller.user.id),
            ..Default::default()
        },
        // A customer without a company sees nothing (id -1 matches no company).
        _ => DeviceFilter {
            company_id: Some(caller.user.account.company_id.unwrap_or(-1)),
            ..Default::default()
        },
    }
}

fn may_see(caller: &Caller, view: &DeviceView) -> bool {
    let scope = scope(caller);
    scope.company_id.is_none_or(|c| c == view.device.company_id)
        && scope
            .registered_by
            .is_none_or(|u| Some(u) == view.device.details.registered_by)
}

/// The device if it exists and the caller may see it; 404 otherwise, either way.
pub(crate) async fn visible_device(
    s: &ApiState,
    caller: &Caller,
    serial: &str,
) -> Result<(DeviceSerial, DeviceView), ApiError> {
    let parsed = DeviceSerial::parse(serial).map_err(|_| ApiError::device_not_found(serial))?;
    match s.store.device(parsed.as_str()).await? {
        Some(view) if may_see(caller, &view) => Ok((parsed, view)),
        _ => Err(ApiError::device_not_found(serial)),
    }
}

#[derive(Deserialize)]
pub(super) struct ListQuery {
    q: Option<String>,
    state: Option<String>,
}

pub(super) async fn list(
    State(s): State<ApiState>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let mut filter = scope(&caller);
    filter.q = query.q.filter(|q| !q.trim().is_empty());
    if let Some(state) = query.state.as_deref() {
        filter.state = Some(ConnState::parse(state).ok_or_else(|| {
            ApiError::validation(
                [(
                    "state".to_owned(),
                    format!("{state:?} is not one of online, offline, never_connected"),
                )]
                .into(),
            )
        })?);
    }
    let devices = s.store.devices(&filter).await?;
    Ok(axum::Json(
        devices
            .iter()
            .map(|d| s.views.device(d))
            .collect::<Vec<_>>(),
    )
    .into_response())
}

pub(super) async fn detail(
    State(s): State<ApiState>,
    VisibleDevice { serial, view, .. }: VisibleDevice,
) -> Result<Response, ApiError> {
    let locations = s.store.locations_of(serial.as_str()).await?;
    let certificates = s.store.certificates_of(serial.as_str()).await?;
    let refusals = s.store.refusals(serial.as_str(), 10).await?;
    let commands = s
        .store
        .commands_of(serial.as_str(), tms_registry::commands::SHOWN_WITH_DEVICE)
        .await?;
    let mut detail = s
        .views
        .device_detail(&view, &locations, &certificates, &refusals);
    detail["commands"] = commands.iter().map(tms_registry::commands::view).collect();
    Ok(axum::Json(detail).into_response())
}

pub(super) async fn status(
    State(s): State<ApiState>,
    VisibleDevice { view, .. }: VisibleDevice,
) -> Result<Response, ApiError> {
    Ok(axum::Json(s.views.status(&view.status)).into_response())
}

/// `?limit=1..1000` of the history routes (telemetry, quarantine, refused peers); 100 if
/// absent.
#[derive(Deserialize)]
pub(crate) struct TelemetryQuery {
    limit: Option<String>,
}

const TELEMETRY_MAX: i64 = 1000;

impl TelemetryQuery {
    pub(super) fn limit(&self) -> Result<i64, ApiError> {
        match self.limit.as_deref() {
            None => Ok(100),
            Some(l) => match l.parse::<i64>() {
                Ok(n) if (1..=TELEMETRY_MAX).contains(&n) => Ok(n),
                _ => Err(ApiError::validation(
                    [(
                        "limit".to_owned(),
                        format!("must be a whole number from 1 to {TELEMETRY_MAX}"),
                    )]
                    .into(),
                )),
            },
        }
    }
}

/// Who asks and the serial the path names: the first steps of every device route, in this
/// order (401/403 before anything about the path).
async fn caller_and_serial(parts: &mut Parts, s: &ApiState) -> Result<(Caller, String), Response> {
    let caller = Caller::from_request_parts(parts, s)
        .await
        .map_err(IntoResponse::into_response)?;
    let Path(serial) = Path::<String>::from_request_parts(parts, s)
        .await
        .map_err(IntoResponse::into_response)?;
    Ok((caller, serial))
}

/// The device a `/devices/{serial}` route names, if the caller may see it (404 otherwise).
pub(crate) struct VisibleDevice {
    pub(crate) caller: Caller,
    pub(crate) serial: DeviceSerial,
    pub(crate) view: DeviceView,
}

impl VisibleDevice {
    /// The device for `caller`: a 404 unless it exists and they may see it.
    async fn find(s: &ApiState, caller: Caller, serial: &str) -> Result<Self, Response> {
        match visible_device(s, &caller, serial).await {
            Ok((serial, view)) => Ok(VisibleDevice {
                caller,
                serial,
                view,
            }),
            Err(e) => Err(e.into_response()),
        }
    }
}

impl FromRequestParts<ApiState> for VisibleDevice {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, s: &ApiState) -> Result<Self, Self::Rejection> {
        let (caller, serial) = caller_and_serial(parts, s).await?;
        VisibleDevice::find(s, caller, &serial).await
    }
}

/// A device route with a body: the device, if the caller may see it, and the body as read, not
/// yet parsed (it is read before the device is looked up, parsed by the handler after).
pub(crate) struct DeviceRequest {
    pub(crate) device: VisibleDevice,
    pub(crate) bytes: bytes::Bytes,
}

impl FromRequest<ApiState> for DeviceRequest {
    type Rejection = Response;

    async fn from_request(req: Request, s: &ApiState) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = req.into_parts();
        let (caller, serial) = caller_and_serial(&mut parts, s).await?;
        let bytes = bytes::Bytes::from_request(Request::from_parts(parts, body), s)
            .await
            .map_err(IntoResponse::into_response)?;
        let device = VisibleDevice::find(s, caller, &serial).await?;
        Ok(DeviceRequest { device, bytes })
    }
}

/// What a device's history route (`/devices/{serial}/...?limit=`) works on: the device, if
/// the caller may see it (404 otherwise, before the limit is looked at), how many of its rows
/// to answer with, and the store to read them from.
pub(crate) struct DeviceHistory {
    pub(crate) store: Store,
    pub(crate) serial: DeviceSerial,
    pub(crate) limit: i64,
}

impl FromRequestParts<ApiState> for DeviceHistory {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, s: &ApiState) -> Result<Self, Self::Rejection> {
        let (caller, serial) = caller_and_serial(parts, s).await?;
        let Query(query) = Query::<TelemetryQuery>::from_request_parts(parts, s)
            .await
            .map_err(IntoResponse::into_response)?;
        let device = VisibleDevice::find(s, caller, &serial).await?;
        let limit = query.limit().map_err(IntoResponse::into_response)?;
        Ok(DeviceHistory {
            store: s.store.clone(),
            serial: device.serial,
            limit,
        })
    }
}

/// A JSON array of `rows`, each as `view` shows it.
pub(crate) fn json_rows<T>(rows: &[T], view: impl Fn(&T) -> Value) -> Response {
    axum::Json(rows.iter().map(view).collect::<Vec<_>>()).into_response()
}

pub(super) async fn telemetry(h: DeviceHistory) -> Result<Response, ApiError> {
    let rows = h.store.telemetry(h.serial.as_str(), h.limit).await?;
    Ok(json_rows(
        &rows,
        |r| json!({"ts": views::time(Some(r.ts)), "received_at": views::time(Some(r.received_at)), "payload": r.payload}),
    ))
}

#[derive(Deserialize)]
pub(super) struct LocationBody {
    lat: f64,
    lon: f64,
}

/// Malformed payloads the device sent, newest first: each as text (invalid UTF-8 replaced,
/// so a person can read what came), with its length in bytes, topic, reason and arrival.
pub(super) async fn quarantine(h: DeviceHistory) -> Result<Response, ApiError> {
    let rows = h.store.quarantine(h.serial.as_str(), h.limit).await?;
    Ok(json_rows(&rows, views::quarantined))
}

pub(super) async fn set_location(
    State(s): State<ApiState>,
    req: DeviceRequest,
) -> Result<Response, ApiError> {
    let serial = req.device.serial;
    let LocationBody { lat, lon } = body(&req.bytes)?;
    let point = tms_model::LatLon::new(lat, lon).map_err(|e| {
        ApiError::validation(std::collections::BTreeMap::from([(
            e.field().to_owned(),
            e.to_string(),
        )]))
    })?;
    tms_registry::provisioning::set_manual_location(&s.store, &serial, point, s.clock.now_ms())
        .await?;
    let location = s.store.location(serial.as_str()).await?;
    Ok(axum::Json(location.as_ref().map_or(Value::Null, views::location)).into_response())
}

/// GeoJSON of the caller's devices that have a location.
pub(super) async fn locations(
    State(s): State<ApiState>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let devices = s.store.devices(&scope(&caller)).await?;
    let locations = s.store.all_locations().await?;
    let features: Vec<Value> = devices
        .iter()
        .filter_map(|d| {
            let l = locations.get(&d.device.serial)?;
            Some(json!({
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": [l.lon, l.lat]},
                "properties": {
                    "serial": d.device.serial,
                    "state": d.status.state.as_str(),
                    "ups_model": d.device.details.ups_model,
                    "company": d.device.company,
                    "source": l.source,
                    "updated_at": views::time(Some(l.updated_at)),
                },
            }))
        })
        .collect();
    Ok(axum::Json(json!({"type": "FeatureCollection", "features": features})).into_response())
}

#[derive(Deserialize)]
struct CsrBody {
    csr_pem: String,
}

fn wants_zip(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/zip"))
}

/// Generate Certificate: a key pair made here (handed out once, never kept) or a CSR.
pub(super) async fn generate_certificate(
    State(s): State<ApiState>,
    headers: HeaderMap,
    req: DeviceRequest,
) -> Result<Response, ApiError> {
    let VisibleDevice { caller, serial, .. } = req.device;
    let key = if req.bytes.iter().all(u8::is_ascii_whitespace) {
        DeviceKey::Generate
    } else {
        let CsrBody { csr_pem } = body(&req.bytes)?;
        DeviceKey::Csr(csr_pem)
    };
    let signed = match sign_device_certificate(
        &s.store,
        s.ca.clone(),
        &serial,
        key,
        s.clock.now_utc(),
    )
    .await
    {
        Ok(signed) => signed,
        Err(ProvisioningError::Cert(
            e @ (tms_certs::CertError::Csr(_) | tms_certs::CertError::CsrSubject { .. }),
        )) => {
            return Err(ApiError::validation(
                [("csr_pem".to_owned(), e.to_string())].into(),
            ));
        }
        Err(e @ ProvisioningError::LeaseEnded { .. }) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "lease_ended",
                e.to_string(),
            ));
        }
        Err(ProvisioningError::Store(e)) => return Err(e.into()),
        Err(e) => return Err(ApiError::internal("issuing a certificate", &e)),
    };
    let ca_pem = s.ca.cert_pem();
    // The private key exists only in this response: never cache it anywhere.
    let no_store = [(header::CACHE_CONTROL, "no-store")];
    // The answer is built before the certificate is recorded: if building it fails, the
    // device's earlier certificate stays its newest and nothing starts its retirement.
    let issued = &signed.issued;
    let response = if wants_zip(&headers) {
        let zip = zip_files(
            &serial,
            issued.private_key_pem.as_deref(),
            &format!("{}{ca_pem}", issued.certificate_pem),
            ca_pem,
        )
        .map_err(|e| ApiError::internal("building the zip", &e))?;
        let disposition = format!("attachment; filename=\"{serial}.zip\"");
        (
            no_store,
            [
                (header::CONTENT_TYPE, "application/zip".to_owned()),
                (header::CONTENT_DISPOSITION, disposition),
            ],
            zip,
        )
            .into_response()
    } else {
        (
            StatusCode::CREATED,
            no_store,
            axum::Json(json!({
                "private_key_pem": issued.private_key_pem,
                "certificate_pem": issued.certificate_pem,
                "ca_pem": ca_pem,
                "serial_number": issued.serial_number,
                "not_before": views::time(Some(issued.not_before.unix_timestamp() * 1000)),
                "not_after": views::time(Some(issued.not_after.unix_timestamp() * 1000)),
                "sha256_fingerprint": issued.sha256_fingerprint,
            })),
        )
            .into_response()
    };
    let issued = signed.record(&s.store).await.map_err(|e| match e {
        ProvisioningError::Store(e) => ApiError::from(e),
        other => ApiError::internal("recording a certificate", &other),
    })?;
    tracing::info!(device.serial = %serial, cert.serial = %issued.serial_number, by = caller.user.id, "certificate issued");
    Ok(response)
}

fn zip_files(
    serial: &DeviceSerial,
    key: Option<&str>,
    chain: &str,
    ca: &str,
) -> Result<Vec<u8>, zip::result::ZipError> {
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let private = zip::write::SimpleFileOptions::default().unix_permissions(0o600);
    let public = zip::write::SimpleFileOptions::default().unix_permissions(0o644);
    if let Some(key) = key {
        out.start_file(format!("{serial}.key"), private)?;
        out.write_all(key.as_bytes())?;
    }
    out.start_file(format!("{serial}.pem"), public)?;
    out.write_all(chain.as_bytes())?;
    out.start_file("ca.pem", public)?;
    out.write_all(ca.as_bytes())?;
    Ok(out.finish()?.into_inner())
}

/// Revokes every valid certificate of the device; the broker closes its session at once.
pub(super) async fn revoke_certificates(
    State(s): State<ApiState>,
    VisibleDevice { caller, serial, .. }: VisibleDevice,
) -> Result<Response, ApiError> {
    let revoked = s
        .store
        .revoke_device_certificates(serial.as_str(), "revoked by operator", s.clock.now_ms())
        .await?;
    s.revocations_changed.notify_one();
    metrics::counter!("tms_certs_revoked_total").increment(revoked.len() as u64);
    tracing::info!(device.serial = %serial, count = revoked.len(), by = caller.user.id, "certificates revoked");
    Ok(axum::Json(json!({"revoked": revoked})).into_response())
}

#[derive(Deserialize)]
pub(super) struct LeaseBody {
    months: i64,
}

/// Provider/admin: extend the device's lease by `months` (1–120).
pub(super) async fn renew_lease(
    State(s): State<ApiState>,
    req: DeviceRequest,
) -> Result<Response, ApiError> {
    let VisibleDevice { caller, serial, .. } = req.device;
    caller.require_staff("only providers and admins renew leases")?;
    let LeaseBody { months } = body(&req.bytes)?;
    if !(1..=120).contains(&months) {
        return Err(ApiError::validation(
            [(
                "months".to_owned(),
                "must be a whole number from 1 to 120".to_owned(),
            )]
            .into(),
        ));
    }
    let ends = tms_registry::provisioning::renew_lease(&s.store, &serial, months, s.clock.now_ms())
        .await
        .map_err(|e| match e {
            ProvisioningError::Store(e) => ApiError::from(e),
            other => ApiError::internal("renewing a lease", &other),
        })?;
    tracing::info!(device.serial = %serial, months, by = caller.user.id, "lease renewed");
    Ok(axum::Json(json!({"lease_ends_at": views::time(Some(ends))})).into_response())
}

#[derive(Deserialize)]
pub(super) struct AvailabilityQuery {
    window: Option<String>,
}

/// Uptime and sessions over the last 24 h, 7 d or 30 d.
pub(super) async fn availability(
    State(s): State<ApiState>,
    caller: Caller,
    Path(serial): Path<String>,
    Query(query): Query<AvailabilityQuery>,
) -> Result<Response, ApiError> {
    let (serial, _) = visible_device(&s, &caller, &serial).await?;
    let window = query.window.unwrap_or_else(|| "24h".into());
    let hours = match window.as_str() {
        "24h" => 24,
        "7d" => 7 * 24,
        "30d" => 30 * 24,
        other => {
            return Err(ApiError::validation(
                [(
                    "window".to_owned(),
                    format!("{other:?} is not one of 24h, 7d, 30d"),
                )]
                .into(),
            ));
        }
    };
    let to = s.clock.now_ms();
    let from = to - hours * 3_600_000;
    let sessions = s.store.sessions(serial.as_str(), from, to).await?;
    let pct = views::uptime_pct(&sessions, from, to);
    Ok(axum::Json(json!({
        "window": window,
        "from": views::time(Some(from)),
        "to": views::time(Some(to)),
        "uptime_pct": (pct * 10_000.0).round() / 10_000.0,
        "sessions": sessions.iter().map(views::session).collect::<Vec<_>>(),
    }))
    .into_response())
}
