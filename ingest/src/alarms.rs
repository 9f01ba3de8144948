//! The alarm engine (CONTRACT §7): from each telemetry message, the conditions that hold;
//! against the device's open alarms, the raises and clears to write in the same batch.
//!
//! The open set of every device is kept in memory, as committed: rebuilt from the store at
//! start, reloaded for a device when it connects (another node may have changed it), and
//! changed only after the batch that carries a change is committed. While a batch is being
//! built, the changes it already holds are kept beside it, so two messages of one batch do
//! not raise twice. A message that repeats what is open costs no SQL.
//!
//! A field the message does not carry says nothing: a telemetry without `mode` leaves the
//! mode alarms as they are; `low_battery` is judged by whichever of charge and runtime it
//! carries; a message without an `alarms` list leaves the device-reported alarms alone.
//! `device_offline` is not this engine's: a timer raises it and a connect clears it.
//! Not here: SQL (the store) or who is told (the registry's notifier).

use std::collections::HashMap;

use tms_store::AlarmChange;

use crate::payload::TelemetrySummary;

/// Thresholds of the derived alarms (`alarms.low_battery_pct`, `alarms.low_runtime_min`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AlarmSettings {
    pub low_battery_pct: f64,
    pub low_runtime_min: f64,
}

impl Default for AlarmSettings {
    fn default() -> Self {
        AlarmSettings {
            low_battery_pct: 20.0,
            low_runtime_min: 5.0,
        }
    }
}

/// The codes the engine derives from `mode`.
const MODE_CODES: [(&str, &str); 3] = [
    ("on_battery", "on_battery"),
    ("bypass", "on_bypass"),
    ("fault", "ups_fault"),
];
pub const LOW_BATTERY: &str = "low_battery";
pub const OVERLOAD: &str = "overload";
pub const DEVICE_OFFLINE: &str = "device_offline";

/// Codes that only the gateway raises: a device listing one of them in `alarms` is ignored
/// for it (the reading it is derived from decides).
fn derived(code: &str) -> bool {
    matches!(
        code,
        "on_battery" | "on_bypass" | "ups_fault" | LOW_BATTERY | OVERLOAD | DEVICE_OFFLINE
    )
}

/// Severity of a code: RFC 1628 (UPS-MIB) well-known alarms by how soon the load is at risk.
/// Critical: the load runs on battery or may drop now; warning: protection is degraded;
/// info: a state an operator asked for. Names as devices send them (snake case).
pub fn severity(code: &str) -> &'static str {
    match code {
        "on_battery" | "ups_fault" | LOW_BATTERY | DEVICE_OFFLINE | "battery_bad"
        | "depleted_battery" | "output_bad" | "output_overload" | "charger_failed"
        | "ups_output_off" | "ups_system_off" | "shutdown_pending" | "shutdown_imminent"
        | "general_fault" | "fuse_failure" => "critical",
        "test_in_progress" | "output_off_as_requested" | "ups_off_as_requested" => "info",
        _ => "warning",
    }
}

/// Open alarms per device, as committed, and the changes of the batch being built.
#[derive(Debug, Default)]
pub struct AlarmEngine {
    settings: AlarmSettings,
    /// False only to measure what the engine costs (benchmarks).
    enabled: bool,
    /// Open telemetry-derived alarms per device, as committed; devices with none absent.
    open: HashMap<String, Vec<String>>,
    /// The open set as of the batch being built, for devices whose set it changes.
    pending: HashMap<String, Vec<String>>,
}

impl AlarmEngine {
    pub fn new(settings: AlarmSettings) -> Self {
        AlarmEngine {
            settings,
            enabled: true,
            ..Default::default()
        }
    }

    /// An engine that raises nothing: the baseline of the ingest benchmark.
    pub fn disabled() -> Self {
        AlarmEngine::default()
    }

    /// Replaces the committed open sets of `serials` (all devices when `None`) by `open`,
    /// as read from the store: (serial, code).
    pub fn load(&mut self, serials: Option<&[String]>, open: Vec<(String, String)>) {
        match serials {
            None => self.open.clear(),
            Some(serials) => {
                for s in serials {
                    self.open.remove(s);
                }
            }
        }
        for (serial, code) in open {
            if code != DEVICE_OFFLINE {
                let set = self.open.entry(serial).or_default();
                if !set.contains(&code) {
                    set.push(code);
                }
            }
        }
    }

