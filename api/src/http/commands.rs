//! Commands to devices (CONTRACT §9): send one (`202 {id, state: "queued"}`) and list a
//! device's, newest first. Scoped like every device route ([`visible_device`]): a device the
//! caller may not see answers 404. The workflow itself is `tms_registry::commands`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use tms_registry::commands::{self, CommandError, CommandRequest};

use super::accounts::Caller;
use super::devices::{TelemetryQuery, visible_device};
use super::input::{Query, body};
use super::{ApiError, ApiState};

#[derive(Deserialize)]
struct CommandBody {
    name: String,
    #[serde(default)]
    args: Option<Value>,
    #[serde(default)]
    ttl_secs: Option<i64>,
}

pub(super) async fn send(
    State(s): State<ApiState>,
    caller: Caller,
    Path(serial): Path<String>,
    bytes: bytes::Bytes,
) -> Result<Response, ApiError> {
    let (serial, _) = visible_device(&s, &caller, &serial).await?;
    let CommandBody {
        name,
        args,
        ttl_secs,
    } = body(&bytes)?;
    let queued = CommandRequest::new(&name, args, ttl_secs);
    let record = match queued {
        Ok(request) => {
            commands::queue(
                &s.store,
                &serial,
                request,
                &caller.user.account.email,
                s.clock.now_ms(),
            )
            .await
        }
        Err(e) => Err(e),
    }
    .map_err(|e| match e {
        CommandError::Invalid { field, problem } => {
            ApiError::validation([(field.to_owned(), format!("{field} {problem}"))].into())
        }
        CommandError::Store(e) => ApiError::from(e),
    })?;
    s.commands_queued.notify_one();
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(json!({"id": record.id, "state": "queued"})),
    )
        .into_response())
}

pub(super) async fn list(
    State(s): State<ApiState>,
    caller: Caller,
    Path(serial): Path<String>,
    Query(query): Query<TelemetryQuery>,
) -> Result<Response, ApiError> {
    let (serial, limit) = query.visible(&s, &caller, &serial).await?;
    let rows = s.store.commands_of(serial.as_str(), limit).await?;
    let out: Vec<Value> = rows.iter().map(commands::view).collect();
    Ok(axum::Json(out).into_response())
}
