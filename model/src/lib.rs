//! Domain types shared by every part of the gateway.
//!
//! Strings from the outside world (a certificate CN, an MQTT client id, a form field) become
//! these types once, at the edge; inside, a `DeviceSerial` is proof that the value is safe to
//! use as an MQTT topic level, a file name and a certificate CN. No I/O here.

mod clock;
mod events;
mod presence;

pub use clock::{Clock, ManualClock, SharedClock, SystemClock};
pub use events::{Acks, BrokerEvent, DeviceMessage, DisconnectReason, RefusalReason, TopicKind};
pub use presence::{PRESENCE_BACKLOG, PresenceGate};

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Why a value could not be turned into a domain type; the message says what is allowed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParseError {
    #[error(
        "device serial {value:?} is invalid: use 1 to 64 characters of A-Z, a-z, 0-9, '-', '_' or '.'"
    )]
    Serial { value: String },
    #[error("MAC address {value:?} is invalid: {why}")]
    Mac { value: String, why: &'static str },
    #[error("lat {0} is outside -90..90")]
    Latitude(f64),
    #[error("lon {0} is outside -180..180")]
    Longitude(f64),
}

impl ParseError {
    /// The name of the field that holds the bad value (`serial`, `mac`, `lat`, `lon`).
    pub fn field(&self) -> &'static str {
        match self {
            Self::Serial { .. } => "serial",
            Self::Mac { .. } => "mac",
            Self::Latitude(_) => "lat",
            Self::Longitude(_) => "lon",
        }
    }
}

/// A device serial number (the RemotEye "Device S/N"): the certificate CN, the MQTT client id
/// and the `<serial>` level of every device topic.
///
/// Only characters that are safe in a topic level, a file name and an X.509 CN are allowed, so
/// that `tms/<serial>/…` can never be widened by `+`, `#` or `/` in a serial.
///
/// One spelling per device: letters are upper-cased here, so `re4a000123` typed in a form, a
/// command or a certificate CN is the device `RE4A000123`, never a second one beside it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct DeviceSerial(String);

impl DeviceSerial {
    pub const MAX_LEN: usize = 64;

    pub fn parse(value: &str) -> Result<Self, ParseError> {
        let ok = !value.is_empty()
            && value.len() <= Self::MAX_LEN
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && value != "."
            && value != "..";
        if ok {
            Ok(Self(value.to_ascii_uppercase()))
        } else {
            Err(ParseError::Serial {
                value: value.to_owned(),
            })
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceSerial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for DeviceSerial {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl<'de> Deserialize<'de> for DeviceSerial {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// An EUI-48 MAC address, accepted as `00:1B:2C:3D:4E:5F`, `00-1B-2C-3D-4E-5F` or
/// `001B2C3D4E5F` and always shown in the canonical upper-case, colon-separated form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac([u8; 6]);

impl Mac {
    pub fn parse(value: &str) -> Result<Self, ParseError> {
        let err = |why| ParseError::Mac {
            value: value.to_owned(),
            why,
        };
        // Everything below indexes bytes: a non-ASCII character would put a slice boundary
        // inside it (a panic), so it is refused first.
        if !value.is_ascii() {
            return Err(err("only hex digits 0-9 and A-F are allowed"));
        }
        let hex: String = match value.len() {
            12 => value.to_owned(),
            17 => {
                let sep = value.as_bytes()[2];
                if sep != b':' && sep != b'-' {
                    return Err(err("separate the six octets with ':' or '-'"));
                }
                let parts: Vec<&str> = value.split(sep as char).collect();
                if parts.len() != 6 || parts.iter().any(|p| p.len() != 2) {
                    return Err(err("expected six two-digit octets"));
                }
                parts.concat()
            }
            _ => {
                return Err(err(
                    "expected 12 hex digits, optionally separated by ':' or '-'",
                ));
            }
        };
        // `from_str_radix` alone would take a leading '+' as a sign.
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err("only hex digits 0-9 and A-F are allowed"));
        }
        let mut octets = [0u8; 6];
        for (i, octet) in octets.iter_mut().enumerate() {
            *octet = u8::from_str_radix(&hex[i * 2..i * 2 + 2], 16)
                .map_err(|_| err("only hex digits 0-9 and A-F are allowed"))?;
        }
        if octets == [0; 6] {
            return Err(err("the all-zero address is not a device address"));
        }
        if octets[0] & 1 == 1 {
            return Err(err(
                "a multicast or broadcast address is not a device address",
            ));
        }
        Ok(Self(octets))
    }

    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
}

/// A position in degrees (WGS 84): latitude -90..=90 and longitude -180..=180, both finite.
///
/// The one range check for a location, whoever gives it: a device's `tms/<serial>/location`,
/// the registration form, `PUT …/location`, or `device add`/`device locate` on the command line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatLon {
    lat: f64,
    lon: f64,
}

impl LatLon {
    pub fn new(lat: f64, lon: f64) -> Result<Self, ParseError> {
        // `contains` is false for NaN, so a NaN never passes either check.
        if !(-90.0..=90.0).contains(&lat) {
            return Err(ParseError::Latitude(lat));
        }
        if !(-180.0..=180.0).contains(&lon) {
            return Err(ParseError::Longitude(lon));
        }
        Ok(Self { lat, lon })
    }

    pub fn lat(&self) -> f64 {
        self.lat
    }

    pub fn lon(&self) -> f64 {
        self.lon
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = self.0;
        write!(
            f,
            "{:02X}:{:02X}:{:02X}:{:02X}:{:02X}:{:02X}",
            o[0], o[1], o[2], o[3], o[4], o[5]
        )
    }
}

impl FromStr for Mac {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The session axis of a device's connection status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnState {
    NeverConnected,
    Online,
    Offline,
}

impl ConnState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NeverConnected => "never_connected",
            Self::Online => "online",
            Self::Offline => "offline",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "never_connected" => Some(Self::NeverConnected),
            "online" => Some(Self::Online),
            "offline" => Some(Self::Offline),
            _ => None,
        }
    }
}

