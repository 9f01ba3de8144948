//! Login, logout, activation, the caller's own account, password change — and the `Caller`
//! extractor every authenticated route uses.

use std::sync::OnceLock;

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use tms_registry::auth::{
    Busy, Ticket, hash_password, hash_password_with, new_token, token_hash, verify_password_with,
};
use tms_store::UserRecord;

use super::input::{body, has_control};
use super::{ApiError, ApiState};

/// Failed logins before an account is locked, and for how long.
const LOCK_AFTER_FAILURES: i64 = 5;
const LOCK_MS: i64 = 15 * 60 * 1000;
pub(crate) const MIN_PASSWORD_CHARS: usize = 10;
/// Longer than any email an account can have (`registration::valid_email`).
const MAX_EMAIL_BYTES: usize = 254;

/// An authenticated caller whose password is not temporary.
pub(crate) struct Caller {
    pub user: UserRecord,
}

/// An authenticated caller who may still hold a temporary password (only `/me` routes).
pub(crate) struct AnyCaller {
    pub user: UserRecord,
    pub token_hash: String,
}

fn bearer(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

impl FromRequestParts<ApiState> for AnyCaller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &ApiState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(parts).ok_or_else(ApiError::unauthorized)?;
        let hash = token_hash(token);
        let user = state
            .store
            .user_by_token(&hash, state.clock.now_ms())
            .await?
            .filter(|u| u.account.active)
            .ok_or_else(ApiError::unauthorized)?;
        Ok(AnyCaller {
            user,
            token_hash: hash,
        })
    }
}

impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &ApiState,
    ) -> Result<Self, Self::Rejection> {
        let AnyCaller { user, .. } = AnyCaller::from_request_parts(parts, state).await?;
        if user.account.must_change_password {
            return Err(ApiError::forbidden(
                "password_change_required",
                "change the temporary password first: POST /api/v1/me/password",
            ));
        }
        Ok(Caller { user })
    }
}

impl Caller {
    pub(crate) fn is_staff(&self) -> bool {
        matches!(self.user.account.role.as_str(), "admin" | "provider")
    }

    /// `Ok` for a provider or admin; a 403 `forbidden` saying `why` for anyone else.
    pub(crate) fn require_staff(&self, why: &'static str) -> Result<(), ApiError> {
        if self.is_staff() {
            Ok(())
        } else {
            Err(ApiError::forbidden("forbidden", why))
        }
    }
}

/// A hash to verify against when the account does not exist, so that the answer takes as
/// long as for a wrong password and does not reveal which emails have accounts. Made on a
/// blocking thread the first time (it is itself an argon2 hash).
fn dummy_hash() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| hash_password("not a real password").unwrap_or_default())
}

/// 429 when the [`PasswordGate`](tms_registry::auth::PasswordGate) is full: the gateway is busy, the
/// request was not looked at.
fn busy(_: Busy) -> ApiError {
    metrics::counter!("tms_api_password_checks_refused_total").increment(1);
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "busy",
        "too many password checks in progress; try again in a second",
    )
    .retry_after(1)
}

/// A place in line for argon2 work, or 429 at once.
pub(crate) fn password_ticket(s: &ApiState) -> Result<Ticket, ApiError> {
    s.passwords.enter().map_err(busy)
}

/// argon2id off the async executor, under the caller's ticket.
pub(crate) async fn hash(ticket: &Ticket, password: String) -> Result<String, ApiError> {
    ticket
        .run(move |memory| hash_password_with(memory, &password))
        .await
        .map_err(|e| ApiError::internal("password hashing task", &e))?
        .map_err(|e| ApiError::internal("password hashing", &e))
}

/// Checks `password` against `stored`, or against a dummy hash when there is no account.
async fn verify(
    ticket: &Ticket,
    password: String,
    stored: Option<String>,
) -> Result<bool, ApiError> {
    ticket
        .run(move |memory| match stored {
            Some(hash) => verify_password_with(memory, &password, &hash),
            None => verify_password_with(memory, &password, dummy_hash()).map(|_| false),
        })
        .await
        .map_err(|e| ApiError::internal("password check task", &e))?
        .map_err(|e| ApiError::internal("password check", &e))
}

#[derive(Deserialize)]
pub(super) struct Login {
    email: String,
    password: String,
}

