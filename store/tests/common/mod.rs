//! What every store test file shares: the backends to run on (SQLite always, PostgreSQL
//! when `TMS_TEST_DATABASE_URL` is set, each test in a fresh schema) and a device to register.

use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::{Connection, Executor};
use tms_model::{DeviceSerial, Mac};
use tms_store::{Backend, DeviceDetails, NewDevice, Store};

pub struct Backends {
    pub stores: Vec<Store>,
    _dir: tempfile::TempDir,
}

pub async fn backends() -> Backends {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    let mut stores = vec![Store::open(&url).await.unwrap()];
    let pg = std::env::var("TMS_TEST_DATABASE_URL");
    // scripts/test requires every leg: a missing PostgreSQL fails instead of passing on SQLite.
    assert!(
        pg.is_ok() || !std::env::var("TMS_TEST_REQUIRE_ALL").is_ok_and(|v| v == "1"),
        "TMS_TEST_REQUIRE_ALL=1 and TMS_TEST_DATABASE_URL is not set: the PostgreSQL leg cannot run"
    );
    if let Ok(base) = pg {
        sqlx::any::install_default_drivers();
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let schema = format!("t_{}_{}", std::process::id(), nanos);
        let mut conn = sqlx::AnyConnection::connect(&base).await.unwrap();
        conn.execute(format!("CREATE SCHEMA {schema}").as_str())
            .await
            .unwrap();
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}options=-c%20search_path%3D{schema}");
        let store = Store::open(&url).await.unwrap();
        assert_eq!(store.backend(), Backend::Postgres);
        stores.push(store);
    }
    Backends { stores, _dir: dir }
}

/// Registers `device(serial, mac, "Acme")` at time 1.
pub async fn add_device(store: &Store, serial: &str, mac: &str) {
    store
        .add_device(&device(serial, mac, "Acme"), 1)
        .await
        .unwrap();
}

pub fn device(serial: &str, mac: &str, company: &str) -> NewDevice {
    NewDevice {
        serial: DeviceSerial::parse(serial).unwrap(),
        mac: Mac::parse(mac).unwrap(),
        company: company.into(),
        details: DeviceDetails {
            device_type: "RemotEye 4".into(),
            lease_months: 12,
            start_date: "2026-12-01".into(),
            lease_ends_at: 1_827_619_200_000,
            ups_model: Some("1600XP".into()),
            ups_serial: Some("160300007".into()),
            ..DeviceDetails::default()
        },
    }
}
