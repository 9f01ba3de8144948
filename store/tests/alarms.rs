//! Alarms on every backend (see `common`): raises, the offline sweep, notices and
//! webhook claims.

#![expect(clippy::unwrap_used, reason = "test helpers fail the test loudly")]

mod common;

use common::{add_device, backends};
use tms_store::*;

/// Alarms on both backends: a raise replayed (a retried batch, a second node) stays one
/// record; the offline sweep honours the process start; a notice is mailed once, and a
/// webhook claim excludes a second claimer.
#[tokio::test]
async fn alarms_are_raised_once_swept_and_noticed_once() {
    for store in backends().await.stores {
        add_device(&store, "RE4A1", "00:1B:2C:3D:4E:5F").await;
        add_device(&store, "RE4A2", "00:1B:2C:3D:4E:60").await;
        let raise = AlarmChange::Raise {
            serial: "RE4A1".into(),
            code: "on_battery".into(),
            severity: "critical",
            at: 1_000,
            detail: r#"{"mode":"on_battery"}"#.into(),
        };
        let batch = WriteBatch {
            alarms: vec![raise.clone(), raise.clone()],
            ..Default::default()
        };
        store.write_batch(&batch).await.unwrap();
        store.write_batch(&batch).await.unwrap();
        let all = AlarmFilter {
            limit: 100,
            ..Default::default()
        };
        let list = store.alarms(&all).await.unwrap();
        assert_eq!(list.len(), 1, "{:?}", store.backend());
        assert_eq!(list[0].company, "Acme");
        assert_eq!(
            store.open_alarms(Some(&["RE4A1".into()])).await.unwrap(),
            vec![("RE4A1".to_owned(), "on_battery".to_owned())]
        );

        // The notice: mailed once; a second attempt finds nothing left to mail.
        let due = store
            .notice_due_companies(Channel::Email, 2_000, 2_000)
            .await
            .unwrap();
        assert_eq!(due.len(), 1);
        let group = store
            .notice_group(Channel::Email, due[0], None)
            .await
            .unwrap();
        assert_eq!((group.devices, group.events.len()), (2, 1));
        assert!(
            store
                .queue_alarm_mail(&group, &[], false, 2_000)
                .await
                .unwrap()
        );
        assert!(
            !store
                .queue_alarm_mail(&group, &[], false, 2_001)
                .await
                .unwrap()
        );
        // The webhook: one claimer holds the rows until it finishes.
        assert_eq!(
            store
                .claim_webhook(due[0], "a", 2_000, 60_000)
                .await
                .unwrap(),
            1
        );
        assert_eq!(
            store
                .claim_webhook(due[0], "b", 2_000, 60_000)
                .await
                .unwrap(),
            0
        );
        let held = store
            .notice_group(Channel::Webhook, due[0], Some("a"))
            .await
            .unwrap();
        store
            .finish_webhook("a", &held.events, false, 2_100, 5_000)
            .await
            .unwrap();
        assert!(
            store
                .notice_due_companies(Channel::Webhook, 3_000, 3_000)
                .await
                .unwrap()
                .is_empty(),
            "waits for its retry"
        );
        assert_eq!(
            store
                .claim_webhook(due[0], "b", 5_000, 60_000)
                .await
                .unwrap(),
            1
        );
        store
            .finish_webhook("b", &held.events, true, 5_100, 0)
            .await
            .unwrap();
        assert!(
            store
                .notice_due_companies(Channel::Webhook, 9_000, 9_000)
                .await
                .unwrap()
                .is_empty()
        );

        // The clear closes it; acknowledging keeps the first acknowledger.
        let clear = WriteBatch {
            alarms: vec![AlarmChange::Clear {
                serial: "RE4A1".into(),
                code: "on_battery".into(),
                at: 3_000,
            }],
            ..Default::default()
        };
        store.write_batch(&clear).await.unwrap();
        assert!(store.open_alarms(None).await.unwrap().is_empty());
        let id = list[0].id;
        assert!(
            store
                .acknowledge_alarm(id, "ana@example.com", 4_000)
                .await
                .unwrap()
        );
        assert!(
            store
                .acknowledge_alarm(id, "bob@example.com", 5_000)
                .await
                .unwrap()
        );
        let (a, _) = store.alarm(id).await.unwrap().unwrap();
        assert_eq!(
            (a.cleared_at, a.acknowledged_by.as_deref()),
            (Some(3_000), Some("ana@example.com"))
        );

        // device_offline: RE4A2 went offline at 10 s because the gateway stopped; this
        // process started at 20 s, so with a 5 s window nothing is due before 25 s.
        let session = |reason: &str| {
            vec![
                StatusEvent::Connected {
                    serial: "RE4A2".into(),
                    session_id: "s2".into(),
                    at: 5_000,
                    peer_addr: "127.0.0.1:5000".into(),
                    keep_alive_secs: 30,
                    cert_serial: "0b".into(),
                    node_id: "n1".into(),
                },
                StatusEvent::Disconnected {
                    serial: "RE4A2".into(),
                    session_id: "s2".into(),
                    at: 10_000,
                    reason: reason.into(),
                },
            ]
        };
        store
            .write_batch(&WriteBatch {
                status: session("server_shutdown"),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            store
                .sweep_offline(24_000 - 5_000, 20_000, 24_000)
                .await
                .unwrap()
                .0,
            0
        );
        assert_eq!(
            store
                .sweep_offline(25_000 - 5_000, 20_000, 25_000)
                .await
                .unwrap()
                .0,
            1
        );
        assert_eq!(
            store
                .sweep_offline(26_000 - 5_000, 20_000, 26_000)
                .await
                .unwrap()
                .0,
            0,
            "once"
        );
        let counts = store.active_alarm_counts().await.unwrap();
        assert_eq!(counts, vec![("device_offline".to_owned(), 1)]);
    }
}
