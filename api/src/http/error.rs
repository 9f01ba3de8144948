//! The one place where failures become HTTP statuses — also the answers that axum makes by
//! itself (405, 413, rejected extractors), which [`json_errors`] puts in the same shape.

use std::collections::BTreeMap;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tms_store::StoreError;

#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    fields: BTreeMap<String, String>,
    /// Seconds for a `Retry-After` header (429, 503).
    retry_after: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            fields: BTreeMap::new(),
            retry_after: None,
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
            retry_after: None,
        }
    }

    /// Names the request field the error is about (`error.fields`), so a form can show the
    /// message next to it.
    pub(crate) fn on_field(mut self, key: &str) -> Self {
        self.fields.insert(key.to_owned(), self.message.clone());
        self
    }

    /// Tells the client when to try again (`Retry-After`, in whole seconds, at least 1).
    pub(crate) fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs.max(1));
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
        let mut response = (self.status, axum::Json(json!({ "error": error }))).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// The `code` of an error answer that did not come from an [`ApiError`].
fn code_for(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::NOT_ACCEPTABLE => "not_acceptable",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::CONFLICT => "conflict",
        StatusCode::LENGTH_REQUIRED => "length_required",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::URI_TOO_LONG => "uri_too_long",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "validation_failed",
        StatusCode::TOO_MANY_REQUESTS => "too_many_requests",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    }
}

/// Rewrites every error answer that is not JSON into `{"error": {"code", "message"}}`
/// (CONTRACT §5), keeping its status and the headers that tell the client what to do
/// (`Allow`, `Retry-After`, `WWW-Authenticate`). A 4xx keeps axum's text as the message (it
/// describes the request, e.g. "length limit exceeded"); a 5xx shows nothing of it.
pub(crate) async fn json_errors(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let response = next.run(req).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = if status.is_server_error() {
        None
    } else {
        // axum's rejections are one short line; anything longer is not worth echoing.
        axum::body::to_bytes(body, 1024)
            .await
            .ok()
            .and_then(|b| String::from_utf8(b.to_vec()).ok())
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
    };
    let message = match (status, text) {
        (StatusCode::METHOD_NOT_ALLOWED, _) => {
            let allowed = parts
                .headers
                .get(header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            format!("this route does not take that method; allowed: {allowed}")
        }
        (s, _) if s.is_server_error() => "internal error; see the gateway log".to_owned(),
        (_, Some(text)) => text,
        (s, None) => s.canonical_reason().unwrap_or("error").to_lowercase(),
    };
    let mut out = ApiError::new(status, code_for(status), message).into_response();
    for name in [header::ALLOW, header::RETRY_AFTER, header::WWW_AUTHENTICATE] {
        if let Some(v) = parts.headers.get(&name) {
            out.headers_mut().insert(name, v.clone());
        }
    }
    out
}
