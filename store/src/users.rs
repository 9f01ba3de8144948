//! Staff and customer accounts. Only password hashes are stored; hashing happens elsewhere.

use sqlx::AnyConnection;

use crate::row::Flag;
use crate::{Result, Store, query_err, unique_err};

/// An account as it is created; [`UserRecord`] is this and what the store adds.
#[derive(Debug, Clone, Default, PartialEq, sqlx::FromRow)]
pub struct NewUser {
    pub email: String,
    pub role: String,
    pub password_hash: String,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub phone: Option<String>,
    pub company_id: Option<i64>,
    #[sqlx(try_from = "Flag")]
    pub active: bool,
    #[sqlx(try_from = "Flag")]
    pub must_change_password: bool,
}

#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct UserRecord {
    pub id: i64,
    #[sqlx(flatten)]
    pub account: NewUser,
    pub created_at: i64,
    pub locked_until: Option<i64>,
}

/// Inserts an account (email folded to lower case) on `conn`, which may be the caller's
/// transaction; returns the new id. The caller names the failure.
pub(crate) async fn insert_user(
    conn: &mut AnyConnection,
    u: &NewUser,
    now_ms: i64,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO users (email, role, password_hash, first_name, last_name, phone, company_id, \
         active, must_change_password, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id",
    )
    .bind(u.email.to_lowercase())
    .bind(&u.role)
    .bind(&u.password_hash)
    .bind(u.first_name.as_deref())
    .bind(u.last_name.as_deref())
    .bind(u.phone.as_deref())
    .bind(u.company_id)
    .bind(i64::from(u.active))
    .bind(i64::from(u.must_change_password))
    .bind(now_ms)
    .fetch_one(conn)
    .await
}

impl Store {
    /// Creates an account; an email already in use is a `Conflict`. Returns the new id.
    pub async fn add_user(&self, u: &NewUser, now_ms: i64) -> Result<i64> {
        let mut conn = self
            .pool()
            .acquire()
            .await
            .map_err(query_err("creating an account"))?;
        insert_user(&mut conn, u, now_ms)
            .await
            .map_err(unique_err("creating an account", "account email"))
    }

    pub async fn user_by_email(&self, email: &str) -> Result<Option<UserRecord>> {
        sqlx::query_as("SELECT * FROM users WHERE email = $1")
            .bind(email.to_lowercase())
            .fetch_optional(self.pool())
            .await
            .map_err(query_err("finding an account"))
    }
}
