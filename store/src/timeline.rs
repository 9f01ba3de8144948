//! A device's timeline (CONTRACT §8): one list, newest first, read from the records that
//! already exist — the registration, certificates, sessions, refused attempts, alarms,
//! commands (§9) and lease changes.
//!
//! Each kind of record is one [`Source`]: a query for the device's newest `limit` events of
//! that kind. The timeline asks every source and merges. A new kind of record is one more
//! function in [`SOURCES`]. Retention is that of the records themselves
//! (`presence.history_retention_days` prunes sessions and alarms). Times inside `detail` are
//! Unix ms under keys ending in `_at`; the API turns them into RFC 3339.
//! Not here: who may see a device (the API scopes first).

use std::future::Future;
use std::pin::Pin;

use serde_json::{Value, json};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{Result, Store, query_err};

/// One entry of a device's timeline.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceEvent {
    /// Unix ms.
    pub at: i64,
    /// `registered`, `certificate_issued`, `certificate_revoked`, `certificate_superseded`,
    /// `connected`, `disconnected`, `refused`, `alarm_raised`, `alarm_cleared`,
    /// `alarm_acknowledged`, `command`, `lease_changed`.
    pub kind: &'static str,
    pub detail: Value,
}

type Events<'a> = Pin<Box<dyn Future<Output = Result<Vec<DeviceEvent>>> + Send + 'a>>;
/// The newest `limit` events of one kind of record for one device.
type Source = for<'a> fn(&'a Store, &'a str, i64) -> Events<'a>;

/// Every kind of record the timeline reads.
const SOURCES: &[Source] = &[
    registered,
    certificates,
    sessions,
    refusals,
    alarms,
    commands,
    lease_changes,
];

impl Store {
    /// The device's events, newest first, at most `limit`.
    pub async fn device_events(&self, serial: &str, limit: i64) -> Result<Vec<DeviceEvent>> {
        let mut all = Vec::new();
        for source in SOURCES {
            all.extend(source(self, serial, limit).await?);
        }
        // Newest first; at one instant, the later step of a story first (connected before
        // registered reads wrong from the top).
        all.sort_by(|a, b| b.at.cmp(&a.at).then(order(b.kind).cmp(&order(a.kind))));
        all.truncate(usize::try_from(limit).unwrap_or(0));
        Ok(all)
    }
}

fn order(kind: &str) -> u8 {
    match kind {
        "registered" => 0,
        "certificate_issued" | "lease_changed" => 1,
        "certificate_superseded" | "certificate_revoked" => 2,
        "refused" => 3,
        "connected" => 4,
        "alarm_raised" | "command" => 5,
        "alarm_acknowledged" => 6,
        "alarm_cleared" => 7,
        _ => 8,
    }
}

async fn rows(
    store: &Store,
    op: &'static str,
    sql: &str,
    serial: &str,
    limit: i64,
) -> Result<Vec<AnyRow>> {
    sqlx::query(sql)
        .bind(serial)
        .bind(limit)
        .fetch_all(store.pool())
        .await
        .map_err(query_err(op))
}

