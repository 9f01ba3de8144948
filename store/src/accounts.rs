//! Registration (customer + company + device in one transaction), login tokens, activation
//! tokens, failed-login throttling and the mail queue. Tokens arrive here already hashed.

use sqlx::AnyConnection;

use crate::devices::{company_id, insert_device};
use crate::users::insert_user;
use crate::{NewDevice, NewUser, Result, Store, StoreError, UserRecord, query_err, unique_err};

/// A location row with the device it belongs to.
#[derive(sqlx::FromRow)]
struct SerialLocation {
    serial: String,
    #[sqlx(flatten)]
    location: crate::LocationRecord,
}

/// Who the device is registered for.
#[derive(Debug, Clone)]
pub enum RegistrationUser {
    /// A new customer account (inactive until activated, with a temporary password).
    New(NewUser),
    Existing {
        email: String,
    },
}

#[derive(Debug, Clone)]
pub enum RegistrationCompany {
    New { name: String },
    Existing { name: String },
}

/// An email to queue together with the registration.
#[derive(Debug, Clone)]
pub struct OutgoingMail {
    pub kind: String,
    pub recipient: String,
    /// Kept after delivery, with the recipient and the time, unlike the message.
    pub subject: String,
    /// The whole RFC 5322 message; dropped from the queue once delivered.
    pub message: String,
}

#[derive(Debug, Clone)]
pub struct Registration {
    pub user: RegistrationUser,
    pub company: RegistrationCompany,
    /// `company` inside is ignored: the registration's company is used.
    pub device: NewDevice,
    /// Hash and expiry of the activation token, for a new user.
    pub activation: Option<(String, i64)>,
    pub mails: Vec<OutgoingMail>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RegistrationIds {
    pub user_id: i64,
    pub company_id: i64,
    pub device_serial: String,
    pub user_created: bool,
    pub company_created: bool,
}

/// A queued email.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct QueuedMail {
    pub id: i64,
    pub kind: String,
    pub recipient: String,
    pub message: String,
    pub attempts: i64,
}

pub(crate) async fn queue_mail(
    conn: &mut AnyConnection,
    mail: &OutgoingMail,
    now_ms: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO mail_queue (kind, recipient, subject, message, created_at, next_attempt_at) VALUES ($1, $2, $3, $4, $5, $5)",
    )
    .bind(&mail.kind)
    .bind(&mail.recipient)
    .bind(&mail.subject)
    .bind(&mail.message)
    .bind(now_ms)
    .execute(&mut *conn)
    .await
    .map_err(query_err("queueing an email"))?;
    Ok(())
}

impl Store {
    /// Registers customer, company and device in one transaction, with the activation token
    /// and the emails: all of it or nothing.
    pub async fn register(&self, reg: &Registration, now_ms: i64) -> Result<RegistrationIds> {
        let mut tx = self.begin_write("starting a registration").await?;
        let (company_id, company_created) = match &reg.company {
            RegistrationCompany::New { name } => {
                if company_id(&mut tx, name, false, now_ms).await?.is_some() {
                    return Err(StoreError::Conflict {
                        what: "company name",
                    });
                }
                let id = company_id(&mut tx, name, true, now_ms)
                    .await?
                    .ok_or(StoreError::NotFound { what: "company" })?;
                (id, true)
            }
            RegistrationCompany::Existing { name } => (
                company_id(&mut tx, name, false, now_ms)
                    .await?
                    .ok_or(StoreError::NotFound { what: "company" })?,
                false,
            ),
        };
        let (user_id, user_created) = match &reg.user {
            RegistrationUser::New(user) => {
                // A customer who registers starts inactive (until activated) and with a
                // temporary password, whatever the caller filled in.
                let customer = NewUser {
                    role: "customer".into(),
                    company_id: Some(company_id),
                    active: false,
                    must_change_password: true,
                    ..user.clone()
                };
                let id = insert_user(&mut tx, &customer, now_ms)
                    .await
                    .map_err(unique_err("creating the customer account", "account email"))?;
                (id, true)
            }
            RegistrationUser::Existing { email } => {
                let (id, role, user_company): (i64, String, Option<i64>) =
                    sqlx::query_as("SELECT id, role, company_id FROM users WHERE email = $1")
                        .bind(email.to_lowercase())
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(query_err("finding the customer account"))?
                        .ok_or(StoreError::NotFound { what: "user" })?;
                if role != "customer" {
                    return Err(StoreError::NotFound { what: "user" });
                }
                if user_company != Some(company_id) {
                    return Err(StoreError::Conflict {
                        what: "user of another company",
                    });
                }
                (id, false)
            }
        };
        insert_device(&mut tx, &reg.device, company_id, now_ms).await?;
        if let Some((hash, expires_at)) = &reg.activation {
            sqlx::query("INSERT INTO activation_tokens (token_hash, user_id, created_at, expires_at) VALUES ($1, $2, $3, $4)")
                .bind(hash)
                .bind(user_id)
                .bind(now_ms)
                .bind(*expires_at)
                .execute(&mut *tx)
                .await
                .map_err(query_err("storing the activation token"))?;
        }
        for mail in &reg.mails {
            queue_mail(&mut tx, mail, now_ms).await?;
        }
        tx.commit()
            .await
            .map_err(query_err("committing a registration"))?;
        Ok(RegistrationIds {
            user_id,
            company_id,
            device_serial: reg.device.serial.to_string(),
            user_created,
            company_created,
        })
    }

