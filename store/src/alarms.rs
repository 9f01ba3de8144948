//! Alarms (CONTRACT §7): the open set ingest starts from, the raises and clears it writes in
//! its batch (see `ingest.rs`), the `device_offline` sweep, the views of the API and CLI,
//! acknowledgement, and the notification state of each alarm per channel.
//!
//! A raise is `INSERT … ON CONFLICT DO NOTHING` against the partial unique index on open
//! alarms, so however often it is replayed (a retried batch, two nodes, a restart mid-outage)
//! a device has at most one open alarm per code. A clear closes the open one, if any.
//! Not here: deciding when a condition holds (ingest) or who is told and how (registry).

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{Result, Store, query_err};

/// One alarm record (CONTRACT §7), with the device's company for views and notices.
#[derive(Debug, Clone, PartialEq)]
pub struct AlarmRecord {
    pub id: i64,
    pub serial: String,
    pub code: String,
    pub severity: String,
    pub raised_at: i64,
    pub cleared_at: Option<i64>,
    pub acknowledged_at: Option<i64>,
    pub acknowledged_by: Option<String>,
    /// JSON object text: the readings that raised it.
    pub detail: String,
    pub company_id: i64,
    pub company: String,
}

/// A change ingest writes in its batch, in the order the telemetry came.
#[derive(Debug, Clone, PartialEq)]
pub enum AlarmChange {
    Raise {
        serial: String,
        code: String,
        severity: &'static str,
        at: i64,
        /// JSON object text.
        detail: String,
    },
    Clear {
        serial: String,
        code: String,
        at: i64,
    },
}

impl AlarmChange {
    pub fn serial(&self) -> &str {
        match self {
            AlarmChange::Raise { serial, .. } | AlarmChange::Clear { serial, .. } => serial,
        }
    }

    pub fn code(&self) -> &str {
        match self {
            AlarmChange::Raise { code, .. } | AlarmChange::Clear { code, .. } => code,
        }
    }
}

/// Which alarms to list. Every set field narrows the list.
#[derive(Debug, Clone, Default)]
pub struct AlarmFilter {
    pub company_id: Option<i64>,
    pub registered_by: Option<i64>,
    pub serial: Option<String>,
    /// `Some(true)`: open only; `Some(false)`: cleared only; `None`: all.
    pub active: Option<bool>,
    pub limit: i64,
}

/// The raise statement of a batch (`$1` serial … `$5` detail).
pub(crate) const RAISE: &str = "INSERT INTO alarms (serial, code, severity, raised_at, detail) \
     VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING";
/// The clear statement of a batch (`$1` at, `$2` serial, `$3` code). A clear at an earlier
/// time than the raise (device clocks) still closes it, at the raise time.
pub(crate) const CLEAR: &str = "UPDATE alarms SET cleared_at = CASE WHEN raised_at > $1 THEN raised_at ELSE $1 END \
     WHERE serial = $2 AND code = $3 AND cleared_at IS NULL";

const COLUMNS: &str = "a.id, a.serial, a.code, a.severity, a.raised_at, a.cleared_at, \
     a.acknowledged_at, a.acknowledged_by, a.detail, d.company_id, c.name AS company";

fn record(r: &AnyRow) -> Result<AlarmRecord, sqlx::Error> {
    Ok(AlarmRecord {
        id: r.try_get("id")?,
        serial: r.try_get("serial")?,
        code: r.try_get("code")?,
        severity: r.try_get("severity")?,
        raised_at: r.try_get("raised_at")?,
        cleared_at: r.try_get("cleared_at")?,
        acknowledged_at: r.try_get("acknowledged_at")?,
        acknowledged_by: r.try_get("acknowledged_by")?,
        detail: r.try_get("detail")?,
        company_id: r.try_get("company_id")?,
        company: r.try_get("company")?,
    })
}

