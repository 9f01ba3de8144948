//! The `device_offline` timer (CONTRACT §7): raises the alarm for devices offline longer than
//! `alarms.offline_after_secs`, and keeps `tms_alarms_active{code}` equal to the store.
//!
//! When a device went offline because the gateway itself stopped (`server_shutdown`,
//! `node_lost`, `gateway_restart`), its window counts from no earlier than this process's
//! start: a restart the device survives raises nothing, a device that stays away past the
//! window is still reported. The clear is ingest's, in the batch of the connect; the sweep
//! also clears the alarm of any device it finds online (a connect that raced it on another
//! node). Not here: telemetry alarms (ingest) or notices (the registry's notifier).

use std::collections::BTreeMap;
use std::time::Duration;

use tms_store::Store;
use tokio_util::sync::CancellationToken;

/// Codes shown by name in `tms_alarms_active{code}`; any other device-reported code is
/// counted as `other`, so a device cannot grow the metric's label set.
const KNOWN_CODES: &[&str] = &[
    "on_battery",
    "on_bypass",
    "ups_fault",
    "low_battery",
    "overload",
    "device_offline",
    "battery_bad",
    "depleted_battery",
    "temperature_bad",
    "input_bad",
    "output_bad",
    "output_overload",
    "bypass_bad",
    "charger_failed",
    "fan_failure",
    "fuse_failure",
    "general_fault",
    "ups_output_off",
    "ups_system_off",
    "shutdown_pending",
    "shutdown_imminent",
    "diagnostic_test_failed",
    "communications_lost",
    "awaiting_power",
    "test_in_progress",
];

pub(crate) struct OfflineAlarms {
    pub(crate) store: Store,
    pub(crate) offline_after: Duration,
    /// This process's start (Unix ms).
    pub(crate) started_at: i64,
    /// Decides which devices have been offline long enough.
    pub(crate) clock: tms_model::SharedClock,
}

impl OfflineAlarms {
    /// How often the sweep runs: a fraction of the window, between 250 ms and 5 s.
    fn tick(&self) -> Duration {
        (self.offline_after / 4).clamp(Duration::from_millis(250), Duration::from_secs(5))
    }

