//! Payload validation (CONTRACT §4). Each error names the offending field.
//!
//! This module holds what every topic shares (the JSON object, nesting depth, the device
//! clock's range, typed field access) and the small payloads: location, info, status and
//! command replies. Telemetry, the hot path, is in [`telemetry`]; the rule for text that
//! may be stored is in [`text`].

mod telemetry;
mod text;

use serde_json::{Map, Value};

pub use telemetry::{MAX_ALARM_CHARS, MAX_ALARMS, TelemetrySummary, parse_telemetry};
pub use text::clean_text;

#[derive(Debug, Clone, PartialEq)]
pub struct LocationPayload {
    pub lat: f64,
    pub lon: f64,
    pub accuracy_m: Option<f64>,
}

/// Deepest nesting of arrays and objects a payload may have. RemotEye 4 sends two levels; a
/// deep payload costs parsing time and stack, whichever path parses it.
pub const MAX_DEPTH: usize = 16;
/// Earliest device time accepted (2000-01-01T00:00:00Z, Unix ms); the latest is the receive
/// time plus [`MAX_CLOCK_AHEAD_MS`]. A `ts` outside is a broken clock, not a reading.
pub const MIN_TS_MS: i64 = 946_684_800_000;
pub const MAX_CLOCK_AHEAD_MS: i64 = 24 * 3600 * 1000;

/// Checks nesting depth on the raw bytes, without parsing: brackets outside strings.
fn check_depth(payload: &[u8]) -> Result<(), String> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in payload {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(format!("payload nests deeper than {MAX_DEPTH} levels"));
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// `ts` must lie between 2000-01-01 and a day after the message was received.
fn ts_in_range(ts: i64, received_at_ms: i64) -> Result<i64, String> {
    let latest = received_at_ms.saturating_add(MAX_CLOCK_AHEAD_MS);
    if (MIN_TS_MS..=latest).contains(&ts) {
        Ok(ts)
    } else {
        Err(format!(
            "ts {ts} is outside 2000-01-01 .. one day after receipt ({latest}): the device clock is wrong"
        ))
    }
}

pub(crate) fn object(payload: &[u8]) -> Result<Map<String, Value>, String> {
    let text = std::str::from_utf8(payload).map_err(|e| format!("payload is not UTF-8: {e}"))?;
    check_depth(payload)?;
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(format!(
            "payload must be a JSON object, got {}",
            kind_of(&other)
        )),
        Err(e) => Err(format!("payload is not valid JSON: {e}")),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn number(map: &Map<String, Value>, path: &str, key: &str) -> Result<Option<f64>, String> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(other) => Err(format!(
            "{path}{key} must be a number, got {}",
            kind_of(other)
        )),
    }
}

fn string(map: &Map<String, Value>, key: &str) -> Result<Option<String>, String> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!("{key} must be a string, got {}", kind_of(other))),
    }
}

fn sub_object<'a>(
    map: &'a Map<String, Value>,
    key: &str,
) -> Result<Option<&'a Map<String, Value>>, String> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o)),
        Some(other) => Err(format!("{key} must be an object, got {}", kind_of(other))),
    }
}

/// Validates a location: `lat` in -90..90 and `lon` in -180..180 required, `accuracy_m` ≥ 0.
pub fn parse_location(payload: &[u8]) -> Result<LocationPayload, String> {
    let map = object(payload)?;
    let lat = number(&map, "", "lat")?.ok_or("lat is required")?;
    let lon = number(&map, "", "lon")?.ok_or("lon is required")?;
    let point = tms_model::LatLon::new(lat, lon).map_err(|e| e.to_string())?;
    let accuracy_m = number(&map, "", "accuracy_m")?;
    if accuracy_m.is_some_and(|a| a < 0.0) {
        return Err("accuracy_m must not be negative".into());
    }
    Ok(LocationPayload {
        lat: point.lat(),
        lon: point.lon(),
        accuracy_m,
    })
}