impl fmt::Display for ConnState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Milliseconds since the Unix epoch: the one time unit of the store and the event stream.
pub fn unix_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_rejects_topic_metacharacters() {
        for bad in ["", "a/b", "a+b", "a#", "a b", "..", &"x".repeat(65), "é"] {
            assert!(DeviceSerial::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            DeviceSerial::parse("RE4A000123").unwrap().as_str(),
            "RE4A000123"
        );
    }

    #[test]
    fn serial_has_one_spelling() {
        for s in ["re4a000123", "Re4A000123", "RE4A000123"] {
            assert_eq!(DeviceSerial::parse(s).unwrap().as_str(), "RE4A000123");
        }
        assert_eq!(
            DeviceSerial::parse("sim-a.b_c").unwrap().to_string(),
            "SIM-A.B_C"
        );
    }

    #[test]
    fn lat_lon_accepts_the_globe_and_nothing_else() {
        for (lat, lon) in [(0.0, 0.0), (-90.0, -180.0), (90.0, 180.0), (52.52, 13.405)] {
            let p = LatLon::new(lat, lon).unwrap();
            assert_eq!((p.lat(), p.lon()), (lat, lon));
        }
        for (lat, lon, field) in [
            (90.1, 0.0, "lat"),
            (-91.0, 0.0, "lat"),
            (f64::NAN, 0.0, "lat"),
            (0.0, 180.5, "lon"),
            (0.0, f64::NEG_INFINITY, "lon"),
        ] {
            let err = LatLon::new(lat, lon).unwrap_err();
            assert_eq!(err.field(), field, "({lat}, {lon})");
        }
        assert_eq!(
            LatLon::new(0.0, 200.0).unwrap_err().to_string(),
            "lon 200 is outside -180..180"
        );
    }

    #[test]
    fn mac_accepts_three_spellings_into_one_form() {
        let canon = "00:1B:2C:3D:4E:5F";
        for s in ["00:1B:2C:3D:4E:5F", "00-1b-2c-3d-4e-5f", "001B2C3D4E5F"] {
            assert_eq!(Mac::parse(s).unwrap().to_string(), canon);
        }
    }

    #[test]
    fn mac_rejects_non_device_addresses() {
        for bad in [
            "000000000000",
            "01:00:5E:00:00:01",
            "FF-FF-FF-FF-FF-FF",
            "00:1B:2C:3D:4E",
            "00:1B-2C:3D:4E:5F",
            "GG1B2C3D4E5F",
            "0é123456789",
            "0é:1B:2C:3D:4E:5",
            "00:1B:2C:3D:4E:5é",
            "+1B2C3D4E5F0",
        ] {
            assert!(Mac::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