pub(super) async fn login(
    State(s): State<ApiState>,
    bytes: bytes::Bytes,
) -> Result<Response, ApiError> {
    let bad = || {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_credentials",
            "wrong email or password",
        )
    };
    // Not `input::body`: whatever is wrong with the credentials, the answer is the same 401.
    let Login { email, password } = serde_json::from_slice(&bytes).map_err(|e| {
        let mut fields = std::collections::BTreeMap::new();
        fields.insert("body".to_owned(), e.to_string());
        ApiError::validation(fields)
    })?;
    let email = email.trim();
    // No account has such an email (registration refuses it), so the store need not be
    // asked — and PostgreSQL would refuse a NUL in the query.
    if has_control(email) || email.len() > MAX_EMAIL_BYTES {
        return Err(bad());
    }
    let ticket = password_ticket(&s)?;
    let now = s.clock.now_ms();
    let Some(user) = s.store.user_by_email(email).await? else {
        verify(&ticket, password, None).await?;
        return Err(bad());
    };
    // Counted before the check, in one statement: concurrent guesses cannot outrun the lock.
    if !s
        .store
        .reserve_login_attempt(user.id, LOCK_AFTER_FAILURES, now, now + LOCK_MS)
        .await?
    {
        let left_ms = user.locked_until.map_or(LOCK_MS, |t| (t - now).max(0));
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_attempts",
            "too many failed logins; try again in 15 minutes",
        )
        .retry_after(u64::try_from(left_ms / 1000).unwrap_or(1)));
    }
    if !verify(&ticket, password, Some(user.account.password_hash.clone())).await? {
        return Err(bad());
    }
    drop(ticket);
    if !user.account.active {
        return Err(ApiError::forbidden(
            "account_inactive",
            "the account is not activated yet: use the link in the activation email",
        ));
    }
    s.store.reset_login_failures(user.id).await?;
    let (token, hash) = new_token();
    let expires_at = now + s.token_ttl.as_millis() as i64;
    s.store
        .add_auth_token(&hash, user.id, now, expires_at)
        .await?;
    Ok(axum::Json(json!({
        "token": token,
        "must_change_password": user.account.must_change_password,
        "expires_at": tms_registry::views::time(Some(expires_at)),
    }))
    .into_response())
}

pub(super) async fn logout(
    State(s): State<ApiState>,
    caller: AnyCaller,
) -> Result<StatusCode, ApiError> {
    s.store
        .revoke_auth_token(&caller.token_hash, s.clock.now_ms())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
pub(super) struct Activate {
    token: String,
}

pub(super) async fn activate(
    State(s): State<ApiState>,
    bytes: bytes::Bytes,
) -> Result<Response, ApiError> {
    let Activate { token } = body(&bytes)?;
    match s
        .store
        .activate(&token_hash(token.trim()), s.clock.now_ms())
        .await?
    {
        Some(_) => Ok(axum::Json(json!({"activated": true})).into_response()),
        None => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_token",
            "the activation token is unknown, already used or expired; ask your service provider to resend it",
        )),
    }
}

#[derive(Deserialize)]
pub(super) struct Resend {
    email: String,
}

/// A provider or admin sends a fresh activation email to a customer not yet activated.
pub(super) async fn resend_activation(
    State(s): State<ApiState>,
    caller: Caller,
    bytes: bytes::Bytes,
) -> Result<Response, ApiError> {
    caller.require_staff("only providers and admins can resend activation emails")?;
    let Resend { email } = body(&bytes)?;
    let user = s
        .store
        .user_by_email(email.trim())
        .await?
        .filter(|u| u.account.role == "customer")
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no customer account {email:?}"),
            )
        })?;
    if user.account.active {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_active",
            "the account is already active",
        ));
    }
    let now = s.clock.now_ms();
    let (token, hash) = new_token();
    let expires_at = now + s.activation_ttl.as_millis() as i64;
    let message = s
        .mail
        .activation(
            &user.account.email,
            &token,
            s.activation_ttl.as_secs() / 3600,
        )
        .map_err(|e| ApiError::internal("building the activation email", &e))?;
    s.store
        .add_activation(user.id, &hash, expires_at, &message, now)
        .await?;
    s.mail_queued.notify_one();
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(json!({"queued": "activation"})),
    )
        .into_response())
}

pub(crate) fn account_json(u: &UserRecord) -> Value {
    json!({
        "id": u.id,
        "email": u.account.email,
        "role": u.account.role,
        "first_name": u.account.first_name,
        "last_name": u.account.last_name,
        "phone": u.account.phone,
        "company_id": u.account.company_id,
        "active": u.account.active,
        "must_change_password": u.account.must_change_password,
        "created_at": tms_registry::views::time(Some(u.created_at)),
    })
}

pub(super) async fn me(caller: AnyCaller) -> Response {
    axum::Json(account_json(&caller.user)).into_response()
}

#[derive(Deserialize)]
pub(super) struct ChangePassword {
    current_password: String,
    new_password: String,
}

pub(super) async fn change_password(
    State(s): State<ApiState>,
    caller: AnyCaller,
    bytes: bytes::Bytes,
) -> Result<StatusCode, ApiError> {
    let ChangePassword {
        current_password,
        new_password,
    } = body(&bytes)?;
    let mut fields = std::collections::BTreeMap::new();
    if new_password.chars().count() < MIN_PASSWORD_CHARS {
        fields.insert(
            "new_password".to_owned(),
            format!("must have at least {MIN_PASSWORD_CHARS} characters"),
        );
    } else if new_password == current_password {
        fields.insert(
            "new_password".to_owned(),
            "must differ from the current password".to_owned(),
        );
    }
    if !fields.is_empty() {
        return Err(ApiError::validation(fields));
    }
    let ticket = password_ticket(&s)?;
    if !verify(
        &ticket,
        current_password,
        Some(caller.user.account.password_hash.clone()),
    )
    .await?
    {
        return Err(ApiError::forbidden(
            "invalid_credentials",
            "the current password is wrong",
        ));
    }
    let hash = hash(&ticket, new_password).await?;
    drop(ticket);
    s.store
        .set_password(
            caller.user.id,
            &hash,
            false,
            Some(&caller.token_hash),
            s.clock.now_ms(),
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