/// `system_name` and `firmware` of an info object.
pub fn parse_info(payload: &[u8]) -> Result<(Option<String>, Option<String>), String> {
    let map = object(payload)?;
    let system_name = string(&map, "system_name")?;
    let firmware = string(&map, "firmware")?;
    for (field, value) in [("system_name", &system_name), ("firmware", &firmware)] {
        if let Some(v) = value {
            clean_text(field, v)?;
        }
    }
    Ok((system_name, firmware))
}

/// What a device says on `tms/<serial>/status`: short UTF-8 text without control characters.
pub fn parse_status(payload: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(payload)
        .map_err(|e| format!("status payload is not UTF-8: {e}"))?
        .trim();
    clean_text("status", text)?;
    Ok(text.to_owned())
}

/// Longest command id a reply may name: ids the gateway makes are 32 hex digits.
const MAX_COMMAND_ID_CHARS: usize = 64;

/// A device's answer to a command: `{"id": "…", "ok": bool, "message"?: "…"}`; returns the
/// command id and `ok`. Other fields are allowed (the reply is stored as sent).
pub fn parse_reply(payload: &[u8]) -> Result<(String, bool), String> {
    let map = object(payload)?;
    let id = string(&map, "id")?.ok_or("id is required")?;
    if id.is_empty() || id.chars().count() > MAX_COMMAND_ID_CHARS {
        return Err(format!(
            "id must be 1 to {MAX_COMMAND_ID_CHARS} characters long"
        ));
    }
    clean_text("id", &id)?;
    let ok = match map.get("ok") {
        Some(Value::Bool(ok)) => *ok,
        None | Some(Value::Null) => return Err("ok is required".into()),
        Some(other) => return Err(format!("ok must be a boolean, got {}", kind_of(other))),
    };
    if let Some(message) = string(&map, "message")? {
        clean_text("message", &message)?;
    }
    Ok((id, ok))
}

#[cfg(test)]
mod tests {
    use super::text::MAX_TEXT_CHARS;
    use super::*;

    /// 2026-12-01T00:00:00Z.
    const NOW: i64 = 1_796_083_200_000;

