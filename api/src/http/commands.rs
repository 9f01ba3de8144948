//! Commands to devices (CONTRACT §9): send one (`202 {id, state: "queued"}`) and list a
//! device's, newest first. Scoped like every device route ([`DeviceRequest`],
//! [`DeviceHistory`]): a device the caller may not see answers 404. The workflow itself is
//! `tms_registry::commands`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use tms_registry::commands::{self, CommandError, CommandRequest};

use super::devices::{DeviceHistory, DeviceRequest, VisibleDevice, json_rows};
use super::input::body;
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
    req: DeviceRequest,
) -> Result<Response, ApiError> {
    let VisibleDevice { caller, serial, .. } = req.device;
    let CommandBody {
        name,
        args,
        ttl_secs,
    } = body(&req.bytes)?;
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

pub(super) async fn list(h: DeviceHistory) -> Result<Response, ApiError> {
    let rows = h.store.commands_of(h.serial.as_str(), h.limit).await?;
    Ok(json_rows(&rows, commands::view))
}
