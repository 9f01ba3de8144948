//! MQTT framing helpers around rumqttd's codecs: choose 3.1.1 or 5 from the CONNECT packet,
//! and read the QoS and packet id of a PUBLISH that rumqttd keeps private.

use bytes::BytesMut;
use rumqttd::protocol::{Error, Packet, Protocol, v4::V4, v5::V5};

/// The codec of one connection, chosen by the protocol level of its CONNECT.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Codec {
    V4,
    V5,
}

impl Codec {
    pub(crate) fn read(self, buf: &mut BytesMut, max: usize) -> Result<Packet, Error> {
        match self {
            Codec::V4 => V4.read_mut(buf, max),
            Codec::V5 => V5.read_mut(buf, max),
        }
    }

    pub(crate) fn write(self, packet: Packet, buf: &mut BytesMut) -> Result<usize, Error> {
        match self {
            Codec::V4 => V4.write(packet, buf),
            Codec::V5 => V5.write(packet, buf),
        }
    }

    pub(crate) fn is_v5(self) -> bool {
        matches!(self, Codec::V5)
    }
}

/// Decodes the remaining-length varint after the first byte: `(length, bytes used)`.
fn remaining_length(buf: &[u8]) -> Option<(usize, usize)> {
    let mut len = 0usize;
    for i in 0..4 {
        let b = *buf.get(1 + i)?;
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((len, 1 + i));
        }
    }
    None
}

/// The protocol level of a CONNECT at the start of `buf` (4 = 3.1.1, 5 = 5), or `None` when
/// not enough bytes have arrived yet or the packet is not a CONNECT.
pub(crate) fn connect_protocol_level(buf: &[u8]) -> Option<u8> {
    if buf.first()? >> 4 != 1 {
        return None;
    }
    let (_, used) = remaining_length(buf)?;
    let at = 1 + used;
    let name_len = usize::from(u16::from_be_bytes([*buf.get(at)?, *buf.get(at + 1)?]));
    buf.get(at + 2 + name_len).copied()
}

/// QoS and packet id of a PUBLISH at the start of `buf`; `None` if it is not a PUBLISH or is
/// incomplete. Packet id is 0 for QoS 0.
pub(crate) fn publish_qos_pkid(buf: &[u8]) -> Option<(u8, u16)> {
    let first = *buf.first()?;
    if first >> 4 != 3 {
        return None;
    }
    let qos = (first >> 1) & 0b11;
    if qos == 0 {
        return Some((0, 0));
    }
    let (_, used) = remaining_length(buf)?;
    let at = 1 + used;
    let topic_len = usize::from(u16::from_be_bytes([*buf.get(at)?, *buf.get(at + 1)?]));
    let p = at + 2 + topic_len;
    Some((qos, u16::from_be_bytes([*buf.get(p)?, *buf.get(p + 1)?])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_protocol_level_and_publish_header() {
        // CONNECT, remaining length 12, "MQTT", level 4
        let connect = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 0];
        assert_eq!(connect_protocol_level(&connect), Some(4));
        assert_eq!(connect_protocol_level(&connect[..5]), None);
        // PUBLISH QoS 1, topic "a/b", pkid 0x0102
        let publish = [0x32, 9, 0, 3, b'a', b'/', b'b', 1, 2, b'h', b'i'];
        assert_eq!(publish_qos_pkid(&publish), Some((1, 0x0102)));
        assert_eq!(publish_qos_pkid(&[0x30, 5]), Some((0, 0)));
        assert_eq!(publish_qos_pkid(&connect), None);
    }
}
