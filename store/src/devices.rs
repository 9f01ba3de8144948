//! Devices, their companies, and what the fleet view reads: status, telemetry, location.

use sqlx::AnyConnection;
use tms_model::{ConnState, DeviceSerial, Mac};

use crate::row::{MaybeFlag, StateColumn};
use crate::{Backend, Result, Store, StoreError, query_err, unique_err};

/// What is registered about a device besides its identity and company: its type, lease, UPS
/// and orders. The same on the way in ([`NewDevice`]) and out ([`DeviceRecord`]).
#[derive(Debug, Clone, Default, PartialEq, sqlx::FromRow)]
pub struct DeviceDetails {
    pub device_type: String,
    pub lease_months: i64,
    /// ISO 8601 date, `YYYY-MM-DD`.
    pub start_date: String,
    /// When the lease ends (Unix ms): start date + lease months.
    pub lease_ends_at: i64,
    pub ups_model: Option<String>,
    pub ups_model_number: Option<String>,
    pub ups_serial: Option<String>,
    pub ups_ship_date: Option<String>,
    pub sales_order: Option<String>,
    pub service_contract_sales_order: Option<String>,
    pub registered_by: Option<i64>,
}

/// A device to register. The company is found by name or created.
#[derive(Debug, Clone)]
pub struct NewDevice {
    pub serial: DeviceSerial,
    pub mac: Mac,
    pub company: String,
    pub details: DeviceDetails,
}

impl NewDevice {
    /// A RemotEye 4 of `company` whose lease of `lease_months` from `start_date` ends at
    /// `lease_ends_at` (Unix ms), without any of the optional UPS, order and provider details;
    /// add those through `details`.
    pub fn new(
        serial: DeviceSerial,
        mac: Mac,
        company: &str,
        start_date: &str,
        lease_months: i64,
        lease_ends_at: i64,
    ) -> Self {
        NewDevice {
            serial,
            mac,
            company: company.to_owned(),
            details: DeviceDetails {
                device_type: "RemotEye 4".to_owned(),
                lease_months,
                start_date: start_date.to_owned(),
                lease_ends_at,
                ..DeviceDetails::default()
            },
        }
    }
}

/// A registered device as stored.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct DeviceRecord {
    pub serial: String,
    pub mac: String,
    pub company_id: i64,
    pub company: String,
    #[sqlx(flatten)]
    pub details: DeviceDetails,
    pub created_at: i64,
    /// End of the newest valid certificate, if the device has one (Unix ms).
    pub certificate_not_after: Option<i64>,
    /// The System Name the device reported (`info`), and whether it names another UPS.
    pub system_name: Option<String>,
    #[sqlx(try_from = "MaybeFlag")]
    pub identity_mismatch: Option<bool>,
}

/// The connection status of a device; all times are Unix milliseconds. Read from a `LEFT
/// JOIN`: a device without a status row has every field empty and never connected.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct DeviceStatus {
    #[sqlx(try_from = "StateColumn")]
    pub state: ConnState,
    pub since: Option<i64>,
    pub last_seen: Option<i64>,
    pub peer_addr: Option<String>,
    pub session_id: Option<String>,
    pub keep_alive_secs: Option<i64>,
    pub cert_serial: Option<String>,
    pub last_disconnect_reason: Option<String>,
    pub reported_status: Option<String>,
    pub last_telemetry_at: Option<i64>,
    /// The device's usual telemetry interval, a running average (ms).
    pub telemetry_interval_ms: Option<i64>,
    pub last_connect_error: Option<String>,
    pub last_connect_error_detail: Option<String>,
    pub last_connect_error_at: Option<i64>,
}

impl DeviceStatus {
    pub fn never_connected() -> Self {
        DeviceStatus {
            state: ConnState::NeverConnected,
            since: None,
            last_seen: None,
            peer_addr: None,
            session_id: None,
            keep_alive_secs: None,
            cert_serial: None,
            last_disconnect_reason: None,
            reported_status: None,
            last_telemetry_at: None,
            telemetry_interval_ms: None,
            last_connect_error: None,
            last_connect_error_detail: None,
            last_connect_error_at: None,
        }
    }
}