    /// A new activation token for an account that is not active yet, with its email.
    pub async fn add_activation(
        &self,
        user_id: i64,
        hash: &str,
        expires_at: i64,
        mail: &OutgoingMail,
        now_ms: i64,
    ) -> Result<()> {
        let mut tx = self.begin_write("starting a transaction").await?;
        sqlx::query("INSERT INTO activation_tokens (token_hash, user_id, created_at, expires_at) VALUES ($1, $2, $3, $4)")
            .bind(hash)
            .bind(user_id)
            .bind(now_ms)
            .bind(expires_at)
            .execute(&mut *tx)
            .await
            .map_err(query_err("storing an activation token"))?;
        queue_mail(&mut tx, mail, now_ms).await?;
        tx.commit()
            .await
            .map_err(query_err("committing an activation token"))
    }

    /// Uses an activation token: valid, unused and unexpired tokens activate their account
    /// once. Returns the account id, or `None` for any unusable token.
    pub async fn activate(&self, hash: &str, now_ms: i64) -> Result<Option<i64>> {
        let mut tx = self.begin_write("starting an activation").await?;
        let user_id: Option<i64> = sqlx::query_scalar(
            "UPDATE activation_tokens SET used_at = $1 WHERE token_hash = $2 AND used_at IS NULL AND expires_at > $1 RETURNING user_id",
        )
        .bind(now_ms)
        .bind(hash)
        .fetch_optional(&mut *tx)
        .await
        .map_err(query_err("using an activation token"))?;
        let Some(user_id) = user_id else {
            return Ok(None);
        };
        sqlx::query("UPDATE users SET active = 1 WHERE id = $1")
            .bind(user_id)
            .execute(&mut *tx)
            .await
            .map_err(query_err("activating an account"))?;
        tx.commit()
            .await
            .map_err(query_err("committing an activation"))?;
        Ok(Some(user_id))
    }

    pub async fn add_auth_token(
        &self,
        hash: &str,
        user_id: i64,
        now_ms: i64,
        expires_at: i64,
    ) -> Result<()> {
        sqlx::query("INSERT INTO auth_tokens (token_hash, user_id, created_at, expires_at) VALUES ($1, $2, $3, $4)")
            .bind(hash)
            .bind(user_id)
            .bind(now_ms)
            .bind(expires_at)
            .execute(self.pool())
            .await
            .map_err(query_err("storing a login token"))?;
        Ok(())
    }

    /// The account behind a live (unexpired, unrevoked) login token.
    pub async fn user_by_token(&self, hash: &str, now_ms: i64) -> Result<Option<UserRecord>> {
        sqlx::query_as(
            "SELECT u.* FROM auth_tokens t JOIN users u ON u.id = t.user_id \
             WHERE t.token_hash = $1 AND t.revoked_at IS NULL AND t.expires_at > $2",
        )
        .bind(hash)
        .bind(now_ms)
        .fetch_optional(self.pool())
        .await
        .map_err(query_err("checking a login token"))
    }

    pub async fn revoke_auth_token(&self, hash: &str, now_ms: i64) -> Result<()> {
        sqlx::query(
            "UPDATE auth_tokens SET revoked_at = $1 WHERE token_hash = $2 AND revoked_at IS NULL",
        )
        .bind(now_ms)
        .bind(hash)
        .execute(self.pool())
        .await
        .map_err(query_err("revoking a login token"))?;
        Ok(())
    }

