//! What the unit tests of this crate share.

use time::{Duration, OffsetDateTime};
use tms_model::DeviceSerial;

use crate::{Ca, DeviceKey, IssuedCert};

/// `s` as a device serial; the tests name only valid ones.
pub(crate) fn serial(s: &str) -> DeviceSerial {
    DeviceSerial::parse(s).unwrap()
}

/// A certificate from `ca` for `serial`, with a generated key, valid for 30 days from `now`.
pub(crate) fn issue_30_days(ca: &Ca, serial: &str, now: OffsetDateTime) -> IssuedCert {
    ca.issue_device(
        &self::serial(serial),
        DeviceKey::Generate,
        now,
        now + Duration::days(30),
    )
    .unwrap()
}
