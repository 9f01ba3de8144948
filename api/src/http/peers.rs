//! Refused peers: connection attempts that named no device of ours, per peer address.
//!
//! Admins only: these records belong to no tenant, and a peer address may be another
//! customer's site.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tms_registry::views;

use super::accounts::Caller;
use super::input::Query;
use super::{ApiError, ApiState};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PeersQuery {
    limit: Option<i64>,
}

/// GET /api/v1/refusals: the most recently refused peers, newest first.
pub(super) async fn list(
    State(s): State<ApiState>,
    caller: Caller,
    Query(query): Query<PeersQuery>,
) -> Result<Response, ApiError> {
    if caller.user.role != "admin" {
        return Err(ApiError::forbidden(
            "forbidden",
            "only admins see refused peers: they belong to no customer",
        ));
    }
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::validation(
            [(
                "limit".to_owned(),
                "must be a whole number from 1 to 1000".to_owned(),
            )]
            .into(),
        ));
    }
    let peers = s.store.peer_refusals(limit).await?;
    Ok(axum::Json(peers.iter().map(views::peer_refusal).collect::<Vec<_>>()).into_response())
}