    /// Reserves one password check for the account, counted as a failure until
    /// [`Store::reset_login_failures`] says it succeeded: the check and the count are one
    /// conditional `UPDATE`, so concurrent logins cannot all slip in under the limit. The
    /// `limit`-th reservation locks the account until `lock_until`; while it is locked
    /// nothing is reserved and `false` is returned. A lock that has run out starts the count
    /// afresh. At most `limit` checks happen per lock window, however many arrive at once.
    pub async fn reserve_login_attempt(
        &self,
        user_id: i64,
        limit: i64,
        now_ms: i64,
        lock_until: i64,
    ) -> Result<bool> {
        // Every right-hand side sees the row as it was before this UPDATE (SQLite and
        // PostgreSQL alike); PostgreSQL re-checks the WHERE against a row another
        // transaction changed meanwhile, SQLite runs one writer at a time.
        let reserved = sqlx::query(
            "UPDATE users SET \
             failed_logins = CASE WHEN locked_until IS NOT NULL AND locked_until <= $1 THEN 1 ELSE failed_logins + 1 END, \
             locked_until = CASE WHEN (CASE WHEN locked_until IS NOT NULL AND locked_until <= $1 THEN 1 ELSE failed_logins + 1 END) >= $2 \
             THEN $3 ELSE NULL END \
             WHERE id = $4 AND (locked_until IS NULL OR locked_until <= $1) RETURNING id",
        )
        .bind(now_ms)
        .bind(limit)
        .bind(lock_until)
        .bind(user_id)
        .fetch_optional(self.pool())
        .await
        .map_err(query_err("reserving a login attempt"))?;
        Ok(reserved.is_some())
    }

    pub async fn reset_login_failures(&self, user_id: i64) -> Result<()> {
        sqlx::query("UPDATE users SET failed_logins = 0, locked_until = NULL WHERE id = $1")
            .bind(user_id)
            .execute(self.pool())
            .await
            .map_err(query_err("resetting failed logins"))?;
        Ok(())
    }

    /// Sets a new password hash; `must_change` marks it temporary. Other login tokens of the
    /// account, except `keep_token`, are revoked.
    pub async fn set_password(
        &self,
        user_id: i64,
        hash: &str,
        must_change: bool,
        keep_token: Option<&str>,
        now_ms: i64,
    ) -> Result<()> {
        let mut tx = self.begin_write("starting a password change").await?;
        sqlx::query("UPDATE users SET password_hash = $1, must_change_password = $2 WHERE id = $3")
            .bind(hash)
            .bind(i64::from(must_change))
            .bind(user_id)
            .execute(&mut *tx)
            .await
            .map_err(query_err("changing a password"))?;
        sqlx::query(
            "UPDATE auth_tokens SET revoked_at = $1 WHERE user_id = $2 AND revoked_at IS NULL AND token_hash <> $3",
        )
        .bind(now_ms)
        .bind(user_id)
        .bind(keep_token.unwrap_or(""))
        .execute(&mut *tx)
        .await
        .map_err(query_err("revoking other logins"))?;
        tx.commit()
            .await
            .map_err(query_err("committing a password change"))
    }

    /// Mails due for a (re)try, oldest first.
    pub async fn due_mails(&self, now_ms: i64, limit: i64) -> Result<Vec<QueuedMail>> {
        sqlx::query_as(
            "SELECT id, kind, recipient, message, attempts FROM mail_queue \
             WHERE sent_at IS NULL AND next_attempt_at <= $1 ORDER BY id LIMIT $2",
        )
        .bind(now_ms)
        .bind(limit)
        .fetch_all(self.pool())
        .await
        .map_err(query_err("reading the mail queue"))
    }

    /// Marks a mail delivered and drops its text: the temporary password or activation link
    /// in it has reached the recipient, and a copy in the database would only outlive it.
    /// Recipient, subject and times stay.
    pub async fn mail_sent(&self, id: i64, now_ms: i64) -> Result<()> {
        sqlx::query("UPDATE mail_queue SET sent_at = $1, message = '', attempts = attempts + 1, last_error = NULL WHERE id = $2")
            .bind(now_ms)
            .bind(id)
            .execute(self.pool())
            .await
            .map_err(query_err("marking a mail sent"))?;
        Ok(())
    }

    pub async fn mail_failed(&self, id: i64, error: &str, next_attempt_at: i64) -> Result<()> {
        sqlx::query("UPDATE mail_queue SET attempts = attempts + 1, last_error = $1, next_attempt_at = $2 WHERE id = $3")
            .bind(error)
            .bind(next_attempt_at)
            .bind(id)
            .execute(self.pool())
            .await
            .map_err(query_err("recording a mail failure"))?;
        Ok(())
    }

