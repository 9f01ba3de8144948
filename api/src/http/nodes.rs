//! The gateway's nodes (CONTRACT §6): which share this database, whether each is alive, and
//! how many devices each holds. Admins only: a node serves every customer's devices.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use tms_registry::views;

use super::accounts::Caller;
use super::{ApiError, ApiState};

/// GET /api/v1/nodes: every node by id.
pub(super) async fn list(State(s): State<ApiState>, caller: Caller) -> Result<Response, ApiError> {
    if caller.user.account.role != "admin" {
        return Err(ApiError::forbidden(
            "forbidden",
            "only admins see the gateway's nodes: they serve every customer",
        ));
    }
    let dead_after = i64::try_from(s.node_dead_after.as_millis()).unwrap_or(i64::MAX);
    let nodes = s
        .store
        .nodes(s.clock.now_ms().saturating_sub(dead_after))
        .await?;
    Ok(axum::Json(nodes.iter().map(views::node).collect::<Vec<_>>()).into_response())
}
