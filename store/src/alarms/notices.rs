//! The notification state of each alarm per channel (email, webhook): which raises and
//! clears a channel has not sent, grouped by company with their recipients, and the claims
//! that keep two nodes from sending the same webhook. Composing and sending are registry's.

use super::{AlarmRecord, COLUMNS};
use crate::{Result, Store, query_err};

/// An alarm with what one channel has sent of it and who registered its device.
#[derive(sqlx::FromRow)]
struct NoticeRow {
    #[sqlx(flatten)]
    alarm: AlarmRecord,
    sent_raise: Option<i64>,
    sent_clear: Option<i64>,
    registered_by: Option<i64>,
}

/// One event of an alarm that a channel has not told anyone about yet.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingNotice {
    pub alarm: AlarmRecord,
    /// False: the raise; true: the clear.
    pub cleared: bool,
}

/// What one company's notice is about and who receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct NoticeGroup {
    pub company_id: i64,
    pub company: String,
    /// How many devices the company has.
    pub devices: i64,
    pub events: Vec<PendingNotice>,
    /// Active customer accounts of the company and the providers who registered its
    /// affected devices (active ones), sorted, without repeats.
    pub recipients: Vec<String>,
}

/// A notification channel's columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Email,
    Webhook,
}

impl Channel {
    fn columns(self) -> (&'static str, &'static str) {
        match self {
            Channel::Email => ("mailed_raise_at", "mailed_clear_at"),
            Channel::Webhook => ("hooked_raise_at", "hooked_clear_at"),
        }
    }

    /// Rows with an event this channel has not sent (alias `a`).
    fn pending(self) -> String {
        let (raise, clear) = self.columns();
        format!("(a.{raise} IS NULL OR (a.cleared_at IS NOT NULL AND a.{clear} IS NULL))")
    }
}

impl Store {
    /// Companies with events `channel` has not sent whose oldest is at or before `due`
    /// (older than the grouping window); for the webhook, only rows no delivery holds and
    /// none waits to retry after `now`.
    pub async fn notice_due_companies(
        &self,
        channel: Channel,
        due: i64,
        now: i64,
    ) -> Result<Vec<i64>> {
        let (raise, _) = channel.columns();
        let retry = match channel {
            Channel::Email => "",
            Channel::Webhook => {
                " AND a.hook_next_at <= $1 AND (a.hook_claim IS NULL OR a.hook_claim_until < $1)"
            }
        };
        let sql = format!(
            "SELECT d.company_id, MIN(CASE WHEN a.{raise} IS NULL THEN a.raised_at ELSE a.cleared_at END) AS oldest \
             FROM alarms a JOIN devices d ON d.serial = a.serial WHERE {}{retry} \
             GROUP BY d.company_id ORDER BY d.company_id",
            channel.pending()
        );
        let op = "finding due alarm notices";
        let mut q = sqlx::query_as::<_, (i64, i64)>(&sql);
        if channel == Channel::Webhook {
            q = q.bind(now);
        }
        let rows = q.fetch_all(self.pool()).await.map_err(query_err(op))?;
        Ok(rows
            .into_iter()
            .filter(|&(_, oldest)| oldest <= due)
            .map(|(company_id, _)| company_id)
            .collect())
    }

    /// The events of `company_id` that `channel` has not sent (a webhook claim `claim`, when
    /// given, narrows it to the rows that claim holds), with the company and recipients.
    pub async fn notice_group(
        &self,
        channel: Channel,
        company_id: i64,
        claim: Option<&str>,
    ) -> Result<NoticeGroup> {
        let op = "reading an alarm notice";
        let (raise, clear) = channel.columns();
        let mut sql = format!(
            "SELECT {COLUMNS}, a.{raise} AS sent_raise, a.{clear} AS sent_clear, d.registered_by \
             FROM alarms a JOIN devices d ON d.serial = a.serial JOIN companies c ON c.id = d.company_id \
             WHERE d.company_id = $1 AND {}",
            channel.pending()
        );
        if claim.is_some() {
            sql.push_str(" AND a.hook_claim = $2");
        }
        sql.push_str(" ORDER BY a.raised_at, a.id");
        let mut q = sqlx::query_as::<_, NoticeRow>(&sql).bind(company_id);
        if let Some(c) = claim {
            q = q.bind(c);
        }
        let rows = q.fetch_all(self.pool()).await.map_err(query_err(op))?;
        let mut events = Vec::new();
        let mut providers: Vec<i64> = Vec::new();
        for NoticeRow {
            alarm,
            sent_raise,
            sent_clear,
            registered_by,
        } in rows
        {
            providers.extend(registered_by);
            if sent_raise.is_none() {
                events.push(PendingNotice {
                    alarm: alarm.clone(),
                    cleared: false,
                });
            }
            if alarm.cleared_at.is_some() && sent_clear.is_none() {
                events.push(PendingNotice {
                    alarm,
                    cleared: true,
                });
            }
        }
        let company: String = sqlx::query_scalar("SELECT name FROM companies WHERE id = $1")
            .bind(company_id)
            .fetch_optional(self.pool())
            .await
            .map_err(query_err(op))?
            .unwrap_or_default();
        let devices: i64 =
            sqlx::query_scalar("SELECT COUNT(*) AS n FROM devices WHERE company_id = $1")
                .bind(company_id)
                .fetch_one(self.pool())
                .await
                .map_err(query_err(op))?;
        let mut recipients: Vec<String> = sqlx::query_scalar(
            "SELECT email FROM users WHERE company_id = $1 AND role = 'customer' AND active = 1",
        )
        .bind(company_id)
        .fetch_all(self.pool())
        .await
        .map_err(query_err(op))?;
        providers.sort_unstable();
        providers.dedup();
        for id in providers {
            let email: Option<String> = sqlx::query_scalar(
                "SELECT email FROM users WHERE id = $1 AND role IN ('provider', 'admin') AND active = 1",
            )
            .bind(id)
            .fetch_optional(self.pool())
            .await
            .map_err(query_err(op))?;
            recipients.extend(email);
        }
        recipients.sort();
        recipients.dedup();
        Ok(NoticeGroup {
            company_id,
            company,
            devices,
            events,
            recipients,
        })
    }

