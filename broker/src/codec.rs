//! MQTT framing helpers around rumqttd's codecs: choose 3.1.1 or 5 from the CONNECT packet,
//! read the QoS and packet id of a PUBLISH that rumqttd keeps private, and write a QoS 1
//! PUBLISH of our own (rumqttd lets only its router set a packet id).

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

    /// Writes a PUBLISH (not retained, not a duplicate) of `qos` 0 or 1; `pkid` is used for
    /// QoS 1 only. MQTT 3.1.1 §3.3 and 5 §3.3 (with an empty property list).
    pub(crate) fn write_publish(
        self,
        topic: &[u8],
        qos: u8,
        pkid: u16,
        payload: &[u8],
        buf: &mut BytesMut,
    ) -> Result<(), Error> {
        let topic_len = u16::try_from(topic.len()).map_err(|_| Error::PayloadTooLong)?;
        let mut len = 2 + topic.len() + payload.len();
        if qos > 0 {
            len += 2;
        }
        if self.is_v5() {
            len += 1;
        }
        if len > 268_435_455 {
            return Err(Error::PayloadTooLong);
        }
        buf.reserve(len + 5);
        buf.extend_from_slice(&[0x30 | ((qos & 1) << 1)]);
        let mut rest = len;
        loop {
            let mut byte = (rest % 128) as u8;
            rest /= 128;
            if rest > 0 {
                byte |= 0x80;
            }
            buf.extend_from_slice(&[byte]);
            if rest == 0 {
                break;
            }
        }
        buf.extend_from_slice(&topic_len.to_be_bytes());
        buf.extend_from_slice(topic);
        if qos > 0 {
            buf.extend_from_slice(&pkid.to_be_bytes());
        }
        if self.is_v5() {
            buf.extend_from_slice(&[0]);
        }
        buf.extend_from_slice(payload);
        Ok(())
    }
}

/// Why a fixed header is refused before anything more of its packet is read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FrameError {
    #[error("malformed remaining length (more than four length bytes)")]
    MalformedLength,
    #[error("packet of {len} bytes exceeds mqtt.max_packet_bytes ({max})")]
    TooLarge { len: usize, max: usize },
    #[error("client sent {0}, a packet only a server may send")]
    ServerOnly(&'static str),
    #[error("packet type {0} is reserved")]
    Reserved(u8),
}

/// The remaining-length varint after the first byte: `Ok(Some((length, bytes used)))`,
/// `Ok(None)` while it is incomplete, an error when it runs past four bytes.
fn remaining_length(buf: &[u8]) -> Result<Option<(usize, usize)>, FrameError> {
    let mut len = 0usize;
    for i in 0..4 {
        let Some(b) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((len, 1 + i)));
        }
    }
    Err(FrameError::MalformedLength)
}

/// Checks the fixed header at the start of `buf` before the packet is buffered: a packet
/// type a client may send, a well-formed remaining length within `max`. `Ok(Some(type))`
/// when the whole packet is in `buf`, `Ok(None)` while more bytes are needed (never more
/// than `max` plus the header). rumqttd's v5 parser panics on packet types it does not
/// expect from a client, so nothing else may reach it.
pub(crate) fn frame(buf: &[u8], max: usize) -> Result<Option<u8>, FrameError> {
    let Some(first) = buf.first() else {
        return Ok(None);
    };
    let packet_type = first >> 4;
    match packet_type {
        0 | 15 => return Err(FrameError::Reserved(packet_type)),
        2 => return Err(FrameError::ServerOnly("CONNACK")),
        9 => return Err(FrameError::ServerOnly("SUBACK")),
        11 => return Err(FrameError::ServerOnly("UNSUBACK")),
        13 => return Err(FrameError::ServerOnly("PINGRESP")),
        _ => {}
    }
    let Some((len, used)) = remaining_length(buf)? else {
        return Ok(None);
    };
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok((buf.len() >= 1 + used + len).then_some(packet_type))
}

