//! Refused peers: connection attempts that named no device of ours, per peer address.
//!
//! Admins only: these records belong to no tenant, and a peer address may be another
//! customer's site.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use tms_registry::views;

use super::accounts::Caller;
use super::devices::TelemetryQuery;
use super::input::Query;
use super::{ApiError, ApiState};

/// GET /api/v1/refusals: the most recently refused peers, newest first.
pub(super) async fn list(
    State(s): State<ApiState>,
    caller: Caller,
    Query(query): Query<TelemetryQuery>,
) -> Result<Response, ApiError> {
    if caller.user.account.role != "admin" {
        return Err(ApiError::forbidden(
            "forbidden",
            "only admins see refused peers: they belong to no customer",
        ));
    }
    let limit = query.limit()?;
    let peers = s.store.peer_refusals(limit).await?;
    Ok(axum::Json(peers.iter().map(views::peer_refusal).collect::<Vec<_>>()).into_response())
}
