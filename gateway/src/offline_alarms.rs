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