/// The protocol level of the complete CONNECT at the start of `buf` (4 = 3.1.1, 5 = 5).
pub(crate) fn connect_protocol_level(buf: &[u8]) -> Option<u8> {
    if buf.first()? >> 4 != 1 {
        return None;
    }
    let (_, used) = remaining_length(buf).ok()??;
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
    let (_, used) = remaining_length(buf).ok()??;
    let at = 1 + used;
    let topic_len = usize::from(u16::from_be_bytes([*buf.get(at)?, *buf.get(at + 1)?]));
    let p = at + 2 + topic_len;
    Some((qos, u16::from_be_bytes([*buf.get(p)?, *buf.get(p + 1)?])))
}

/// The CONNECT at the start of `buf` once it is whole (removed from `buf`), `None` while more
/// bytes are needed; an error naming what is wrong as soon as the bytes show it.
pub(crate) fn next_connect(
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<(Codec, Packet)>, String> {
    match frame(buf, max) {
        Err(e) => Err(e.to_string()),
        Ok(Some(1)) => {
            let codec = match connect_protocol_level(buf) {
                Some(5) => Codec::V5,
                _ => Codec::V4,
            };
            codec
                .read(buf, max)
                .map(|p| Some((codec, p)))
                .map_err(|e| format!("malformed CONNECT: {e}"))
        }
        Ok(Some(other)) => Err(format!("expected CONNECT, got packet type {other}")),
        Ok(None) => match buf.first() {
            Some(first) if first >> 4 != 1 => {
                Err(format!("expected CONNECT, got packet type {}", first >> 4))
            }
            _ => Ok(None),
        },
    }
}

/// QoS and packet id of a PUBLISH, read from its bytes (rumqttd keeps them private).
pub(crate) type QosPkid = (u8, u16);

/// The next whole packet after CONNECT at the start of `buf` (removed from `buf`) with the
/// QoS and packet id of a PUBLISH; `None` while more bytes are needed.
pub(crate) fn next_packet(
    codec: Codec,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<(Packet, Option<QosPkid>)>, String> {
    if frame(buf, max).map_err(|e| e.to_string())?.is_none() {
        return Ok(None);
    }
    let header = publish_qos_pkid(buf);
    match codec.read(buf, max) {
        Ok(p) => Ok(Some((p, header))),
        Err(Error::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(format!("malformed packet: {e}")),
    }
}

/// Decodes `bytes` as a client's stream would be: a CONNECT, then packets until the bytes end
/// or one is refused. Returns how many packets were decoded and the refusal, if any. The
/// decoding the sessions use, for fuzzing and property tests: it must never panic, and never
/// hold more than `max` plus a header of an unfinished packet.
pub fn decode_client_stream(bytes: &[u8], max: usize) -> (usize, Option<String>) {
    let mut buf = BytesMut::from(bytes);
    let codec = match next_connect(&mut buf, max) {
        Ok(Some((codec, _))) => codec,
        Ok(None) => return (0, None),
        Err(e) => return (0, Some(e)),
    };
    let mut decoded = 1;
    loop {
        match next_packet(codec, &mut buf, max) {
            Ok(Some(_)) => decoded += 1,
            Ok(None) => return (decoded, None),
            Err(e) => return (decoded, Some(e)),
        }
    }
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

    #[test]
    fn frames_are_checked_before_they_are_buffered() {
        let connect = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 0];
        assert_eq!(frame(&connect, 64), Ok(Some(1)));
        assert_eq!(frame(&connect[..6], 64), Ok(None), "incomplete");
        assert_eq!(frame(&[0x10], 64), Ok(None));
        assert_eq!(
            frame(&[0x10, 0xff, 0xff, 0xff, 0xff], 64),
            Err(FrameError::MalformedLength)
        );
        assert_eq!(
            frame(&[0x10, 0xff, 0xff, 0xff], 1 << 20),
            Ok(None),
            "a long length still incomplete"
        );
        assert_eq!(
            frame(&[0x30, 0x81, 0x01], 64),
            Err(FrameError::TooLarge { len: 129, max: 64 }),
            "refused from its header alone"
        );
        assert_eq!(
            frame(&[0x20, 2, 0, 0], 64),
            Err(FrameError::ServerOnly("CONNACK"))
        );
        assert_eq!(
            frame(&[0xb0, 2, 0, 1], 64),
            Err(FrameError::ServerOnly("UNSUBACK"))
        );
        assert_eq!(frame(&[0xf0, 0], 64), Err(FrameError::Reserved(15)));
        assert_eq!(frame(&[0xc0, 0], 64), Ok(Some(12)), "PINGREQ");
    }

    /// A small seeded generator: the same cases on every run.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// What real clients send: CONNECT (3.1.1 and 5), PUBLISH at each QoS, SUBSCRIBE,
    /// UNSUBSCRIBE, acks, PINGREQ, DISCONNECT.
    fn valid_stream(v5: bool) -> Vec<u8> {
        let mut s = if v5 {
            vec![
                0x10, 18, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60, 3, 0x21, 0, 10, 0, 2, b'R',
                b'E',
            ]
        } else {
            vec![
                0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 2, b'R', b'E',
            ]
        };
        let props: &[u8] = if v5 { &[0] } else { &[] };
        let mut publish = vec![0, 3, b'a', b'/', b'b', 0, 7];
        publish.extend(props);
        publish.extend(b"{\"x\":1}");
        s.push(0x32);
        s.push(publish.len() as u8);
        s.extend(&publish);
        let mut sub = vec![0, 9];
        sub.extend(props);
        sub.extend([0, 3, b'c', b'/', b'#', 1]);
        s.push(0x82);
        s.push(sub.len() as u8);
        s.extend(sub);
        s.extend([0x40, 2, 0, 5, 0xc0, 0, 0xe0, 0]);
        s
    }

    #[test]
    fn no_byte_stream_panics_or_is_buffered_past_the_limit() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for v5 in [false, true] {
            assert_eq!(
                decode_client_stream(&valid_stream(v5), 1024).1,
                None,
                "v5={v5}"
            );
        }
        for case in 0..30_000 {
            let mut bytes = valid_stream(case % 2 == 0);
            match case % 3 {
                // Flip, insert and delete bytes of a valid stream.
                0 | 1 => {
                    for _ in 0..1 + rng.below(6) {
                        let at = rng.below(bytes.len());
                        match rng.below(3) {
                            0 => bytes[at] = rng.next() as u8,
                            1 => bytes.insert(at, rng.next() as u8),
                            _ => {
                                bytes.remove(at);
                            }
                        }
                    }
                }
                // A valid CONNECT followed by noise.
                _ => {
                    bytes.truncate(16);
                    bytes.extend((0..rng.below(200)).map(|_| rng.next() as u8));
                }
            }
            let max = [16, 64, 1024][case % 3];
            let (_, _) = decode_client_stream(&bytes, max);
            // Whatever is left undecoded is at most one packet within the limit.
            let mut buf = BytesMut::from(&bytes[..]);
            if let Ok(Some((codec, _))) = next_connect(&mut buf, max) {
                while let Ok(Some(_)) = next_packet(codec, &mut buf, max) {}
                if let Ok(None) = frame(&buf, max) {
                    assert!(
                        buf.len() <= max + 5,
                        "case {case}: {} bytes held",
                        buf.len()
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod publish_tests {
    use super::*;

    #[test]
    fn our_publish_reads_back_with_its_qos_and_packet_id() {
        for codec in [Codec::V4, Codec::V5] {
            for (qos, payload) in [(1u8, vec![b'x'; 300]), (0, b"{}".to_vec())] {
                let mut buf = BytesMut::new();
                codec
                    .write_publish(b"tms/RE4A1/cmd/self_test", qos, 4242, &payload, &mut buf)
                    .unwrap();
                if qos > 0 {
                    assert_eq!(publish_qos_pkid(&buf), Some((1, 4242)));
                }
                let Packet::Publish(p, _) = codec.read(&mut buf, 1 << 20).unwrap() else {
                    panic!("not a publish");
                };
                assert_eq!(&p.topic[..], b"tms/RE4A1/cmd/self_test");
                assert_eq!(&p.payload[..], &payload[..]);
                assert!(buf.is_empty(), "the whole packet was read");
            }
        }
    }
}