/// A source whose every row is one event: `at` from the column `at`, the detail from
/// `detail`.
#[expect(
    clippy::too_many_arguments,
    reason = "one call per source, each argument named there"
)]
async fn each_row(
    store: &Store,
    op: &'static str,
    sql: &str,
    serial: &str,
    limit: i64,
    kind: &'static str,
    at: &str,
    detail: fn(&AnyRow) -> Result<Value, sqlx::Error>,
) -> Result<Vec<DeviceEvent>> {
    rows(store, op, sql, serial, limit)
        .await?
        .iter()
        .map(|r| {
            Ok(DeviceEvent {
                at: r.try_get(at)?,
                kind,
                detail: detail(r)?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(query_err(op))
}

/// A source whose rows each give one or more events: `events` reads one row into `out`.
async fn per_row(
    store: &Store,
    op: &'static str,
    sql: &str,
    serial: &str,
    limit: i64,
    events: fn(&AnyRow, &mut Vec<DeviceEvent>) -> Result<(), sqlx::Error>,
) -> Result<Vec<DeviceEvent>> {
    let mut out = Vec::new();
    for r in &rows(store, op, sql, serial, limit).await? {
        events(r, &mut out).map_err(query_err(op))?;
    }
    Ok(out)
}

fn registered<'a>(store: &'a Store, serial: &'a str, limit: i64) -> Events<'a> {
    Box::pin(each_row(
        store,
        "reading the registration",
        "SELECT d.created_at, d.lease_months, d.lease_ends_at, d.start_date, c.name AS company, u.email AS registered_by \
         FROM devices d JOIN companies c ON c.id = d.company_id LEFT JOIN users u ON u.id = d.registered_by \
         WHERE d.serial = $1 LIMIT $2",
        serial,
        limit,
        "registered",
        "created_at",
        |r| {
            Ok(json!({
                "company": r.try_get::<String, _>("company")?,
                "registered_by": r.try_get::<Option<String>, _>("registered_by")?,
                "lease_months": r.try_get::<i64, _>("lease_months")?,
                "start_date": r.try_get::<String, _>("start_date")?,
            }))
        },
    ))
}

fn certificates<'a>(store: &'a Store, serial: &'a str, limit: i64) -> Events<'a> {
    Box::pin(per_row(
        store,
        "reading certificate events",
        "SELECT serial_number, issued_at, revoked_at, revocation_reason FROM certificates \
         WHERE device_serial = $1 ORDER BY COALESCE(revoked_at, issued_at) DESC LIMIT $2",
        serial,
        limit,
        |r, out| {
            let cert: String = r.try_get("serial_number")?;
            out.push(DeviceEvent {
                at: r.try_get("issued_at")?,
                kind: "certificate_issued",
                detail: json!({"certificate_serial": cert}),
            });
            let revoked: Option<i64> = r.try_get("revoked_at")?;
            if let Some(at) = revoked {
                let reason: Option<String> = r.try_get("revocation_reason")?;
                let kind = if reason.as_deref() == Some("superseded") {
                    "certificate_superseded"
                } else {
                    "certificate_revoked"
                };
                out.push(DeviceEvent {
                    at,
                    kind,
                    detail: json!({"certificate_serial": cert, "reason": reason}),
                });
            }
            Ok(())
        },
    ))
}

fn sessions<'a>(store: &'a Store, serial: &'a str, limit: i64) -> Events<'a> {
    Box::pin(per_row(
        store,
        "reading session events",
        "SELECT session_id, node_id, peer_addr, started_at, ended_at, end_reason FROM device_sessions \
         WHERE serial = $1 ORDER BY started_at DESC LIMIT $2",
        serial,
        limit,
        |r, out| {
            let node: String = r.try_get("node_id")?;
            let peer: Option<String> = r.try_get("peer_addr")?;
            out.push(DeviceEvent {
                at: r.try_get("started_at")?,
                kind: "connected",
                detail: json!({"node_id": node, "peer_addr": peer}),
            });
            let ended: Option<i64> = r.try_get("ended_at")?;
            if let Some(at) = ended {
                let reason: Option<String> = r.try_get("end_reason")?;
                out.push(DeviceEvent {
                    at,
                    kind: "disconnected",
                    detail: json!({"reason": reason, "node_id": node, "peer_addr": peer}),
                });
            }
            Ok(())
        },
    ))
}

fn refusals<'a>(store: &'a Store, serial: &'a str, limit: i64) -> Events<'a> {
    Box::pin(async move {
        Ok(store
            .refusals(serial, limit)
            .await?
            .into_iter()
            .map(|r| DeviceEvent {
                at: r.last_at,
                kind: "refused",
                detail: json!({
                    "reason": r.reason,
                    "detail": r.detail,
                    "peer_addr": r.peer_addr,
                    "attempts": r.attempts,
                }),
            })
            .collect())
    })
}

fn alarms<'a>(store: &'a Store, serial: &'a str, limit: i64) -> Events<'a> {
    Box::pin(per_row(
        store,
        "reading alarm events",
        "SELECT id, code, severity, raised_at, cleared_at, acknowledged_at, acknowledged_by FROM alarms \
         WHERE serial = $1 ORDER BY raised_at DESC LIMIT $2",
        serial,
        limit,
        |r, out| {
            let id: i64 = r.try_get("id")?;
            let code: String = r.try_get("code")?;
            let severity: String = r.try_get("severity")?;
            let detail = json!({"alarm_id": id, "code": code, "severity": severity});
            out.push(DeviceEvent {
                at: r.try_get("raised_at")?,
                kind: "alarm_raised",
                detail: detail.clone(),
            });
            if let Some(at) = r.try_get::<Option<i64>, _>("acknowledged_at")? {
                let mut d = detail.clone();
                d["by"] = r.try_get::<Option<String>, _>("acknowledged_by")?.into();
                out.push(DeviceEvent {
                    at,
                    kind: "alarm_acknowledged",
                    detail: d,
                });
            }
            if let Some(at) = r.try_get::<Option<i64>, _>("cleared_at")? {
                out.push(DeviceEvent {
                    at,
                    kind: "alarm_cleared",
                    detail,
                });
            }
            Ok(())
        },
    ))
}

/// One `command` event per step a command took: queued, delivered (PUBACKed), answered
/// (`succeeded`/`failed`), or expired undelivered. `detail.state` names the step.
fn commands<'a>(store: &'a Store, serial: &'a str, limit: i64) -> Events<'a> {
    Box::pin(per_row(
        store,
        "reading command events",
        "SELECT id, name, state, created_at, created_by, expires_at, delivered_at, replied_at FROM device_commands \
         WHERE serial = $1 ORDER BY created_at DESC LIMIT $2",
        serial,
        limit,
        |r, out| {
            let get = |col: &str| -> Result<Option<i64>, sqlx::Error> { r.try_get(col) };
            let id: String = r.try_get("id")?;
            let name: String = r.try_get("name")?;
            let state: String = r.try_get("state")?;
            let by: String = r.try_get("created_by")?;
            let step = |at: i64, step: &str| DeviceEvent {
                at,
                kind: "command",
                detail: json!({"id": id, "name": name, "state": step, "by": by}),
            };
            // The later steps first: at one instant (a reply recorded with its delivery) the
            // stable sort keeps this order, and the timeline reads newest first.
            if let Some(at) = get("replied_at")? {
                out.push(step(at, &state));
            }
            if let Some(at) = get("delivered_at")? {
                out.push(step(at, "delivered"));
            } else if state == "expired" {
                out.push(step(r.try_get("expires_at")?, "expired"));
            }
            out.push(step(r.try_get("created_at")?, "queued"));
            Ok(())
        },
    ))
}

fn lease_changes<'a>(store: &'a Store, serial: &'a str, limit: i64) -> Events<'a> {
    Box::pin(each_row(
        store,
        "reading lease changes",
        "SELECT changed_at, months_added, lease_months, previous_ends_at, lease_ends_at FROM lease_changes \
         WHERE serial = $1 ORDER BY changed_at DESC, id DESC LIMIT $2",
        serial,
        limit,
        "lease_changed",
        "changed_at",
        |r| {
            Ok(json!({
                "months_added": r.try_get::<i64, _>("months_added")?,
                "lease_months": r.try_get::<i64, _>("lease_months")?,
                "previous_ends_at": r.try_get::<i64, _>("previous_ends_at")?,
                "lease_ends_at": r.try_get::<i64, _>("lease_ends_at")?,
            }))
        },
    ))
}
