//! What ingest does per telemetry message before the commit — parse, validate, alarm engine,
//! row — with the alarm engine and without it (the cost the engine adds, CONTRACT §7).
//! 20 devices, 100 messages per batch; "steady" is every device reporting what it reported
//! before (the usual case: no SQL), "on battery" is every device on battery with the alarm
//! already open (still no SQL).
//!
//! `cargo bench -p tms-ingest --bench batch`

#![expect(
    clippy::unwrap_used,
    reason = "a benchmark stops loudly on an unexpected failure"
)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tms_ingest::Batcher;
use tms_model::{BrokerEvent, DeviceMessage, DeviceSerial, TopicKind};

const ONLINE: &[u8] = br#"{"ts":"2026-11-28T10:15:00Z","mode":"online","load_pct":42.5,"battery":{"charge_pct":99,"runtime_min":31,"voltage":54.2,"temperature_c":24.5},"input":{"voltage":229.8,"frequency_hz":50.0},"output":{"voltage":230.1,"frequency_hz":50.0,"current_a":6.1},"alarms":[],"firmware":"RE4 2.1.0"}"#;
const ON_BATTERY: &[u8] = br#"{"ts":"2026-11-28T10:15:00Z","mode":"on_battery","load_pct":42.5,"battery":{"charge_pct":80,"runtime_min":25,"voltage":51.0,"temperature_c":24.5},"input":{"voltage":0,"frequency_hz":0},"output":{"voltage":230.1,"frequency_hz":50.0,"current_a":6.1},"alarms":[],"firmware":"RE4 2.1.0"}"#;
const DEVICES: usize = 20;
const PER_BATCH: usize = 100;

fn events(payload: &'static [u8]) -> Vec<BrokerEvent> {
    (0..PER_BATCH)
        .map(|i| {
            let serial = format!("RE4A{:06}", i % DEVICES);
            BrokerEvent::Message(DeviceMessage {
                serial: DeviceSerial::parse(&serial).unwrap(),
                session_id: Arc::from(format!("s-{}", i % DEVICES)),
                kind: TopicKind::Telemetry,
                topic: Bytes::from(format!("tms/{serial}/telemetry")),
                payload: Bytes::from_static(payload),
                received_at_ms: 1_795_860_960_000,
                ack: None,
            })
        })
        .collect()
}

fn run(b: &mut Batcher, events: &[BrokerEvent]) -> usize {
    for e in events {
        b.add(e.clone());
    }
    let batch = b.take(Instant::now(), false);
    assert!(batch.alarms.is_empty(), "nothing changes: no alarm rows");
    batch.len()
}

fn batches(c: &mut Criterion) {
    let mut g = c.benchmark_group("batch");
    g.throughput(Throughput::Elements(PER_BATCH as u64));
    let open: Vec<(String, String)> = (0..DEVICES)
        .map(|i| (format!("RE4A{i:06}"), "on_battery".to_owned()))
        .collect();
    for (name, payload, preload) in [("steady", ONLINE, false), ("on_battery", ON_BATTERY, true)] {
        let evs = events(payload);
        g.bench_function(format!("{name}/without_alarms"), |bench| {
            let mut b = Batcher::without_alarms("n1".into());
            bench.iter(|| black_box(run(&mut b, &evs)))
        });
        g.bench_function(format!("{name}/with_alarms"), |bench| {
            let mut b = Batcher::new("n1".into());
            if preload {
                b.alarm_engine().load(None, open.clone());
            }
            bench.iter(|| black_box(run(&mut b, &evs)))
        });
    }
    g.finish();
}

criterion_group!(benches, batches);
criterion_main!(benches);
