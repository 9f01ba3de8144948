//! The broker's per-connection work after the TLS handshake, without the network: decode an
//! MQTT 3.1.1 CONNECT (rumqttd's codec, as the session does), check the client id against
//! the certificate CN, the ACL decisions for a device's publish and subscribe topics, and the
//! presence gate's share of a connect (room check at admission, hand-over with the connect
//! event, ingest's commit).
//!
//! `cargo bench -p tms-broker --bench connect`

#![expect(
    clippy::unwrap_used,
    reason = "a benchmark stops loudly on an unexpected failure"
)]

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rumqttd::protocol::{Packet, Protocol, v4::V4};
use tms_broker::{may_subscribe, publish_kind};
use tms_model::{DeviceSerial, PresenceGate};

/// CONNECT, MQTT 3.1.1, clean session, keep-alive 60 s, client id "RE4A000123".
const CONNECT: &[u8] = b"\x10\x16\x00\x04MQTT\x04\x02\x00\x3c\x00\x0aRE4A000123";

fn connect_and_acl(c: &mut Criterion) {
    let mut g = c.benchmark_group("broker");
    g.throughput(Throughput::Elements(1));
    g.bench_function("connect_decode_and_identity_check", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(black_box(CONNECT));
            let Ok(Packet::Connect(connect, ..)) = V4.read_mut(&mut buf, 65_536) else {
                panic!("not a CONNECT")
            };
            let serial = DeviceSerial::parse(black_box("RE4A000123")).unwrap();
            assert_eq!(connect.client_id, serial.as_str());
            serial
        })
    });
    let gate = PresenceGate::default();
    g.bench_function("presence_gate_per_connect", |b| {
        b.iter(|| {
            assert!(gate.has_room(black_box(4)));
            gate.handed_over();
            gate.committed(black_box(1));
        })
    });
    let serial = DeviceSerial::parse("RE4A000123").unwrap();
    g.bench_function("acl_publish_allowed", |b| {
        b.iter(|| publish_kind(&serial, black_box(b"tms/RE4A000123/telemetry")).unwrap())
    });
    g.bench_function("acl_publish_denied", |b| {
        b.iter(|| assert!(publish_kind(&serial, black_box(b"tms/RE4A000999/telemetry")).is_none()))
    });
    g.bench_function("acl_subscribe", |b| {
        b.iter(|| may_subscribe(&serial, black_box("tms/RE4A000123/cmd/#")))
    });
    g.finish();
}

criterion_group!(benches, connect_and_acl);
criterion_main!(benches);
