//! Which topics a device may use: publish to
//! `tms/<serial>/{telemetry,location,info,status,reply}`, subscribe below `tms/<serial>/cmd/`.
//! Everything else is denied. Also: which of a session's filters a command topic matches.
//!
//! The `<serial>` level matches in either case: serials have one (upper-case) spelling, and a
//! device whose certificate was issued before that still names itself in lower case.

use tms_model::{DeviceSerial, TopicKind};

/// The kind of `topic` if `serial` may publish to it.
pub fn publish_kind(serial: &DeviceSerial, topic: &[u8]) -> Option<TopicKind> {
    let rest = strip_serial(topic.strip_prefix(b"tms/")?, serial)?;
    match rest {
        b"/telemetry" => Some(TopicKind::Telemetry),
        b"/location" => Some(TopicKind::Location),
        b"/info" => Some(TopicKind::Info),
        b"/status" => Some(TopicKind::Status),
        b"/reply" => Some(TopicKind::Reply),
        _ => None,
    }
}

/// Whether `serial` may subscribe to `filter`: only `tms/<serial>/cmd/#`, `tms/<serial>/cmd`
/// or filters below it, with wildcards only inside that subtree.
pub fn may_subscribe(serial: &DeviceSerial, filter: &str) -> bool {
    let Some(rest) = filter
        .as_bytes()
        .strip_prefix(b"tms/")
        .and_then(|rest| strip_serial(rest, serial))
        .and_then(|rest| rest.strip_prefix(b"/cmd"))
    else {
        return false;
    };
    rest.is_empty() || rest.starts_with(b"/")
}

/// Whether the MQTT topic filter `filter` matches `topic` (`+` one level, `#` the rest,
/// including the parent level). The serial level (the second) matches in either case, as in
/// [`may_subscribe`].
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    let mut levels = topic.split('/');
    for (i, f) in filter.split('/').enumerate() {
        if f == "#" {
            return true;
        }
        let Some(level) = levels.next() else {
            return false;
        };
        let same = if i == 1 {
            f.eq_ignore_ascii_case(level)
        } else {
            f == level
        };
        if f != "+" && !same {
            return false;
        }
    }
    levels.next().is_none()
}

/// `topic` without its leading `serial` level, matched in either case.
fn strip_serial<'t>(topic: &'t [u8], serial: &DeviceSerial) -> Option<&'t [u8]> {
    let serial = serial.as_str().as_bytes();
    let (level, rest) = topic.split_at_checked(serial.len())?;
    level.eq_ignore_ascii_case(serial).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_stays_inside_its_own_topics() {
        let s = DeviceSerial::parse("RE4A1").unwrap();
        assert_eq!(
            publish_kind(&s, b"tms/RE4A1/telemetry"),
            Some(TopicKind::Telemetry)
        );
        assert_eq!(
            publish_kind(&s, b"tms/RE4A1/status"),
            Some(TopicKind::Status)
        );
        for bad in [
            &b"tms/RE4A2/telemetry"[..],
            b"tms/RE4A1/telemetry/x",
            b"tms/RE4A1/cmd/x",
            b"tms/RE4A1",
            b"tms/RE4A12/info",
            b"x/tms/RE4A1/info",
        ] {
            assert_eq!(
                publish_kind(&s, bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(publish_kind(&s, b"tms/RE4A1/reply"), Some(TopicKind::Reply));
        assert!(may_subscribe(&s, "tms/RE4A1/cmd/#"));
        assert!(may_subscribe(&s, "tms/RE4A1/cmd/reboot"));
        assert!(may_subscribe(&s, "tms/RE4A1/cmd"));
        // A certificate issued before serials had one spelling names the device in lower case.
        assert_eq!(publish_kind(&s, b"tms/re4a1/info"), Some(TopicKind::Info));
        assert!(may_subscribe(&s, "tms/re4a1/cmd/#"));
        for bad in [
            "tms/#",
            "tms/+/cmd/#",
            "tms/RE4A1/#",
            "tms/RE4A1/cmdx",
            "tms/RE4A2/cmd/#",
            "#",
        ] {
            assert!(!may_subscribe(&s, bad), "{bad}");
        }
    }

    #[test]
    fn command_topics_match_the_filters_a_device_may_hold() {
        let topic = "tms/RE4A1/cmd/self_test";
        for yes in [
            "tms/RE4A1/cmd/#",
            "tms/RE4A1/cmd/+",
            "tms/RE4A1/cmd/self_test",
            "tms/re4a1/cmd/#",
            "tms/RE4A1/+/self_test",
        ] {
            assert!(filter_matches(yes, topic), "{yes}");
        }
        for no in [
            "tms/RE4A1/cmd",
            "tms/RE4A1/cmd/report_now",
            "tms/RE4A1/cmd/self_test/x",
            "tms/RE4A2/cmd/#",
            "tms/RE4A1/cmd/+/+",
        ] {
            assert!(!filter_matches(no, topic), "{no}");
        }
    }
}