    /// `(queued, sent)` counts of the mail queue.
    pub async fn mail_counts(&self) -> Result<(i64, i64)> {
        sqlx::query_as(
            "SELECT COALESCE(SUM(CASE WHEN sent_at IS NULL THEN 1 ELSE 0 END), 0) AS queued, \
             COALESCE(SUM(CASE WHEN sent_at IS NULL THEN 0 ELSE 1 END), 0) AS sent FROM mail_queue",
        )
        .fetch_one(self.pool())
        .await
        .map_err(query_err("counting mails"))
    }

    pub async fn user_by_id(&self, id: i64) -> Result<Option<UserRecord>> {
        sqlx::query_as("SELECT * FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(self.pool())
            .await
            .map_err(query_err("finding an account"))
    }

    /// Sets a device's location by hand (source `operator`) or from registration.
    pub async fn set_location(
        &self,
        serial: &str,
        lat: f64,
        lon: f64,
        source: &str,
        now_ms: i64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO locations (serial, lat, lon, accuracy_m, source, updated_at) VALUES ($1, $2, $3, NULL, $4, $5) \
             ON CONFLICT (serial, source) DO UPDATE SET lat = excluded.lat, lon = excluded.lon, accuracy_m = NULL, \
             updated_at = excluded.updated_at",
        )
        .bind(serial)
        .bind(lat)
        .bind(lon)
        .bind(source)
        .bind(now_ms)
        .execute(self.pool())
        .await
        .map_err(query_err("setting a location"))?;
        Ok(())
    }

    /// The best known location of every device, by serial.
    pub async fn all_locations(
        &self,
    ) -> Result<std::collections::HashMap<String, crate::LocationRecord>> {
        let sql = format!(
            "SELECT serial, lat, lon, accuracy_m, source, updated_at FROM locations ORDER BY serial, {}",
            crate::devices::SOURCE_RANK
        );
        let rows: Vec<SerialLocation> = sqlx::query_as(&sql)
            .fetch_all(self.pool())
            .await
            .map_err(query_err("reading locations"))?;
        let mut best = std::collections::HashMap::new();
        for SerialLocation { serial, location } in rows {
            // Rows come best first within a serial: the first one wins.
            best.entry(serial).or_insert(location);
        }
        Ok(best)
    }

    /// Devices whose lease ends within `horizon_ms` and whose customers have not been told:
    /// `(serial, lease_ends_at, customer emails)`. Devices without an active customer are
    /// left out (there is nobody to tell yet).
    pub async fn lease_notices_due(
        &self,
        now_ms: i64,
        horizon_ms: i64,
    ) -> Result<Vec<(String, i64, Vec<String>)>> {
        let rows: Vec<(String, i64, String)> = sqlx::query_as(
            "SELECT d.serial, d.lease_ends_at, u.email FROM devices d \
             JOIN users u ON u.company_id = d.company_id AND u.role = 'customer' AND u.active = 1 \
             WHERE d.lease_notice_sent_at IS NULL AND d.lease_ends_at > $1 AND d.lease_ends_at <= $2 \
             ORDER BY d.serial, u.email",
        )
        .bind(now_ms)
        .bind(now_ms + horizon_ms)
        .fetch_all(self.pool())
        .await
        .map_err(query_err("finding leases that end soon"))?;
        let mut out: Vec<(String, i64, Vec<String>)> = Vec::new();
        for (serial, ends, email) in rows {
            match out.last_mut() {
                Some((s, _, emails)) if *s == serial => emails.push(email),
                _ => out.push((serial, ends, vec![email])),
            }
        }
        Ok(out)
    }

    /// Queues the lease notices of a device and marks it told, in one transaction.
    pub async fn queue_lease_notice(
        &self,
        serial: &str,
        mails: &[OutgoingMail],
        now_ms: i64,
    ) -> Result<()> {
        let mut tx = self.begin_write("starting a lease notice").await?;
        let marked = sqlx::query("UPDATE devices SET lease_notice_sent_at = $1 WHERE serial = $2 AND lease_notice_sent_at IS NULL")
            .bind(now_ms)
            .bind(serial)
            .execute(&mut *tx)
            .await
            .map_err(query_err("marking a lease notice"))?;
        // Another node got there first: it queued the mail.
        if marked.rows_affected() == 0 {
            return Ok(());
        }
        for mail in mails {
            queue_mail(&mut tx, mail, now_ms).await?;
        }
        tx.commit()
            .await
            .map_err(query_err("committing a lease notice"))
    }
}
