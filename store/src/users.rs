//! Staff and customer accounts. Only password hashes are stored; hashing happens elsewhere.

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{Result, Store, query_err, unique_err};

#[derive(Debug, Clone)]
pub struct NewUser {
    pub email: String,
    pub role: String,
    pub password_hash: String,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub phone: Option<String>,
    pub company_id: Option<i64>,
    pub active: bool,
    pub must_change_password: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UserRecord {
    pub id: i64,
    pub email: String,
    pub role: String,
    pub password_hash: String,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub phone: Option<String>,
    pub company_id: Option<i64>,
    pub active: bool,
    pub must_change_password: bool,
    pub created_at: i64,
    pub locked_until: Option<i64>,
}

pub(crate) fn user_from_row(r: &AnyRow) -> Result<UserRecord, sqlx::Error> {
    Ok(UserRecord {
        id: r.try_get("id")?,
        email: r.try_get("email")?,
        role: r.try_get("role")?,
        password_hash: r.try_get("password_hash")?,
        first_name: r.try_get("first_name")?,
        last_name: r.try_get("last_name")?,
        phone: r.try_get("phone")?,
        company_id: r.try_get("company_id")?,
        active: r.try_get::<i64, _>("active")? != 0,
        must_change_password: r.try_get::<i64, _>("must_change_password")? != 0,
        created_at: r.try_get("created_at")?,
        locked_until: r.try_get("locked_until")?,
    })
}

impl Store {
    /// Creates an account; an email already in use is a `Conflict`. Returns the new id.
    pub async fn add_user(&self, u: &NewUser, now_ms: i64) -> Result<i64> {
        let row = sqlx::query(
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
        .fetch_one(self.pool())
        .await
        .map_err(unique_err("creating an account", "account email"))?;
        row.try_get("id").map_err(query_err("creating an account"))
    }

    pub async fn user_by_email(&self, email: &str) -> Result<Option<UserRecord>> {
        let row = sqlx::query("SELECT * FROM users WHERE email = $1")
            .bind(email.to_lowercase())
            .fetch_optional(self.pool())
            .await
            .map_err(query_err("finding an account"))?;
        row.map(|r| user_from_row(&r))
            .transpose()
            .map_err(query_err("decoding an account"))
    }
}
