//! What the registry's tests share: a private SQLite store, a registered device and an
//! account, with every field a test does not care about filled in once.

use tms_model::{DeviceSerial, Mac};
use tms_store::{NewDevice, NewUser, Store};

/// A migrated SQLite store in `dir`.
pub(crate) async fn store(dir: &std::path::Path) -> Store {
    Store::open(&format!("sqlite://{}", dir.join("tms.db").display()))
        .await
        .unwrap()
}

/// A RemotEye 4 of company "Acme" whose lease ends at `lease_ends_at` (Unix ms), registered
/// by the provider `registered_by`.
pub(crate) fn device(
    serial: &str,
    mac: &str,
    lease_ends_at: i64,
    registered_by: Option<i64>,
) -> NewDevice {
    let serial = DeviceSerial::parse(serial).unwrap();
    let mac = Mac::parse(mac).unwrap();
    let mut device = NewDevice::new(serial, mac, "Acme", "2026-06-01", 12, lease_ends_at);
    device.details.registered_by = registered_by;
    device
}

/// An account with `role` at `company_id`, active or awaiting activation.
pub(crate) fn user(email: &str, role: &str, company_id: Option<i64>, active: bool) -> NewUser {
    NewUser {
        email: email.into(),
        role: role.into(),
        password_hash: String::new(),
        first_name: Some("Ada".into()),
        last_name: None,
        phone: None,
        company_id,
        active,
        must_change_password: false,
    }
}

/// The queued mails of `kind` (delivered or not), as (recipient, subject, message).
pub(crate) async fn queued_mails(store: &Store, kind: &str) -> Vec<(String, String, String)> {
    store
        .due_mails(i64::MAX, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|m| m.kind == kind)
        .map(|m| {
            let subject = m
                .message
                .lines()
                .find_map(|l| l.strip_prefix("Subject: "))
                .unwrap_or_default()
                .to_owned();
            (m.recipient, subject, m.message)
        })
        .collect()
}

/// The composer of every test mail.
pub(crate) fn composer() -> crate::mail::Composer {
    crate::mail::Composer {
        from: "tms@example.com".into(),
        public_url: "https://tms.example.com".into(),
    }
}
