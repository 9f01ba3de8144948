//! Alarms (CONTRACT §7): the caller's devices' alarms, and acknowledging one.
//!
//! Scoped exactly like the device routes ([`super::devices::scope`]): an alarm of a device the
//! caller may not see answers 404, like one that does not exist.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;
use tms_registry::views;
use tms_store::AlarmFilter;

use super::accounts::Caller;
use super::devices::scope;
use super::input::Query;
use super::{ApiError, ApiState};

#[derive(Deserialize)]
pub(super) struct ListQuery {
    state: Option<String>,
    limit: Option<String>,
}

const LIMIT_MAX: i64 = 1000;

fn invalid(field: &str, message: String) -> ApiError {
    ApiError::validation([(field.to_owned(), message)].into())
}

/// `?state=active|cleared|all` (all by default), `?limit=1..1000` (200 by default).
pub(super) fn filter(
    caller: &Caller,
    state: Option<&str>,
    limit: Option<&str>,
) -> Result<AlarmFilter, ApiError> {
    let devices = scope(caller);
    let active = match state.unwrap_or("all") {
        "active" => Some(true),
        "cleared" => Some(false),
        "all" => None,
        other => {
            return Err(invalid(
                "state",
                format!("{other:?} is not one of active, cleared, all"),
            ));
        }
    };
    let limit = match limit {
        None => 200,
        Some(l) => match l.parse::<i64>() {
            Ok(n) if (1..=LIMIT_MAX).contains(&n) => n,
            _ => {
                return Err(invalid(
                    "limit",
                    format!("must be a whole number from 1 to {LIMIT_MAX}"),
                ));
            }
        },
    };
    Ok(AlarmFilter {
        company_id: devices.company_id,
        registered_by: devices.registered_by,
        serial: None,
        active,
        limit,
    })
}

pub(super) async fn list(
    State(s): State<ApiState>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let filter = filter(&caller, query.state.as_deref(), query.limit.as_deref())?;
    let alarms = s.store.alarms(&filter).await?;
    Ok(axum::Json(alarms.iter().map(views::alarm).collect::<Vec<Value>>()).into_response())
}

fn alarm_not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("alarm {id:?} not found"),
    )
}

/// Acknowledges an alarm of a device the caller may see: 204; it stays open until cleared.
pub(super) async fn acknowledge(
    State(s): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let Ok(n) = id.parse::<i64>() else {
        return Err(alarm_not_found(&id));
    };
    let Some((alarm, registered_by)) = s.store.alarm(n).await? else {
        return Err(alarm_not_found(&id));
    };
    let devices = scope(&caller);
    let visible = devices.company_id.is_none_or(|c| c == alarm.company_id)
        && devices
            .registered_by
            .is_none_or(|u| Some(u) == registered_by);
    if !visible {
        return Err(alarm_not_found(&id));
    }
    s.store
        .acknowledge_alarm(n, &caller.user.account.email, s.clock.now_ms())
        .await?;
    tracing::info!(alarm.id = n, device.serial = %alarm.serial, code = %alarm.code, by = caller.user.id, "alarm acknowledged");
    Ok(StatusCode::NO_CONTENT.into_response())
}
