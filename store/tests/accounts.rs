//! Certificates and accounts on every backend (see `common`), including the login-attempt
//! reservation under concurrency.

#![expect(clippy::unwrap_used, reason = "test helpers fail the test loudly")]

mod common;

use common::{add_device, backends};
use tms_store::*;

/// An active staff account with a settled password.
fn staff(email: &str, role: &str) -> NewUser {
    NewUser {
        email: email.into(),
        role: role.into(),
        password_hash: "$argon2id$x".into(),
        active: true,
        ..NewUser::default()
    }
}

#[tokio::test]
async fn certificates_and_accounts() {
    for store in backends().await.stores {
        add_device(&store, "RE4A1", "00:1B:2C:3D:4E:5F").await;
        for (sn, at) in [("0a01", 10), ("0a02", 20)] {
            store
                .add_certificate(&CertificateRecord {
                    serial_number: sn.into(),
                    device_serial: "RE4A1".into(),
                    sha256_fingerprint: "ff".into(),
                    not_before: 0,
                    not_after: 1_000,
                    issued_at: at,
                    revoked_at: None,
                    revocation_reason: None,
                })
                .await
                .unwrap();
        }
        assert_eq!(
            store.certificates_of("RE4A1").await.unwrap()[0].serial_number,
            "0a02"
        );
        let mut revoked = store
            .revoke_device_certificates("RE4A1", "operator", 50)
            .await
            .unwrap();
        revoked.sort();
        assert_eq!(revoked, vec!["0a01", "0a02"]);
        assert!(
            store
                .revoke_device_certificates("RE4A1", "operator", 60)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(store.revocations().await.unwrap().len(), 2);

        let user = staff("Ops@Example.com", "admin");
        let id = store.add_user(&user, 1).await.unwrap();
        let err = store
            .add_user(
                &NewUser {
                    email: "ops@example.COM".into(),
                    ..user.clone()
                },
                2,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Conflict {
                    what: "account email"
                }
            ),
            "{err}"
        );
        let found = store
            .user_by_email("OPS@example.com")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (found.id, found.account.active, found.account.role.as_str()),
            (id, true, "admin")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_login_attempts_reserve_at_most_the_limit_per_lock_window() {
    for store in backends().await.stores {
        let user = staff("locked@example.com", "provider");
        let id = store.add_user(&user, 1).await.unwrap();
        let attempts: Vec<_> = (0..40)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .reserve_login_attempt(id, 5, 1_000, 2_000)
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut reserved = 0;
        for a in attempts {
            reserved += usize::from(a.await.unwrap());
        }
        assert_eq!(reserved, 5, "{:?}", store.backend());
        let locked = store.user_by_id(id).await.unwrap().unwrap();
        assert_eq!(locked.locked_until, Some(2_000));
        assert!(
            !store
                .reserve_login_attempt(id, 5, 1_999, 9_000)
                .await
                .unwrap()
        );
        // The lock ran out: the count starts afresh.
        assert!(
            store
                .reserve_login_attempt(id, 5, 2_000, 9_000)
                .await
                .unwrap()
        );
        let after = store.user_by_id(id).await.unwrap().unwrap();
        assert_eq!(after.locked_until, None);
        store.reset_login_failures(id).await.unwrap();
    }
}