    pub(crate) async fn run(self, stop: CancellationToken) {
        loop {
            self.run_once().await;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.tick()) => {}
            }
        }
    }

    /// One sweep and one update of the gauge; failures are logged and retried next tick.
    pub(crate) async fn run_once(&self) {
        let now = self.clock.now_ms();
        let cutoff = now - self.offline_after.as_millis() as i64;
        match self.store.sweep_offline(cutoff, self.started_at, now).await {
            Ok((raised, cleared)) => {
                if raised > 0 {
                    tracing::info!(devices = raised, "device_offline alarms raised");
                }
                if cleared > 0 {
                    tracing::debug!(
                        devices = cleared,
                        "device_offline alarms of online devices cleared"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, source = ?std::error::Error::source(&e), "device_offline sweep failed; retried")
            }
        }
        match self.store.active_alarm_counts().await {
            Ok(counts) => {
                let mut gauge: BTreeMap<&str, i64> = KNOWN_CODES.iter().map(|c| (*c, 0)).collect();
                gauge.insert("other", 0);
                for (code, n) in &counts {
                    let label = KNOWN_CODES
                        .iter()
                        .find(|c| **c == code.as_str())
                        .copied()
                        .unwrap_or("other");
                    *gauge.entry(label).or_default() += n;
                }
                for (code, n) in gauge {
                    metrics::gauge!("tms_alarms_active", "code" => code).set(n as f64);
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot count open alarms"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tms_model::{DeviceSerial, Mac, ManualClock};
    use tms_store::{NewDevice, StatusEvent, WriteBatch};

    const T0: i64 = 1_800_000_000_000;
    /// `alarms.offline_after_secs` = 300.
    const WINDOW: Duration = Duration::from_secs(300);
    const SERIAL: &str = "RE4A000051";

    /// A store with one device that connected an hour before `T0` and went away at `T0`
    /// for `reason`.
    async fn store_with_device_gone_at_t0(dir: &std::path::Path, reason: &str) -> Store {
        let store = Store::open(&format!("sqlite://{}", dir.join("tms.db").display()))
            .await
            .unwrap();
        let device = NewDevice::new(
            DeviceSerial::parse(SERIAL).unwrap(),
            Mac::parse("00:1B:2C:3D:4E:51").unwrap(),
            "Acme",
            "2026-06-01",
            12,
            T0 + 365 * 86_400_000,
        );
        store.add_device(&device, T0 - 7_200_000).await.unwrap();
        let session = || (SERIAL.to_owned(), "s1".to_owned());
        let status = vec![
            StatusEvent::Connected {
                serial: session().0,
                session_id: session().1,
                at: T0 - 3_600_000,
                peer_addr: "127.0.0.1:50000".into(),
                keep_alive_secs: 30,
                cert_serial: "01".into(),
                node_id: "node-a".into(),
            },
            StatusEvent::Disconnected {
                serial: session().0,
                session_id: session().1,
                at: T0,
                reason: reason.into(),
            },
        ];
        let batch = WriteBatch {
            status,
            ..Default::default()
        };
        store.write_batch(&batch).await.unwrap();
        store
    }

    /// (raised_at, cleared_at) of the device's `device_offline` alarms, oldest first.
    async fn offline_alarms(store: &Store) -> Vec<(i64, Option<i64>)> {
        let filter = tms_store::AlarmFilter {
            limit: 100,
            ..Default::default()
        };
        let mut alarms: Vec<_> = store
            .alarms(&filter)
            .await
            .unwrap()
            .into_iter()
            .filter(|a| a.code == "device_offline")
            .map(|a| (a.raised_at, a.cleared_at))
            .collect();
        alarms.sort();
        alarms
    }

    /// A device away for a reason of its own raises `device_offline` once the sweep's clock
    /// is `alarms.offline_after_secs` past its disconnect, not a millisecond sooner, raises it
    /// once however often the sweep runs, and has it cleared when it is back.
    #[tokio::test]
    async fn offline_raises_its_alarm_only_once_the_clock_passes_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_device_gone_at_t0(dir.path(), "keep_alive_timeout").await;
        let clock = ManualClock::shared(T0);
        let sweep = OfflineAlarms {
            store: store.clone(),
            offline_after: WINDOW,
            started_at: T0 - 86_400_000,
            clock: clock.clone(),
        };
        sweep.run_once().await;
        clock.set(T0 + 299_999);
        sweep.run_once().await;
        assert_eq!(offline_alarms(&store).await, vec![], "raised too soon");
        clock.set(T0 + 300_000);
        sweep.run_once().await;
        assert_eq!(offline_alarms(&store).await, vec![(T0 + 300_000, None)]);
        clock.advance(Duration::from_secs(600));
        sweep.run_once().await;
        assert_eq!(offline_alarms(&store).await.len(), 1, "raised twice");

        let back = T0 + 1_000_000;
        let batch = WriteBatch {
            status: vec![StatusEvent::Connected {
                serial: SERIAL.into(),
                session_id: "s2".into(),
                at: back,
                peer_addr: "127.0.0.1:50001".into(),
                keep_alive_secs: 30,
                cert_serial: "01".into(),
                node_id: "node-a".into(),
            }],
            ..Default::default()
        };
        store.write_batch(&batch).await.unwrap();
        clock.set(back + 1_000);
        sweep.run_once().await;
        assert_eq!(
            offline_alarms(&store).await,
            vec![(T0 + 300_000, Some(back))]
        );
        store.close().await;
    }

    /// A device that went offline because the gateway stopped counts its window from this
    /// process's start: a restart it outlasts by less than the window raises nothing, one it
    /// stays away from past the window (counted from the start) does.
    #[tokio::test]
    async fn after_a_restart_the_window_counts_from_the_process_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_with_device_gone_at_t0(dir.path(), "server_shutdown").await;
        let started_at = T0 + 120_000;
        let clock = ManualClock::shared(started_at);
        let sweep = OfflineAlarms {
            store: store.clone(),
            offline_after: WINDOW,
            started_at,
            clock: clock.clone(),
        };
        clock.set(T0 + 300_000);
        sweep.run_once().await;
        clock.set(started_at + 299_999);
        sweep.run_once().await;
        assert_eq!(
            offline_alarms(&store).await,
            vec![],
            "the downtime of the gateway counted against the device"
        );
        clock.set(started_at + 300_000);
        sweep.run_once().await;
        assert_eq!(
            offline_alarms(&store).await,
            vec![(started_at + 300_000, None)]
        );
        store.close().await;
    }
}