    /// Changes of a committed batch: from now on they are what is open.
    pub fn committed(&mut self, changes: &[AlarmChange]) {
        for c in changes {
            let code = c.code();
            if code == DEVICE_OFFLINE {
                continue;
            }
            match c {
                AlarmChange::Raise { serial, .. } => {
                    let set = self.open.entry(serial.clone()).or_default();
                    if !set.iter().any(|o| o == code) {
                        set.push(code.to_owned());
                    }
                }
                AlarmChange::Clear { serial, .. } => {
                    if let Some(set) = self.open.get_mut(serial) {
                        set.retain(|o| o != code);
                        if set.is_empty() {
                            self.open.remove(serial);
                        }
                    }
                }
            }
        }
    }

    /// The batch being built is taken: its changes count once committed ([`Self::committed`]).
    pub fn batch_taken(&mut self) {
        self.pending.clear();
    }

    /// How many devices have open alarms (as committed).
    pub fn devices_with_alarms(&self) -> usize {
        self.open.len()
    }

    /// Compares what `t` says with the device's open alarms; pushes the raises and clears.
    /// A message that changes nothing allocates nothing.
    pub fn evaluate(
        &mut self,
        serial: &str,
        t: &TelemetrySummary,
        at: i64,
        out: &mut Vec<AlarmChange>,
    ) {
        if !self.enabled {
            return;
        }
        let current: &[String] = match self.pending.get(serial) {
            Some(set) => set,
            None => self.open.get(serial).map_or(&[], Vec::as_slice),
        };
        // The hot paths: nothing open and nothing to raise; or what is open still holds
        // and nothing new does.
        if current.is_empty() && !self.any_condition(t) {
            return;
        }
        let mut raises = false;
        self.each_condition(t, |code| raises |= !current.iter().any(|c| c == code));
        let clears = current.iter().any(|c| self.holds(t, c) == Some(false));
        if !raises && !clears {
            return;
        }
        let mut next: Vec<String> = Vec::with_capacity(current.len() + 1);
        for code in current {
            match self.holds(t, code) {
                Some(false) => out.push(AlarmChange::Clear {
                    serial: serial.to_owned(),
                    code: code.clone(),
                    at,
                }),
                // Still holds, or the message says nothing about it.
                _ => next.push(code.clone()),
            }
        }
        self.each_condition(t, |code| {
            if !next.iter().any(|c| c == code) {
                out.push(AlarmChange::Raise {
                    serial: serial.to_owned(),
                    code: code.to_owned(),
                    severity: severity(code),
                    at,
                    detail: detail(t),
                });
                next.push(code.to_owned());
            }
        });
        self.pending.insert(serial.to_owned(), next);
    }

    /// Calls `f` with each alarm code whose condition holds in `t`.
    fn each_condition(&self, t: &TelemetrySummary, mut f: impl FnMut(&str)) {
        if let Some(mode) = &t.mode
            && let Some((_, code)) = MODE_CODES.iter().find(|(m, _)| m == mode)
        {
            f(code);
        }
        if self.low_battery(t) == Some(true) {
            f(LOW_BATTERY);
        }
        if t.load_pct.is_some_and(|l| l >= 100.0) {
            f(OVERLOAD);
        }
        for code in t.alarms.iter().flatten() {
            if !derived(code) {
                f(code);
            }
        }
    }

    /// True when some alarm condition holds in `t` (cheap: no allocation).
    fn any_condition(&self, t: &TelemetrySummary) -> bool {
        t.mode
            .as_deref()
            .is_some_and(|m| MODE_CODES.iter().any(|(mode, _)| *mode == m))
            || self.low_battery(t) == Some(true)
            || t.load_pct.is_some_and(|l| l >= 100.0)
            || t.alarms.iter().flatten().any(|a| !derived(a))
    }

    /// `Some(true)` when the battery is low by what `t` carries, `None` when it carries neither.
    fn low_battery(&self, t: &TelemetrySummary) -> Option<bool> {
        let charge = t
            .battery_charge_pct
            .map(|c| c < self.settings.low_battery_pct);
        let runtime = t
            .battery_runtime_min
            .map(|r| r < self.settings.low_runtime_min);
        match (charge, runtime) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(false) || b.unwrap_or(false)),
        }
    }

    /// Whether the open alarm `code` still holds by `t`; `None` when `t` says nothing of it.
    fn holds(&self, t: &TelemetrySummary, code: &str) -> Option<bool> {
        if let Some((_, c)) = MODE_CODES.iter().find(|(_, c)| *c == code) {
            let mode = t.mode.as_deref()?;
            return Some(MODE_CODES.iter().any(|(m, mc)| *m == mode && mc == c));
        }
        match code {
            LOW_BATTERY => self.low_battery(t),
            OVERLOAD => t.load_pct.map(|l| l >= 100.0),
            _ => t.alarms.as_ref().map(|list| list.iter().any(|a| a == code)),
        }
    }
}

