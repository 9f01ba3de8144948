//! Telemetry and location payload validation: what ingest does for every device message
//! before it is queued for the store.
//!
//! `cargo bench -p tms-ingest --bench parse`

#![expect(
    clippy::unwrap_used,
    reason = "a benchmark stops loudly on an unexpected failure"
)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tms_ingest::{parse_location, parse_telemetry};

/// A RemotEye 4 telemetry message as CONTRACT §4 describes it (~330 bytes).
const TELEMETRY: &[u8] = br#"{"ts":"2026-11-28T10:15:00Z","mode":"online","load_pct":42.5,"battery":{"charge_pct":99,"runtime_min":31,"voltage":54.2,"temperature_c":24.5},"input":{"voltage":229.8,"frequency_hz":50.0},"output":{"voltage":230.1,"frequency_hz":50.0,"current_a":6.1},"alarms":[],"firmware":"RE4 2.1.0"}"#;
const LOCATION: &[u8] = br#"{"lat":29.7604,"lon":-95.3698,"accuracy_m":15}"#;

fn payloads(c: &mut Criterion) {
    let mut g = c.benchmark_group("payload");
    g.throughput(Throughput::Bytes(TELEMETRY.len() as u64));
    g.bench_function("parse_telemetry", |b| {
        // Received a minute after the payload's ts.
        b.iter(|| parse_telemetry(black_box(TELEMETRY), 1_795_860_960_000).unwrap())
    });
    g.throughput(Throughput::Bytes(LOCATION.len() as u64));
    g.bench_function("parse_location", |b| {
        b.iter(|| parse_location(black_box(LOCATION)).unwrap())
    });
    g.finish();
}

criterion_group!(benches, payloads);
criterion_main!(benches);
