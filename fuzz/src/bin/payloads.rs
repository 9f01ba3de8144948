//! Payloads a device publishes, through every parser ingest uses; accepted values must be
//! storable (no control characters in text, `ts` in range).
fn main() {
    const NOW: i64 = 1_796_083_200_000;
    afl::fuzz!(|data: &[u8]| {
        if let Ok(t) = tms_ingest::parse_telemetry(data, NOW)
            && let Some(mode) = &t.mode
        {
            assert!(!mode.chars().any(char::is_control));
        }
        let _ = tms_ingest::parse_location(data);
        if let Ok((name, firmware)) = tms_ingest::parse_info(data) {
            for text in [name, firmware].into_iter().flatten() {
                assert!(!text.chars().any(char::is_control));
            }
        }
        let _ = tms_ingest::parse_status(data);
    });
}
