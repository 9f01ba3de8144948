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
        .map(|e| json!({"at": views::time(Some(e.at)), "kind": e.kind, "detail": times(&e.detail)}))
        .collect();
    Ok(axum::Json(out).into_response())
}

/// The store keeps times in a detail as Unix ms under keys ending in `_at`; the API answers
/// every time as RFC 3339, like `at` itself.
fn times(detail: &Value) -> Value {
    let mut out = detail.clone();
    if let Some(map) = out.as_object_mut() {
        for (key, value) in map.iter_mut() {
            if let (true, Some(ms)) = (key.ends_with("_at"), value.as_i64()) {
                *value = views::time(Some(ms));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_in_a_detail_are_rfc3339() {
        let d = times(&json!({"lease_ends_at": 86_400_000, "lease_months": 24, "code": "x"}));
        assert_eq!(
            d,
            json!({"lease_ends_at": "1970-01-02T00:00:00Z", "lease_months": 24, "code": "x"})
        );
    }
}