    /// Marks the events of `group` as mailed and queues `mails`, in one transaction; when
    /// `webhook_off`, the webhook columns are marked too (nothing would ever send them, and
    /// enabling a webhook later must not replay history). False, with nothing written, when
    /// another node marked any of them first: it queued that mail.
    pub async fn queue_alarm_mail(
        &self,
        group: &NoticeGroup,
        mails: &[crate::OutgoingMail],
        webhook_off: bool,
        now: i64,
    ) -> Result<bool> {
        let mut tx = self.begin_write("queueing an alarm notice").await?;
        let hook = |col: &str| {
            if webhook_off {
                format!(", {col} = COALESCE({col}, $1)")
            } else {
                String::new()
            }
        };
        for e in &group.events {
            let (col, hook_col) = if e.cleared {
                ("mailed_clear_at", "hooked_clear_at")
            } else {
                ("mailed_raise_at", "hooked_raise_at")
            };
            let done = sqlx::query(&format!(
                "UPDATE alarms SET {col} = $1{} WHERE id = $2 AND {col} IS NULL",
                hook(hook_col)
            ))
            .bind(now)
            .bind(e.alarm.id)
            .execute(&mut *tx)
            .await
            .map_err(query_err("marking an alarm mailed"))?;
            if done.rows_affected() == 0 {
                // Dropped without commit: rolled back.
                return Ok(false);
            }
        }
        for mail in mails {
            crate::accounts::queue_mail(&mut tx, mail, now).await?;
        }
        tx.commit()
            .await
            .map_err(query_err("committing an alarm notice"))?;
        Ok(true)
    }

    /// Claims `company_id`'s unsent webhook events for `claim` until `until`; how many rows
    /// it holds. Rows another delivery holds, or that wait for a retry, are left alone.
    pub async fn claim_webhook(
        &self,
        company_id: i64,
        claim: &str,
        now: i64,
        until: i64,
    ) -> Result<u64> {
        let done = sqlx::query(&format!(
            "UPDATE alarms SET hook_claim = $1, hook_claim_until = $2 \
             WHERE serial IN (SELECT serial FROM devices WHERE company_id = $3) \
             AND hook_next_at <= $4 AND (hook_claim IS NULL OR hook_claim_until < $4) AND {}",
            Channel::Webhook.pending().replace("a.", "")
        ))
        .bind(claim)
        .bind(until)
        .bind(company_id)
        .bind(now)
        .execute(self.pool())
        .await
        .map_err(query_err("claiming webhook notices"))?;
        Ok(done.rows_affected())
    }

    /// Ends a webhook delivery of `claim`: delivered (the events it sent are marked), or
    /// failed (its rows wait until `retry_at`, with one more attempt counted).
    pub async fn finish_webhook(
        &self,
        claim: &str,
        events: &[PendingNotice],
        delivered: bool,
        now: i64,
        retry_at: i64,
    ) -> Result<()> {
        let mut tx = self.begin_write("recording a webhook delivery").await?;
        if delivered {
            for e in events {
                let col = if e.cleared {
                    "hooked_clear_at"
                } else {
                    "hooked_raise_at"
                };
                sqlx::query(&format!(
                    "UPDATE alarms SET {col} = COALESCE({col}, $1) WHERE id = $2 AND hook_claim = $3"
                ))
                .bind(now)
                .bind(e.alarm.id)
                .bind(claim)
                .execute(&mut *tx)
                .await
                .map_err(query_err("marking a webhook delivered"))?;
            }
            sqlx::query(
                "UPDATE alarms SET hook_claim = NULL, hook_claim_until = NULL, hook_attempts = 0 \
                 WHERE hook_claim = $1",
            )
            .bind(claim)
            .execute(&mut *tx)
            .await
            .map_err(query_err("releasing a webhook claim"))?;
        } else {
            sqlx::query(
                "UPDATE alarms SET hook_claim = NULL, hook_claim_until = NULL, \
                 hook_attempts = hook_attempts + 1, hook_next_at = $2 WHERE hook_claim = $1",
            )
            .bind(claim)
            .bind(retry_at)
            .execute(&mut *tx)
            .await
            .map_err(query_err("recording a webhook failure"))?;
        }
        tx.commit()
            .await
            .map_err(query_err("committing a webhook delivery"))
    }

    /// How many failed attempts the rows of `claim` have behind them (for the backoff).
    pub async fn webhook_attempts(&self, claim: &str) -> Result<i64> {
        sqlx::query_scalar(
            "SELECT COALESCE(MAX(hook_attempts), 0) AS n FROM alarms WHERE hook_claim = $1",
        )
        .bind(claim)
        .fetch_one(self.pool())
        .await
        .map_err(query_err("reading webhook attempts"))
    }
}