/// A device with its status, as the fleet view shows it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct DeviceView {
    #[sqlx(flatten)]
    pub device: DeviceRecord,
    #[sqlx(flatten)]
    pub status: DeviceStatus,
}

/// Which devices to list. Every set field narrows the list.
#[derive(Debug, Clone, Default)]
pub struct DeviceFilter {
    /// Substring of serial, company name, UPS model or UPS serial (case-insensitive).
    pub q: Option<String>,
    pub state: Option<ConnState>,
    pub company_id: Option<i64>,
    pub registered_by: Option<i64>,
}

/// Orders location sources best first.
pub(crate) const SOURCE_RANK: &str =
    "CASE source WHEN 'device' THEN 0 WHEN 'operator' THEN 1 ELSE 2 END, updated_at DESC";

/// What the fleet gauges show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetCounts {
    pub online: i64,
    pub offline: i64,
    pub never_connected: i64,
    pub certificates_expiring_30d: i64,
    pub leases_expiring_30d: i64,
    pub identity_mismatches: i64,
}

const DEVICE_COLUMNS: &str = "d.serial, d.mac, d.company_id, c.name AS company, d.device_type, \
    d.lease_months, d.start_date, d.lease_ends_at, d.ups_model, d.ups_model_number, d.ups_serial, d.ups_ship_date, \
    d.sales_order, d.service_contract_sales_order, d.registered_by, d.created_at, \
    (SELECT MAX(x.not_after) FROM certificates x WHERE x.device_serial = d.serial AND x.revoked_at IS NULL) \
    AS certificate_not_after, i.system_name, i.identity_mismatch";

const STATUS_COLUMNS: &str = "s.state, s.since, s.last_seen, s.peer_addr, s.session_id, \
    s.keep_alive_secs, s.cert_serial, s.last_disconnect_reason, s.reported_status, s.last_telemetry_at, s.telemetry_interval_ms, s.last_connect_error, \
    s.last_connect_error_detail, s.last_connect_error_at";

/// What a device view is read from (aliases `d`, `c`, `s`, `i`); the caller adds the `WHERE`.
const VIEW_FROM: &str = "FROM devices d JOIN companies c ON c.id = d.company_id \
    LEFT JOIN device_status s ON s.serial = d.serial LEFT JOIN device_info i ON i.serial = d.serial";

