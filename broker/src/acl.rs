//! Which topics a device may use: publish to `tms/<serial>/{telemetry,location,info,status}`,
//! subscribe below `tms/<serial>/cmd/`. Everything else is denied.

use tms_model::{DeviceSerial, TopicKind};

/// The kind of `topic` if `serial` may publish to it.
pub fn publish_kind(serial: &DeviceSerial, topic: &[u8]) -> Option<TopicKind> {
    let rest = topic.strip_prefix(b"tms/")?;
    let rest = rest.strip_prefix(serial.as_str().as_bytes())?;
    match rest {
        b"/telemetry" => Some(TopicKind::Telemetry),
        b"/location" => Some(TopicKind::Location),
        b"/info" => Some(TopicKind::Info),
        b"/status" => Some(TopicKind::Status),
        _ => None,
    }
}

/// Whether `serial` may subscribe to `filter`: only `tms/<serial>/cmd/#`, `tms/<serial>/cmd`
/// or filters below it, with wildcards only inside that subtree.
pub fn may_subscribe(serial: &DeviceSerial, filter: &str) -> bool {
    let prefix = format!("tms/{}/cmd", serial.as_str());
    let Some(rest) = filter.strip_prefix(&prefix) else {
        return false;
    };
    rest.is_empty() || rest.starts_with('/')
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
        assert!(may_subscribe(&s, "tms/RE4A1/cmd/#"));
        assert!(may_subscribe(&s, "tms/RE4A1/cmd/reboot"));
        assert!(may_subscribe(&s, "tms/RE4A1/cmd"));
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
}
