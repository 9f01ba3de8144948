//! Which text may be stored as a device sent it: no control characters, no invisible
//! formatting characters, a bounded length. Whether a field is text at all is checked by
//! the caller.

/// Longest text kept in a column of its own (`mode`, `system_name`, `firmware`).
pub const MAX_TEXT_CHARS: usize = 256;

/// Characters that change how text around them is shown without being seen themselves:
/// direction overrides and isolates (U+202E makes "gnp.exe" read as "exe.png"), zero-width
/// characters, line and paragraph separators. A device has no use for them in a mode or a name.
fn invisible(c: char) -> bool {
    matches!(
        c,
        '\u{200B}'..='\u{200F}'
            | '\u{2028}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{2069}'
            | '\u{FEFF}'
    )
}

/// A text value that can be stored as it is: no control characters (PostgreSQL refuses NUL
/// in text; the others break logs and pages), no invisible formatting characters and at most
/// [`MAX_TEXT_CHARS`] characters.
pub fn clean_text(field: &str, value: &str) -> Result<(), String> {
    // One pass: this runs for text fields of every message.
    let mut chars = 0;
    for c in value.chars() {
        chars += 1;
        let what = if c.is_control() {
            "control character"
        } else if invisible(c) {
            "invisible formatting character"
        } else {
            continue;
        };
        return Err(format!(
            "{field} contains the {what} U+{:04X}",
            u32::from(c)
        ));
    }
    if chars > MAX_TEXT_CHARS {
        return Err(format!(
            "{field} is {chars} characters long (at most {MAX_TEXT_CHARS})"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_telemetry;

    #[test]
    fn invisible_formatting_characters_are_refused_by_name() {
        let e = clean_text("mode", "online\u{202E}gnp").unwrap_err();
        assert_eq!(e, "mode contains the invisible formatting character U+202E");
        assert!(clean_text("mode", "a\u{2028}b").is_err());
        assert!(clean_text("system_name", "Smart-UPS 1500 ünïcödé").is_ok());
        for payload in [
            r#"{"mode":"on\u202eline"}"#,
            "{\"mode\":\"on\u{202E}line\"}",
        ] {
            let e = parse_telemetry(payload.as_bytes(), 1).unwrap_err();
            assert!(e.contains("U+202E"), "{payload}: {e}");
        }
    }
}
