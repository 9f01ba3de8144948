//! What a request sends, checked at the edge: JSON bodies and query strings.
//!
//! No string with a NUL or another control character gets past these readers into a
//! handler (and so into the store: PostgreSQL refuses NUL in text, and a NUL in a name would
//! end up in an email header). JSON bodies may carry tab, CR and LF inside strings (a CSR is
//! multi-line PEM); query values may not carry any control character. Single-line fields are
//! narrowed further where they are read (`registration::Fields::text`).

use std::collections::BTreeMap;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::ApiError;

/// Whether `c` may appear inside a JSON string of a request body.
fn allowed_in_body(c: char) -> bool {
    !c.is_control() || matches!(c, '\t' | '\n' | '\r')
}

/// The path (`user.new.email`, `alarms[2]`) of the first string value or object key in `v`
/// holding a character that [`allowed_in_body`] refuses; `prefix` is the path of `v` itself.
fn forbidden_text(v: &Value, prefix: &str) -> Option<String> {
    let bad = |s: &str| !s.chars().all(allowed_in_body);
    match v {
        Value::String(s) if bad(s) => Some(prefix.to_owned()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| forbidden_text(item, &format!("{prefix}[{i}]"))),
        Value::Object(map) => map.iter().find_map(|(k, item)| {
            let path = if prefix.is_empty() {
                k.escape_default().to_string()
            } else {
                format!("{prefix}.{}", k.escape_default())
            };
            if bad(k) {
                Some(path)
            } else {
                forbidden_text(item, &path)
            }
        }),
        _ => None,
    }
}

fn body_error(field: &str, problem: impl Into<String>) -> ApiError {
    let field = if field.is_empty() { "body" } else { field };
    ApiError::validation(BTreeMap::from([(field.to_owned(), problem.into())]))
}

/// Parses a JSON body into `T`, answering 422 that names the problem: malformed JSON, a
/// control character in a string (naming the field), or a missing or mistyped field.
pub(crate) fn body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| body_error("", e.to_string()))?;
    if let Some(field) = forbidden_text(&value, "") {
        return Err(body_error(
            &field,
            "must not contain NUL or other control characters",
        ));
    }
    T::deserialize(value).map_err(|e| body_error("", e.to_string()))
}

/// Whether a single-line text (a name, an email, a query value) holds a control character.
pub(crate) fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// `axum::extract::Query` with the answers of this API: 400 in the JSON error shape, and
/// values holding control characters refused, naming the parameter.
pub(crate) struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Query(pairs) =
            axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
                .map_err(|e| ApiError::bad_request(e.body_text()))?;
        if let Some((key, _)) = pairs.iter().find(|(k, v)| has_control(k) || has_control(v)) {
            let key = key.escape_default().to_string();
            return Err(ApiError::bad_request(format!(
                "query parameter {key}: must not contain NUL or other control characters"
            ))
            .on_field(&key));
        }
        let axum::extract::Query(value) = axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map_err(|e| ApiError::bad_request(e.body_text()))?;
        Ok(Query(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_named_by_their_field() {
        let v: Value = serde_json::from_str(
            r#"{"user": {"new": {"email": "a\u0000b@x.com"}}, "csr_pem": "-----\nA\r\n"}"#,
        )
        .unwrap();
        assert_eq!(forbidden_text(&v, "").as_deref(), Some("user.new.email"));
        let v: Value = serde_json::from_str(r#"{"csr_pem": "-----\nA\r\n\t"}"#).unwrap();
        assert_eq!(forbidden_text(&v, ""), None, "PEM line breaks are fine");
        let v: Value = serde_json::from_str(r#"{"a": ["ok", "\u001b[31m"]}"#).unwrap();
        assert_eq!(forbidden_text(&v, "").as_deref(), Some("a[1]"));
        let v: Value = serde_json::from_str(r#"{"k\u0000": 1}"#).unwrap();
        assert_eq!(forbidden_text(&v, "").as_deref(), Some("k\\u{0}"));
    }

    #[test]
    fn bodies_with_control_characters_answer_422() {
        #[derive(serde::Deserialize, Debug)]
        struct Login {
            #[expect(dead_code, reason = "only parsed")]
            email: String,
        }
        let err = body::<Login>(br#"{"email": "a\u0000@x.com"}"#).unwrap_err();
        assert!(format!("{err:?}").contains("email"), "{err:?}");
    }
}
