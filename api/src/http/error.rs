//! The one place where failures become HTTP statuses.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tms_store::StoreError;

#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    fields: BTreeMap<String, String>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            fields: BTreeMap::new(),
        }
    }

    pub(crate) fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "log in first: Authorization: Bearer <token>",
        )
    }

    pub(crate) fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, message)
    }

    /// The same answer for "does not exist" and "not yours": no existence oracle.
    pub(crate) fn device_not_found(serial: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("device {serial:?} not found"),
        )
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 422 naming every offending field.
    pub(crate) fn validation(fields: BTreeMap<String, String>) -> Self {
        let message = fields
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join("; ");
        ApiError {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: "validation_failed",
            message,
            fields,
        }
    }

    /// Names the request field the error is about (`error.fields`), so a form can show the
    /// message next to it.
    pub(crate) fn on_field(mut self, key: &str) -> Self {
        self.fields.insert(key.to_owned(), self.message.clone());
        self
    }

    pub(crate) fn internal(context: &str, e: &dyn std::error::Error) -> Self {
        // Logged in full; the caller learns only that it failed.
        tracing::error!(error = %e, source = ?e.source(), "{context}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the gateway log",
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict { what } => Self::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("{what} already exists"),
            ),
            StoreError::NotFound { what } => Self::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("{what} not found"),
            ),
            other => match other.fault() {
                // A condition of the store that passes (disk full, database down): say so,
                // so a client retries, instead of a 500 that looks like a bug.
                Some(fault) => {
                    tracing::warn!(fault = fault.as_str(), error = %other, source = ?std::error::Error::source(&other), "store unavailable for a request");
                    Self::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "store_unavailable",
                        format!(
                            "the database cannot serve this request right now ({}); try again shortly",
                            fault.as_str().replace('_', " ")
                        ),
                    )
                }
                None => Self::internal("store", &other),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({"code": self.code, "message": self.message});
        if !self.fields.is_empty() {
            error["fields"] = json!(self.fields);
        }
        (self.status, axum::Json(json!({ "error": error }))).into_response()
    }
}