/// What the alarm's record keeps of the message that raised it.
fn detail(t: &TelemetrySummary) -> String {
    let mut d = serde_json::Map::new();
    if let Some(m) = &t.mode {
        d.insert("mode".into(), m.clone().into());
    }
    let mut num = |k: &str, v: Option<f64>| {
        if let Some(n) = v.and_then(serde_json::Number::from_f64) {
            d.insert(k.into(), n.into());
        }
    };
    num("load_pct", t.load_pct);
    num("charge_pct", t.battery_charge_pct);
    num("runtime_min", t.battery_runtime_min);
    serde_json::Value::Object(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(json: &str) -> TelemetrySummary {
        crate::parse_telemetry(json.as_bytes(), 1_800_000_000_000).unwrap()
    }

    fn run(e: &mut AlarmEngine, json: &str) -> Vec<AlarmChange> {
        let mut out = Vec::new();
        e.evaluate("RE4A1", &t(json), 1, &mut out);
        e.batch_taken();
        e.committed(&out);
        out
    }

    fn codes(changes: &[AlarmChange]) -> Vec<String> {
        changes
            .iter()
            .map(|c| match c {
                AlarmChange::Raise { code, .. } => format!("+{code}"),
                AlarmChange::Clear { code, .. } => format!("-{code}"),
            })
            .collect()
    }

    #[test]
    fn raises_once_and_clears_once_per_transition() {
        let mut e = AlarmEngine::new(AlarmSettings::default());
        assert!(run(&mut e, r#"{"mode":"online","load_pct":40}"#).is_empty());
        assert_eq!(
            codes(&run(&mut e, r#"{"mode":"on_battery"}"#)),
            ["+on_battery"]
        );
        assert!(run(&mut e, r#"{"mode":"on_battery"}"#).is_empty(), "repeat");
        assert!(
            run(&mut e, r#"{"load_pct":50}"#).is_empty(),
            "no mode: unchanged"
        );
        assert_eq!(
            codes(&run(&mut e, r#"{"mode":"bypass"}"#)),
            ["-on_battery", "+on_bypass"]
        );
        assert_eq!(codes(&run(&mut e, r#"{"mode":"online"}"#)), ["-on_bypass"]);
        assert_eq!(e.devices_with_alarms(), 0);
    }

    #[test]
    fn low_battery_from_charge_or_runtime_and_clears_when_both_are_fine() {
        let mut e = AlarmEngine::new(AlarmSettings::default());
        assert_eq!(
            codes(&run(
                &mut e,
                r#"{"battery":{"charge_pct":15,"runtime_min":30}}"#
            )),
            ["+low_battery"]
        );
        assert!(run(&mut e, r#"{"battery":{"charge_pct":90,"runtime_min":3}}"#).is_empty());
        assert_eq!(
            codes(&run(
                &mut e,
                r#"{"battery":{"charge_pct":90,"runtime_min":5}}"#
            )),
            ["-low_battery"]
        );
        assert_eq!(
            codes(&run(&mut e, r#"{"battery":{"runtime_min":4.5}}"#)),
            ["+low_battery"]
        );
    }

    #[test]
    fn device_alarms_overload_and_the_changes_of_one_batch() {
        let mut e = AlarmEngine::new(AlarmSettings::default());
        let mut out = Vec::new();
        // Two messages in one batch before its commit: raised once.
        for _ in 0..2 {
            e.evaluate(
                "RE4A1",
                &t(r#"{"alarms":["battery_bad","on_battery"],"load_pct":100}"#),
                1,
                &mut out,
            );
        }
        assert_eq!(
            codes(&out),
            ["+overload", "+battery_bad"],
            "on_battery is derived"
        );
        let AlarmChange::Raise { severity, .. } = &out[1] else {
            panic!()
        };
        assert_eq!(*severity, "critical");
        // Not committed (the batch failed): nothing is open.
        e.batch_taken();
        assert_eq!(e.devices_with_alarms(), 0);
        e.committed(&out);
        assert_eq!(
            codes(&run(&mut e, r#"{"alarms":[],"load_pct":99.9}"#)),
            ["-overload", "-battery_bad"]
        );
    }

    #[test]
    fn loading_replaces_a_devices_set() {
        let mut e = AlarmEngine::new(AlarmSettings::default());
        e.load(None, vec![("RE4A1".into(), "on_battery".into())]);
        assert!(run(&mut e, r#"{"mode":"on_battery"}"#).is_empty());
        e.load(Some(&["RE4A1".into()]), vec![]);
        assert_eq!(
            codes(&run(&mut e, r#"{"mode":"on_battery"}"#)),
            ["+on_battery"]
        );
    }
}
