//! What the API and the CLI read of alarms, and acknowledgement: the only change a person
//! makes to an alarm.

use super::{AlarmRecord, COLUMNS};
use crate::{Result, Store, query_err};

/// An alarm with the provider who registered its device, to check who may see it.
#[derive(sqlx::FromRow)]
struct OwnedAlarm {
    #[sqlx(flatten)]
    alarm: AlarmRecord,
    registered_by: Option<i64>,
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

impl Store {
    /// Open alarms per code, for `tms_alarms_active{code}`.
    pub async fn active_alarm_counts(&self) -> Result<Vec<(String, i64)>> {
        let op = "counting open alarms";
        sqlx::query_as(
            "SELECT code, COUNT(*) AS n FROM alarms WHERE cleared_at IS NULL GROUP BY code ORDER BY code",
        )
        .fetch_all(self.pool())
        .await
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
        let mut q = sqlx::query_as(&sql);
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
        q.fetch_all(self.pool())
            .await
            .map_err(query_err("listing alarms"))
    }

    /// One alarm with its device's company and registering provider, to check who may see it.
    pub async fn alarm(&self, id: i64) -> Result<Option<(AlarmRecord, Option<i64>)>> {
        let op = "reading an alarm";
        let row: Option<OwnedAlarm> = sqlx::query_as(&format!(
            "SELECT {COLUMNS}, d.registered_by FROM alarms a JOIN devices d ON d.serial = a.serial \
             JOIN companies c ON c.id = d.company_id WHERE a.id = $1"
        ))
        .bind(id)
        .fetch_optional(self.pool())
        .await
        .map_err(query_err(op))?;
        Ok(row.map(|r| (r.alarm, r.registered_by)))
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
}