/// Offline reasons that are the gateway's own doing: the window then starts no earlier than
/// this process's start, so a restart the device survives raises nothing.
pub const GATEWAY_REASONS: &[&str] = &["server_shutdown", "node_lost", "gateway_restart"];

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
    /// Open alarms as (serial, code), of the given devices or (`None`) of all.
    pub async fn open_alarms(&self, serials: Option<&[String]>) -> Result<Vec<(String, String)>> {
        let op = "reading open alarms";
        let mut out = Vec::new();
        let all = [];
        let chunks: Vec<&[String]> = match serials {
            None => vec![&all[..]],
            Some(s) => s.chunks(200).collect(),
        };
        for chunk in chunks {
            let mut sql = String::from("SELECT serial, code FROM alarms WHERE cleared_at IS NULL");
            if serials.is_some() {
                if chunk.is_empty() {
                    continue;
                }
                let marks: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
                sql.push_str(&format!(" AND serial IN ({})", marks.join(", ")));
            }
            let mut q = sqlx::query(&sql);
            for s in chunk {
                q = q.bind(s);
            }
            for r in q.fetch_all(self.pool()).await.map_err(query_err(op))? {
                out.push((
                    r.try_get("serial").map_err(query_err(op))?,
                    r.try_get("code").map_err(query_err(op))?,
                ));
            }
        }
        Ok(out)
    }

    /// Raises `device_offline` for registered devices offline since before `cutoff`; when the
    /// reason is the gateway's own ([`GATEWAY_REASONS`]) the offline time counts from no
    /// earlier than `started_at` (this process's start). Returns how many were raised.
    /// Also clears `device_offline` of devices that are online (a connect that raced a sweep).
    pub async fn sweep_offline(
        &self,
        cutoff: i64,
        started_at: i64,
        now: i64,
    ) -> Result<(u64, u64)> {
        let reasons = GATEWAY_REASONS
            .iter()
            .map(|r| format!("'{r}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut tx = self.begin_write("raising device_offline alarms").await?;
        let raised = sqlx::query(&format!(
            "INSERT INTO alarms (serial, code, severity, raised_at, detail) \
             SELECT s.serial, 'device_offline', 'critical', $1, \
             '{{\"offline_since\": ' || s.since || ', \"reason\": \"' || COALESCE(s.last_disconnect_reason, 'unknown') || '\"}}' \
             FROM device_status s JOIN devices d ON d.serial = s.serial \
             WHERE s.state = 'offline' AND s.since IS NOT NULL \
             AND (CASE WHEN s.last_disconnect_reason IN ({reasons}) AND s.since < $3 THEN $3 ELSE s.since END) <= $2 \
             AND NOT EXISTS (SELECT 1 FROM alarms a WHERE a.serial = s.serial AND a.code = 'device_offline' AND a.cleared_at IS NULL) \
             ON CONFLICT DO NOTHING"
        ))
        .bind(now)
        .bind(cutoff)
        .bind(started_at)
        .execute(&mut *tx)
        .await
        .map_err(query_err("raising device_offline alarms"))?
        .rows_affected();
        let cleared = sqlx::query(
            "UPDATE alarms SET cleared_at = (SELECT CASE WHEN s.since > alarms.raised_at THEN s.since ELSE alarms.raised_at END \
             FROM device_status s WHERE s.serial = alarms.serial) \
             WHERE code = 'device_offline' AND cleared_at IS NULL \
             AND serial IN (SELECT serial FROM device_status WHERE state = 'online')",
        )
        .execute(&mut *tx)
        .await
        .map_err(query_err("clearing device_offline alarms"))?
        .rows_affected();
        tx.commit()
            .await
            .map_err(query_err("committing device_offline alarms"))?;
        Ok((raised, cleared))
    }

    /// Open alarms per code, for `tms_alarms_active{code}`.
    pub async fn active_alarm_counts(&self) -> Result<Vec<(String, i64)>> {
        let op = "counting open alarms";
        let rows = sqlx::query(
            "SELECT code, COUNT(*) AS n FROM alarms WHERE cleared_at IS NULL GROUP BY code ORDER BY code",
        )
        .fetch_all(self.pool())
        .await
        .map_err(query_err(op))?;
        rows.iter()
            .map(|r| Ok((r.try_get("code")?, r.try_get("n")?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(query_err(op))
    }

    /// Alarms of the devices `filter` allows, newest first.
    pub async fn alarms(&self, filter: &AlarmFilter) -> Result<Vec<AlarmRecord>> {
        let mut sql = format!(
            "SELECT {COLUMNS} FROM alarms a JOIN devices d ON d.serial = a.serial \
             JOIN companies c ON c.id = d.company_id WHERE 1 = 1"
        );
        let mut n = 0;
        let mut next = || {
            n += 1;
            n
        };
        match filter.active {
            Some(true) => sql.push_str(" AND a.cleared_at IS NULL"),
            Some(false) => sql.push_str(" AND a.cleared_at IS NOT NULL"),
            None => {}
        }
        if filter.company_id.is_some() {
            sql.push_str(&format!(" AND d.company_id = ${}", next()));
        }
        if filter.registered_by.is_some() {
            sql.push_str(&format!(" AND d.registered_by = ${}", next()));
        }
        if filter.serial.is_some() {
            sql.push_str(&format!(" AND a.serial = ${}", next()));
        }
        sql.push_str(&format!(
            " ORDER BY a.raised_at DESC, a.id DESC LIMIT ${}",
            next()
        ));
        let mut q = sqlx::query(&sql);
        if let Some(c) = filter.company_id {
            q = q.bind(c);
        }
        if let Some(u) = filter.registered_by {
            q = q.bind(u);
        }
        if let Some(s) = &filter.serial {
            q = q.bind(s);
        }
        q = q.bind(filter.limit);
        let rows = q
            .fetch_all(self.pool())
            .await
            .map_err(query_err("listing alarms"))?;
        rows.iter()
            .map(record)
            .collect::<Result<_, _>>()
            .map_err(query_err("decoding alarms"))
    }

    /// One alarm with its device's company and registering provider, to check who may see it.
    pub async fn alarm(&self, id: i64) -> Result<Option<(AlarmRecord, Option<i64>)>> {
        let op = "reading an alarm";
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS}, d.registered_by FROM alarms a JOIN devices d ON d.serial = a.serial \
             JOIN companies c ON c.id = d.company_id WHERE a.id = $1"
        ))
        .bind(id)
        .fetch_optional(self.pool())
        .await
        .map_err(query_err(op))?;
        match row {
            None => Ok(None),
            Some(r) => Ok(Some((
                record(&r).map_err(query_err(op))?,
                r.try_get("registered_by").map_err(query_err(op))?,
            ))),
        }
    }

    /// Acknowledges an alarm (the first acknowledgement stays); false if there is no such alarm.
    pub async fn acknowledge_alarm(&self, id: i64, by: &str, now: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE alarms SET acknowledged_at = COALESCE(acknowledged_at, $1), \
             acknowledged_by = COALESCE(acknowledged_by, $2) WHERE id = $3",
        )
        .bind(now)
        .bind(by)
        .bind(id)
        .execute(self.pool())
        .await
        .map_err(query_err("acknowledging an alarm"))?;
        Ok(done.rows_affected() > 0)
    }

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
        let mut q = sqlx::query(&sql);
        if channel == Channel::Webhook {
            q = q.bind(now);
        }
        let rows = q.fetch_all(self.pool()).await.map_err(query_err(op))?;
        let mut out = Vec::new();
        for r in &rows {
            let oldest: i64 = r.try_get("oldest").map_err(query_err(op))?;
            if oldest <= due {
                out.push(r.try_get("company_id").map_err(query_err(op))?);
            }
        }
        Ok(out)
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
        let mut q = sqlx::query(&sql).bind(company_id);
        if let Some(c) = claim {
            q = q.bind(c);
        }
        let rows = q.fetch_all(self.pool()).await.map_err(query_err(op))?;
        let mut events = Vec::new();
        let mut providers: Vec<i64> = Vec::new();
        for r in &rows {
            let alarm = record(r).map_err(query_err(op))?;
            let sent_raise: Option<i64> = r.try_get("sent_raise").map_err(query_err(op))?;
            let sent_clear: Option<i64> = r.try_get("sent_clear").map_err(query_err(op))?;
            let by: Option<i64> = r.try_get("registered_by").map_err(query_err(op))?;
            providers.extend(by);
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
        let company: String = sqlx::query("SELECT name FROM companies WHERE id = $1")
            .bind(company_id)
            .fetch_optional(self.pool())
            .await
            .map_err(query_err(op))?
            .map(|r| r.try_get("name"))
            .transpose()
            .map_err(query_err(op))?
            .unwrap_or_default();
        let devices: i64 = sqlx::query("SELECT COUNT(*) AS n FROM devices WHERE company_id = $1")
            .bind(company_id)
            .fetch_one(self.pool())
            .await
            .and_then(|r| r.try_get("n"))
            .map_err(query_err(op))?;
        let mut recipients: Vec<String> = Vec::new();
        let customers = sqlx::query(
            "SELECT email FROM users WHERE company_id = $1 AND role = 'customer' AND active = 1",
        )
        .bind(company_id)
        .fetch_all(self.pool())
        .await
        .map_err(query_err(op))?;
        for r in &customers {
            recipients.push(r.try_get("email").map_err(query_err(op))?);
        }
        providers.sort_unstable();
        providers.dedup();
        for id in providers {
            let row = sqlx::query(
                "SELECT email FROM users WHERE id = $1 AND role IN ('provider', 'admin') AND active = 1",
            )
            .bind(id)
            .fetch_optional(self.pool())
            .await
            .map_err(query_err(op))?;
            if let Some(r) = row {
                recipients.push(r.try_get("email").map_err(query_err(op))?);
            }
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
        let row = sqlx::query(
            "SELECT COALESCE(MAX(hook_attempts), 0) AS n FROM alarms WHERE hook_claim = $1",
        )
        .bind(claim)
        .fetch_one(self.pool())
        .await
        .map_err(query_err("reading webhook attempts"))?;
        row.try_get("n")
            .map_err(query_err("reading webhook attempts"))
    }

    /// Deletes alarms cleared before `before` whose notices are out (history retention).
    pub async fn prune_alarms(&self, before: i64) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM alarms WHERE cleared_at IS NOT NULL AND cleared_at < $1 \
             AND mailed_clear_at IS NOT NULL AND hooked_clear_at IS NOT NULL",
        )
        .bind(before)
        .execute(self.pool())
        .await
        .map_err(query_err("pruning alarms"))?;
        Ok(done.rows_affected())
    }
}
