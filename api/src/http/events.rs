//! A device's timeline (CONTRACT §8), scoped like every device route: a device the caller may
//! not see answers 404.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tms_registry::views;

use super::accounts::Caller;
use super::devices::{TelemetryQuery, visible_device};
use super::input::Query;
use super::{ApiError, ApiState};

/// `[{at, kind, detail}]`, newest first (`?limit=1..1000`, 100 by default).
pub(super) async fn list(
    State(s): State<ApiState>,
    caller: Caller,
    Path(serial): Path<String>,
    Query(query): Query<TelemetryQuery>,
) -> Result<Response, ApiError> {
    let limit = query.limit()?;
    let (serial, _) = visible_device(&s, &caller, &serial).await?;
    let events = s.store.device_events(serial.as_str(), limit).await?;
    let out: Vec<Value> = events
        .iter()
        .map(|e| json!({"at": views::time(Some(e.at)), "kind": e.kind, "detail": e.detail}))
        .collect();
    Ok(axum::Json(out).into_response())
}