    #[test]
    fn what_the_store_cannot_hold_is_refused_with_the_field() {
        for (bad, field) in [
            (&br#"{"mode":"a\u0000b"}"#[..], "mode"),
            (br#"{"mode":"on\nbattery"}"#, "mode"),
            (br#"{"ts":1e300}"#, "ts"),
            (br#"{"ts":-1e300}"#, "ts"),
            (br#"{"ts":"9999-12-31T00:00:00Z"}"#, "ts"),
            (br#"{"ts":"1999-12-31T23:59:59Z"}"#, "ts"),
        ] {
            let err = parse_telemetry(bad, NOW).unwrap_err();
            assert!(err.contains(field), "{err:?} should name {field}");
        }
        let long = format!(r#"{{"mode":"{}"}}"#, "x".repeat(MAX_TEXT_CHARS + 1));
        assert!(
            parse_telemetry(long.as_bytes(), NOW)
                .unwrap_err()
                .contains("mode")
        );
        assert!(
            parse_telemetry(br#"{"ts":"2026-12-01T23:00:00Z"}"#, NOW).is_ok(),
            "clock a little ahead"
        );
        assert!(
            parse_info(br#"{"system_name":"x\u0000y"}"#)
                .unwrap_err()
                .contains("system_name")
        );
        assert!(parse_status(b"on\0line").unwrap_err().contains("control"));
        assert_eq!(parse_status(b" online\n").unwrap(), "online");
    }

    #[test]
    fn deep_nesting_is_refused_on_every_path() {
        let deep = format!(
            r#"{{"vendor":{}{}}}"#,
            "[".repeat(20_000),
            "]".repeat(20_000)
        );
        assert!(
            parse_telemetry(deep.as_bytes(), NOW)
                .unwrap_err()
                .contains("deeper")
        );
        assert!(parse_location(deep.as_bytes()).is_err());
        assert!(parse_info(deep.as_bytes()).is_err());
        let ok = format!(
            r#"{{"vendor":{}{}, "s":"[[[[[[[[[[[[[[[[[[[[[[["}}"#,
            "[".repeat(10),
            "]".repeat(10)
        );
        assert!(
            parse_telemetry(ok.as_bytes(), NOW).is_ok(),
            "brackets in strings do not count"
        );
    }

    #[test]
    fn replies_need_an_id_and_a_boolean_ok() {
        assert_eq!(
            parse_reply(br#"{"id":"abc","ok":true,"message":"passed","extra":1}"#),
            Ok(("abc".to_owned(), true))
        );
        assert_eq!(
            parse_reply(br#"{"id":"abc","ok":false}"#),
            Ok(("abc".to_owned(), false))
        );
        for (bad, field) in [
            (&br#"{"ok":true}"#[..], "id"),
            (br#"{"id":"abc"}"#, "ok"),
            (br#"{"id":"abc","ok":"yes"}"#, "ok"),
            (br#"{"id":7,"ok":true}"#, "id"),
            (br#"{"id":"","ok":true}"#, "id"),
            (br#"{"id":"abc","ok":true,"message":3}"#, "message"),
            (br#"{"id":"abc","ok":true,"message":"a\u0000b"}"#, "message"),
            (b"[1]", "object"),
        ] {
            let e = parse_reply(bad).expect_err(&String::from_utf8_lossy(bad));
            assert!(e.contains(field), "{e} should name {field}");
        }
    }

    #[test]
    fn location_ranges_are_checked() {
        assert_eq!(
            parse_location(br#"{"lat":29.76,"lon":-95.37}"#).unwrap(),
            LocationPayload {
                lat: 29.76,
                lon: -95.37,
                accuracy_m: None
            }
        );
        assert!(
            parse_location(br#"{"lat":91,"lon":0}"#)
                .unwrap_err()
                .contains("lat")
        );
        assert!(
            parse_location(br#"{"lat":0,"lon":-181}"#)
                .unwrap_err()
                .contains("lon")
        );
        assert!(
            parse_location(br#"{"lat":0}"#)
                .unwrap_err()
                .contains("lon is required")
        );
    }

    #[test]
    fn no_mutation_of_a_payload_panics_or_lets_through_what_the_store_refuses() {
        let seeds: [&[u8]; 4] = [
            br#"{"ts":"2026-11-30T10:00:00Z","mode":"online","load_pct":41.5,"battery":{"charge_pct":97,"runtime_min":30},"input":{"voltage":230},"alarms":["battery_bad"],"x":[{"y":1}]}"#,
            br#"{"ts":1796000000000,"mode":"on_battery"}"#,
            br#"{"lat":29.76,"lon":-95.37,"accuracy_m":5}"#,
            br#"{"system_name":"1600XP 18kVA 160300007","firmware":"2.1"}"#,
        ];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet = b"{}[]\",:\\u0000aeltrn1-.E+ \x00\x1f\xff";
        for case in 0..20_000 {
            let mut bytes = seeds[case % seeds.len()].to_vec();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % bytes.len().max(1);
                let b = alphabet[(next() as usize) % alphabet.len()];
                match next() % 3 {
                    0 if !bytes.is_empty() => bytes[at] = b,
                    1 => bytes.insert(at.min(bytes.len()), b),
                    _ if !bytes.is_empty() => {
                        bytes.remove(at);
                    }
                    _ => {}
                }
            }
            if let Ok(t) = parse_telemetry(&bytes, NOW) {
                if let Some(mode) = &t.mode {
                    assert!(!mode.chars().any(char::is_control), "{mode:?}");
                }
                if let Some(ts) = t.ts {
                    assert!((MIN_TS_MS..=NOW + MAX_CLOCK_AHEAD_MS).contains(&ts));
                }
            }
            if let Ok(l) = parse_location(&bytes) {
                assert!(l.lat.abs() <= 90.0 && l.lon.abs() <= 180.0);
            }
            if let Ok((name, firmware)) = parse_info(&bytes) {
                for text in [name, firmware].into_iter().flatten() {
                    assert!(!text.contains('\0'));
                }
            }
            if let Ok(text) = parse_status(&bytes) {
                assert!(!text.chars().any(char::is_control));
            }
        }
    }
}
