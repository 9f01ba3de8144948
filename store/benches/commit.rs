//! One ingest batch committed to SQLite: 500 telemetry rows from 50 devices plus their
//! last-seen and telemetry-freshness updates, in one transaction — what the ingest service
//! writes per flush at full load. Per-row cost = time / 500.
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
const PAYLOAD: &str = r#"{"mode":"online","load_pct":42.5,"battery":{"charge_pct":99,"runtime_min":31,"voltage":54.2},"input":{"voltage":229.8,"frequency_hz":50.0},"output":{"voltage":230.1,"frequency_hz":50.0,"current_a":6.1},"alarms":[]}"#;

fn batch(round: i64) -> WriteBatch {
    let at = 1_800_000_000_000 + round * 1_000;
    let mut b = WriteBatch::default();
    for i in 0..ROWS {
        b.telemetry.push(TelemetryRow {
            serial: format!("BENCH{:04}", i % DEVICES),
            ts: at + i as i64,
            received_at: at + i as i64,
            mode: Some("online".into()),
            load_pct: Some(42.5),
            battery_charge_pct: Some(99.0),
            payload: PAYLOAD.into(),
        });
    }
    for d in 0..DEVICES {
        let serial = format!("BENCH{d:04}");
        b.status.push(StatusEvent::Seen {
            serial: serial.clone(),
            session_id: format!("s-{d}"),
            at,
        });
        b.status.push(StatusEvent::Telemetry {
            serial,
            first_at: at,
            last_at: at + ROWS as i64,
            count: (ROWS / DEVICES) as i64,
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
            let device = NewDevice {
                serial: DeviceSerial::parse(&format!("BENCH{d:04}")).unwrap(),
                mac: Mac::parse(&format!("02:42:00:00:{:02X}:{:02X}", d / 256, d % 256)).unwrap(),
                company: "Bench".into(),
                device_type: "RemotEye 4".into(),
                lease_months: 12,
                start_date: "2026-12-01".into(),
                lease_ends_at: 1_900_000_000_000,
                ups_model: Some("1600XP".into()),
                ups_model_number: None,
                ups_serial: None,
                ups_ship_date: None,
                sales_order: None,
                service_contract_sales_order: None,
                registered_by: None,
            };
            store.add_device(&device, 1).await.unwrap();
        }
        store
    });
    let mut g = c.benchmark_group("ingest_commit");
    g.throughput(Throughput::Elements(ROWS as u64));
    let mut round = 0;
    g.bench_function("sqlite_500_telemetry_rows", |b| {
        b.iter_batched(
            || {
                round += 1;
                batch(round)
            },
            |batch| rt.block_on(store.write_batch(&batch)).unwrap(),
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, commit);
criterion_main!(benches);
