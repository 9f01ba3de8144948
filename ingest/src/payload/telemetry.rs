//! Telemetry validation: a fast typed path for well-formed messages and a slower path
//! over a `Value` tree whose errors name the field. Both must reach the same verdict.
//! Checks shared with the other topics (depth, clock range, field access) live in the
//! parent module.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{check_depth, clean_text, kind_of, number, object, string, sub_object, ts_in_range};

/// The telemetry fields kept in their own columns; the whole object is kept beside them.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetrySummary {
    /// Device time in Unix ms, when the payload carried `ts`.
    pub ts: Option<i64>,
    pub mode: Option<String>,
    pub load_pct: Option<f64>,
    pub battery_charge_pct: Option<f64>,
    pub battery_runtime_min: Option<f64>,
    /// The alarms the device itself reports; `None` when the payload has no `alarms` list
    /// (nothing known), empty when it reports none.
    pub alarms: Option<Vec<String>>,
}

/// Most alarm names one telemetry message may carry, and the longest name.
pub const MAX_ALARMS: usize = 32;
pub const MAX_ALARM_CHARS: usize = 64;

/// Each device-reported alarm must be a short clean text: it becomes an alarm code.
fn check_alarms(alarms: &[String]) -> Result<(), String> {
    if alarms.len() > MAX_ALARMS {
        return Err(format!(
            "alarms has {} entries (at most {MAX_ALARMS})",
            alarms.len()
        ));
    }
    for (i, a) in alarms.iter().enumerate() {
        let field = format!("alarms[{i}]");
        clean_text(&field, a)?;
        if a.trim().is_empty() || a.chars().count() > MAX_ALARM_CHARS {
            return Err(format!(
                "{field} must be 1 to {MAX_ALARM_CHARS} characters long"
            ));
        }
    }
    Ok(())
}

/// Validates a telemetry object received at `received_at_ms`: every field optional, known
/// fields must have their types and sane values, unknown fields are allowed (the payload is
/// stored as sent).
pub fn parse_telemetry(payload: &[u8], received_at_ms: i64) -> Result<TelemetrySummary, String> {
    let summary = telemetry_fields(payload)?;
    if let Some(mode) = &summary.mode {
        clean_text("mode", mode)?;
    }
    if let Some(ts) = summary.ts {
        ts_in_range(ts, received_at_ms)?;
    }
    if let Some(alarms) = &summary.alarms {
        check_alarms(alarms)?;
    }
    Ok(summary)
}

fn telemetry_fields(payload: &[u8]) -> Result<TelemetrySummary, String> {
    check_depth(payload)?;
    // The hot path: a well-formed message is read straight into the fields we check. Any
    // message it does not accept goes through `checked_telemetry`, whose errors name the field.
    let starts_as_object = payload
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{');
    if starts_as_object && let Ok(t) = serde_json::from_slice::<FastTelemetry>(payload) {
        return Ok(TelemetrySummary {
            ts: match t.ts {
                None | Some(Value::Null) => None,
                Some(v) => Some(ts_ms(&v)?),
            },
            mode: t.mode.map(Cow::into_owned),
            load_pct: t.load_pct,
            battery_charge_pct: t.battery.as_ref().and_then(|b| b.charge_pct),
            battery_runtime_min: t.battery.and_then(|b| b.runtime_min),
            alarms: t.alarms,
        });
    }
    checked_telemetry(payload)
}

/// The telemetry fields CONTRACT §4 names, typed; unknown fields are skipped without being
/// built, so a valid message costs no `Value` tree.
#[derive(Deserialize)]
struct FastTelemetry<'a> {
    ts: Option<Value>,
    #[serde(borrow)]
    mode: Option<Cow<'a, str>>,
    load_pct: Option<f64>,
    battery: Option<FastBattery>,
    #[serde(rename = "input")]
    _input: Option<FastElectric>,
    #[serde(rename = "output")]
    _output: Option<FastElectric>,
    alarms: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct FastBattery {
    charge_pct: Option<f64>,
    runtime_min: Option<f64>,
    #[serde(rename = "voltage")]
    _voltage: Option<f64>,
    #[serde(rename = "temperature_c")]
    _temperature_c: Option<f64>,
}

#[derive(Deserialize)]
struct FastElectric {
    #[serde(rename = "voltage")]
    _voltage: Option<f64>,
    #[serde(rename = "frequency_hz")]
    _frequency_hz: Option<f64>,
    #[serde(rename = "current_a")]
    _current_a: Option<f64>,
}

/// `ts` as Unix ms: epoch milliseconds or an RFC 3339 string.
fn ts_ms(v: &Value) -> Result<i64, String> {
    match v {
        Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_f64().map(|f| f as i64))
            .ok_or_else(|| "ts must be epoch milliseconds or an RFC 3339 string".to_owned()),
        Value::String(s) => {
            let t = OffsetDateTime::parse(s, &Rfc3339)
                .map_err(|e| format!("ts {s:?} is not RFC 3339: {e}"))?;
            Ok((t.unix_timestamp_nanos() / 1_000_000) as i64)
        }
        other => Err(format!(
            "ts must be epoch milliseconds or an RFC 3339 string, got {}",
            kind_of(other)
        )),
    }
}