/// Finds the company by name, creating it when `create` is set.
pub(crate) async fn company_id(
    conn: &mut AnyConnection,
    name: &str,
    create: bool,
    now_ms: i64,
) -> Result<Option<i64>> {
    // One company per name, whatever its case or surrounding spaces: `acme hospital ` is the
    // existing "Acme Hospital", which keeps the spelling it was first registered with (the
    // unique index `companies_name_folded` holds the same rule in the schema).
    let name = name.trim();
    if let Some(id) = find_company(conn, name).await? {
        return Ok(Some(id));
    }
    if !create {
        return Ok(None);
    }
    sqlx::query("INSERT INTO companies (name, created_at) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .bind(name)
        .bind(now_ms)
        .execute(&mut *conn)
        .await
        .map_err(query_err("creating a company"))?;
    find_company(conn, name).await
}

async fn find_company(conn: &mut AnyConnection, name: &str) -> Result<Option<i64>> {
    sqlx::query_scalar("SELECT id FROM companies WHERE LOWER(name) = LOWER($1)")
        .bind(name)
        .fetch_optional(&mut *conn)
        .await
        .map_err(query_err("finding a company"))
}

/// Inserts a device inside the caller's transaction; a taken serial or MAC is a `Conflict`.
pub(crate) async fn insert_device(
    conn: &mut AnyConnection,
    d: &NewDevice,
    company_id: i64,
    now_ms: i64,
) -> Result<()> {
    let taken: Option<String> =
        sqlx::query_scalar("SELECT serial FROM devices WHERE serial = $1 OR mac = $2")
            .bind(d.serial.as_str())
            .bind(d.mac.to_string())
            .fetch_optional(&mut *conn)
            .await
            .map_err(query_err("checking device serial and MAC"))?;
    if let Some(serial) = taken {
        return Err(StoreError::Conflict {
            what: if serial == d.serial.as_str() {
                "device serial"
            } else {
                "device MAC"
            },
        });
    }
    sqlx::query(
        "INSERT INTO devices (serial, mac, company_id, device_type, lease_months, start_date, \
         ups_model, ups_model_number, ups_serial, ups_ship_date, sales_order, \
         service_contract_sales_order, registered_by, created_at, lease_ends_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
    )
    .bind(d.serial.as_str())
    .bind(d.mac.to_string())
    .bind(company_id)
    .bind(&d.details.device_type)
    .bind(d.details.lease_months)
    .bind(&d.details.start_date)
    .bind(d.details.ups_model.as_deref())
    .bind(d.details.ups_model_number.as_deref())
    .bind(d.details.ups_serial.as_deref())
    .bind(d.details.ups_ship_date.as_deref())
    .bind(d.details.sales_order.as_deref())
    .bind(d.details.service_contract_sales_order.as_deref())
    .bind(d.details.registered_by)
    .bind(now_ms)
    .bind(d.details.lease_ends_at)
    .execute(&mut *conn)
    .await
    .map_err(unique_err("registering a device", "device serial or MAC"))?;
    Ok(())
}

impl Store {
    /// Registers a device (and its company, if new) in one transaction.
    pub async fn add_device(&self, d: &NewDevice, now_ms: i64) -> Result<()> {
        let mut tx = self.begin_write("starting a transaction").await?;
        let company = company_id(&mut tx, &d.company, true, now_ms)
            .await?
            .ok_or(StoreError::NotFound { what: "company" })?;
        insert_device(&mut tx, d, company, now_ms).await?;
        tx.commit()
            .await
            .map_err(query_err("committing a device"))?;
        Ok(())
    }

    pub async fn device(&self, serial: &str) -> Result<Option<DeviceView>> {
        let sql =
            format!("SELECT {DEVICE_COLUMNS}, {STATUS_COLUMNS} {VIEW_FROM} WHERE d.serial = $1");
        sqlx::query_as(&sql)
            .bind(serial)
            .fetch_optional(self.pool())
            .await
            .map_err(query_err("reading a device"))
    }

    pub async fn devices(&self, filter: &DeviceFilter) -> Result<Vec<DeviceView>> {
        let mut sql = format!("SELECT {DEVICE_COLUMNS}, {STATUS_COLUMNS} {VIEW_FROM} WHERE 1 = 1");
        let mut n = 0;
        let mut next = || {
            n += 1;
            n
        };
        if filter.q.is_some() {
            let i = next();
            sql.push_str(&format!(
                " AND (LOWER(d.serial) LIKE ${i} OR LOWER(c.name) LIKE ${i} \
                 OR LOWER(COALESCE(d.ups_model, '')) LIKE ${i} OR LOWER(COALESCE(d.ups_serial, '')) LIKE ${i})"
            ));
        }
        match filter.state {
            Some(ConnState::NeverConnected) => {
                sql.push_str(" AND (s.state IS NULL OR s.state = 'never_connected')")
            }
            Some(state) => sql.push_str(&format!(" AND s.state = '{}'", state.as_str())),
            None => {}
        }
        if filter.company_id.is_some() {
            sql.push_str(&format!(" AND d.company_id = ${}", next()));
        }
        if filter.registered_by.is_some() {
            sql.push_str(&format!(" AND d.registered_by = ${}", next()));
        }
        sql.push_str(" ORDER BY d.serial");
        let mut query = sqlx::query_as(&sql);
        if let Some(q) = &filter.q {
            let escaped = q.to_lowercase().replace(['%', '_'], "");
            query = query.bind(format!("%{escaped}%"));
        }
        if let Some(c) = filter.company_id {
            query = query.bind(c);
        }
        if let Some(u) = filter.registered_by {
            query = query.bind(u);
        }
        query
            .fetch_all(self.pool())
            .await
            .map_err(query_err("listing devices"))
    }

    /// Extends a lease by `months` from its current end, or from `now` if it already ended.
    /// Returns the new end (Unix ms), computed by `extend(from_ms) -> end_ms`.
    pub async fn renew_lease(
        &self,
        serial: &str,
        months: i64,
        now_ms: i64,
        extend: impl Fn(i64) -> i64,
    ) -> Result<i64> {
        // Read and update in one write transaction (the row locked on PostgreSQL): two
        // renewals at once both count.
        let mut tx = self.begin_write("starting a lease renewal").await?;
        let lock = match self.backend() {
            Backend::Postgres => " FOR UPDATE",
            Backend::Sqlite => "",
        };
        let current: i64 = sqlx::query_scalar(&format!(
            "SELECT lease_ends_at FROM devices WHERE serial = $1{lock}"
        ))
        .bind(serial)
        .fetch_optional(&mut *tx)
        .await
        .map_err(query_err("reading a lease"))?
        .ok_or(StoreError::NotFound { what: "device" })?;
        let ends = extend(current.max(now_ms));
        sqlx::query("UPDATE devices SET lease_ends_at = $1, lease_months = lease_months + $2, lease_notice_sent_at = NULL WHERE serial = $3")
            .bind(ends)
            .bind(months)
            .bind(serial)
            .execute(&mut *tx)
            .await
            .map_err(query_err("renewing a lease"))?;
        // Recorded with the change, for the device timeline: the lease row keeps only the
        // current end.
        sqlx::query(
            "INSERT INTO lease_changes (serial, changed_at, months_added, lease_months, previous_ends_at, lease_ends_at) \
             SELECT serial, $1, $2, lease_months, $3, lease_ends_at FROM devices WHERE serial = $4",
        )
        .bind(now_ms)
        .bind(months)
        .bind(current)
        .bind(serial)
        .execute(&mut *tx)
        .await
        .map_err(query_err("recording a lease change"))?;
        tx.commit().await.map_err(query_err("renewing a lease"))?;
        Ok(ends)
    }

    /// Counts for the fleet gauges.
    pub async fn fleet_counts(&self, now_ms: i64) -> Result<FleetCounts> {
        let soon = now_ms + 30 * 86_400_000;
        let (online, offline, total, certs, leases, mismatches): (i64, i64, i64, i64, i64, i64) =
            sqlx::query_as(
            "SELECT \
             (SELECT COUNT(*) FROM device_status s JOIN devices d ON d.serial = s.serial WHERE s.state = 'online') AS online, \
             (SELECT COUNT(*) FROM device_status s JOIN devices d ON d.serial = s.serial WHERE s.state = 'offline') AS offline, \
             (SELECT COUNT(*) FROM devices) AS total, \
             (SELECT COUNT(*) FROM certificates WHERE revoked_at IS NULL AND not_after > $1 AND not_after <= $2) AS certs, \
             (SELECT COUNT(*) FROM devices WHERE lease_ends_at > $1 AND lease_ends_at <= $2) AS leases, \
             (SELECT COUNT(*) FROM device_info WHERE identity_mismatch = 1) AS mismatches",
        )
        .bind(now_ms)
        .bind(soon)
        .fetch_one(self.pool())
        .await
        .map_err(query_err("counting the fleet"))?;
        Ok(FleetCounts {
            online,
            offline,
            never_connected: (total - online - offline).max(0),
            certificates_expiring_30d: certs,
            leases_expiring_30d: leases,
            identity_mismatches: mismatches,
        })
    }

    /// Marks every device this node still shows online as offline: on start-up, those
    /// sessions belong to an earlier process that ended without saying so.
    pub async fn end_stale_sessions(&self, node_id: &str, at: i64, reason: &str) -> Result<u64> {
        let mut tx = self.begin_write("starting to end stale sessions").await?;
        let done = sqlx::query(
            "UPDATE device_status SET state = 'offline', since = $1, last_disconnect_reason = $2 \
             WHERE state = 'online' AND node_id = $3",
        )
        .bind(at)
        .bind(reason)
        .bind(node_id)
        .execute(&mut *tx)
        .await
        .map_err(query_err("ending stale sessions"))?;
        sqlx::query("UPDATE device_sessions SET ended_at = $1, end_reason = $2 WHERE node_id = $3 AND ended_at IS NULL")
            .bind(at)
            .bind(reason)
            .bind(node_id)
            .execute(&mut *tx)
            .await
            .map_err(query_err("ending stale sessions"))?;
        tx.commit()
            .await
            .map_err(query_err("ending stale sessions"))?;
        Ok(done.rows_affected())
    }
}
