//! Ingest batches committed to SQLite: telemetry rows plus each device's last-seen and
//! telemetry-freshness updates, in one transaction.
//! - `sqlite_500_telemetry_rows`: 500 rows from 50 devices, a flush at full load (per-row
//!   cost = time / 500).
//! - `sqlite_small_batch/*`: what a durable PUBACK commits under ordinary load — a few
//!   messages from one or a few devices — where the cost per transaction (not per row)
//!   decides the CPU per QoS 1 message and the PUBACK latency.
//!
//! `cargo bench -p tms-store --bench commit`

#![expect(
    clippy::unwrap_used,
    reason = "a benchmark stops loudly on an unexpected failure"
)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tms_model::{DeviceSerial, Mac};
use tms_store::{NewDevice, StatusEvent, Store, TelemetryRow, WriteBatch};

const DEVICES: usize = 50;
const ROWS: usize = 500;
/// (devices, rows) of the small batches.
const SMALL: [(usize, usize); 3] = [(1, 1), (1, 10), (5, 20)];
const PAYLOAD: &str = r#"{"mode":"online","load_pct":42.5,"battery":{"charge_pct":99,"runtime_min":31,"voltage":54.2},"input":{"voltage":229.8,"frequency_hz":50.0},"output":{"voltage":230.1,"frequency_hz":50.0,"current_a":6.1},"alarms":[]}"#;

fn batch(round: i64, devices: usize, rows: usize) -> WriteBatch {
    let at = 1_800_000_000_000 + round * 1_000;
    let mut b = WriteBatch::default();
    for i in 0..rows {
        b.telemetry.push(TelemetryRow {
            serial: format!("BENCH{:04}", i % devices),
            ts: at + i as i64,
            received_at: at + i as i64,
            mode: Some("online".into()),
            load_pct: Some(42.5),
            battery_charge_pct: Some(99.0),
            payload: PAYLOAD.into(),
        });
    }
    for d in 0..devices {
        let serial = format!("BENCH{d:04}");
        b.status.push(StatusEvent::Seen {
            serial: serial.clone(),
            session_id: format!("s-{d}"),
            at,
        });
        b.status.push(StatusEvent::Telemetry {
            serial,
            first_at: at,
            last_at: at + rows as i64,
            count: (rows / devices).max(1) as i64,
        });
    }
    b
}

fn commit(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let store = rt.block_on(async {
        let store = Store::open(&url).await.unwrap();
        for d in 0..DEVICES {
            let serial = DeviceSerial::parse(&format!("BENCH{d:04}")).unwrap();
            let mac = Mac::parse(&format!("02:42:00:00:{:02X}:{:02X}", d / 256, d % 256)).unwrap();
            let mut device =
                NewDevice::new(serial, mac, "Bench", "2026-12-01", 12, 1_900_000_000_000);
            device.details.ups_model = Some("1600XP".into());
            store.add_device(&device, 1).await.unwrap();
        }
        // Online, so the last-seen and freshness updates change a row as they do in service.
        let mut online = WriteBatch::default();
        for d in 0..DEVICES {
            online.status.push(StatusEvent::Connected {
                serial: format!("BENCH{d:04}"),
                session_id: format!("s-{d}"),
                at: 1_800_000_000_000,
                peer_addr: "127.0.0.1:40000".into(),
                keep_alive_secs: 60,
                cert_serial: format!("{d:02x}"),
                node_id: "bench".into(),
            });
        }
        store.write_batch(&online).await.unwrap();
        store
    });
    let mut g = c.benchmark_group("ingest_commit");
    g.throughput(Throughput::Elements(ROWS as u64));
    let mut round = 0;
    g.bench_function("sqlite_500_telemetry_rows", |b| {
        b.iter_batched(
            || {
                round += 1;
                batch(round, DEVICES, ROWS)
            },
            |batch| rt.block_on(store.write_batch(&batch)).unwrap(),
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
    let mut g = c.benchmark_group("sqlite_small_batch");
    g.throughput(Throughput::Elements(1));
    for (devices, rows) in SMALL {
        g.bench_function(format!("{devices}_devices_{rows}_rows"), |b| {
            b.iter_batched(
                || {
                    round += 1;
                    batch(round, devices, rows)
                },
                |batch| rt.block_on(store.write_batch(&batch)).unwrap(),
                criterion::BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, commit);
criterion_main!(benches);