/// The same validation over a `Value` tree, slower, with errors that name the field.
fn checked_telemetry(payload: &[u8]) -> Result<TelemetrySummary, String> {
    let map = object(payload)?;
    let ts = match map.get("ts") {
        None | Some(Value::Null) => None,
        Some(v) => Some(ts_ms(v)?),
    };
    let mode = string(&map, "mode")?;
    let load_pct = number(&map, "", "load_pct")?;
    let mut battery_charge_pct = None;
    let mut battery_runtime_min = None;
    if let Some(battery) = sub_object(&map, "battery")? {
        battery_charge_pct = number(battery, "battery.", "charge_pct")?;
        battery_runtime_min = number(battery, "battery.", "runtime_min")?;
        for key in ["voltage", "temperature_c"] {
            number(battery, "battery.", key)?;
        }
    }
    for section in ["input", "output"] {
        if let Some(obj) = sub_object(&map, section)? {
            for key in ["voltage", "frequency_hz", "current_a"] {
                number(obj, &format!("{section}."), key)?;
            }
        }
    }
    let alarms = match map.get("alarms") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => Some(
            items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
        ),
        Some(_) => return Err("alarms must be an array of strings".into()),
    };
    Ok(TelemetrySummary {
        ts,
        mode,
        load_pct,
        battery_charge_pct,
        battery_runtime_min,
        alarms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fast path must accept exactly what the field-naming path accepts, with the same
    /// values: one verdict, whichever path reaches it.
    #[test]
    fn fast_and_checked_telemetry_agree() {
        let cases: &[&[u8]] = &[
            br#"{"ts":"2026-11-28T10:00:00Z","mode":"online","load_pct":41.5,"battery":{"charge_pct":97,"runtime_min":30,"voltage":54.1,"temperature_c":22},"input":{"voltage":230,"frequency_hz":50},"output":{"voltage":230,"frequency_hz":50,"current_a":6.1},"alarms":["overload"],"x":{"y":[1,2]}}"#,
            br#"  {"ts":1700000000123.7,"mode":"on_\u0062attery"}"#,
            br#"{"ts":null,"mode":null,"load_pct":null,"battery":null,"alarms":null}"#,
            br#"{"load_pct":1,"load_pct":2}"#,
            b"{}",
            br#"[null,null,null,null,null,null,null]"#,
            br#"[]"#,
            br#"{"mode":5}"#,
            br#"{"battery":[1]}"#,
            br#"{"battery":{"charge_pct":"full"}}"#,
            br#"{"input":{"current_a":true}}"#,
            br#"{"output":"x"}"#,
            br#"{"alarms":["a",2]}"#,
            br#"{"alarms":"a"}"#,
            br#"{"ts":"soon"}"#,
            br#"{"ts":true}"#,
            br#"{"load_pct":1e400}"#,
            b"\xff",
            b"",
            b"null",
        ];
        for case in cases {
            assert_eq!(
                telemetry_fields(case).is_ok(),
                checked_telemetry(case).is_ok(),
                "{}",
                String::from_utf8_lossy(case)
            );
            if let (Ok(fast), Ok(checked)) = (telemetry_fields(case), checked_telemetry(case)) {
                assert_eq!(fast, checked, "{}", String::from_utf8_lossy(case));
            }
        }
    }

    #[test]
    fn telemetry_accepts_unknown_fields_and_names_bad_ones() {
        let s = parse_telemetry(
            br#"{"ts":"2026-11-28T10:00:00Z","mode":"on_battery","load_pct":41.5,"battery":{"charge_pct":97},"vendor_x":1}"#,
            NOW,
        )
        .unwrap();
        assert_eq!(s.ts, Some(1_795_860_000_000));
        assert_eq!(s.mode.as_deref(), Some("on_battery"));
        assert_eq!((s.load_pct, s.battery_charge_pct), (Some(41.5), Some(97.0)));
        assert_eq!(
            parse_telemetry(br#"{"ts":1700000000123}"#, NOW).unwrap().ts,
            Some(1_700_000_000_123)
        );
        assert!(parse_telemetry(b"{}", NOW).is_ok());

        for (bad, field) in [
            (&br#"{"load_pct":"high"}"#[..], "load_pct"),
            (br#"{"battery":{"voltage":"x"}}"#, "battery.voltage"),
            (br#"{"ts":"yesterday"}"#, "ts"),
            (br#"{"alarms":[1]}"#, "alarms"),
            (br#"[1,2]"#, "JSON object"),
            (b"{not json", "not valid JSON"),
        ] {
            let err = parse_telemetry(bad, NOW).unwrap_err();
            assert!(err.contains(field), "{err:?} should name {field}");
        }
    }

    /// 2026-12-01T00:00:00Z.
    const NOW: i64 = 1_796_083_200_000;
}
