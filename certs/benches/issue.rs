//! Device certificate issuance in-process — Generate Certificate (a new P-256 key pair and a
//! CA signature) and from a CSR (signature only) — and reading a certificate's identity,
//! which the broker does once per TLS handshake. Target: ≥ 2,000 certificates per second.
//!
//! `cargo bench -p tms-certs --bench issue`

#![expect(
    clippy::unwrap_used,
    reason = "a benchmark stops loudly on an unexpected failure"
)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rcgen::{CertificateParams, DnType, KeyPair};
use time::{Duration, OffsetDateTime};
use tms_certs::{Ca, DeviceKey, identity};
use tms_model::DeviceSerial;

fn certificates(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let now = OffsetDateTime::now_utc();
    let (ca, _) = Ca::load_or_create(&dir.path().join("ca"), now).unwrap();
    let serial = DeviceSerial::parse("RE4A000123").unwrap();
    let not_after = now + Duration::days(365);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "RE4A000123");
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let der = ca
        .issue_device(&serial, DeviceKey::Generate, now, not_after)
        .unwrap()
        .certificate_der;

    let mut g = c.benchmark_group("certificate");
    g.throughput(Throughput::Elements(1));
    g.bench_function("issue_generated_key", |b| {
        b.iter(|| {
            ca.issue_device(black_box(&serial), DeviceKey::Generate, now, not_after)
                .unwrap()
        })
    });
    g.bench_function("issue_from_csr", |b| {
        b.iter(|| {
            ca.issue_device(
                black_box(&serial),
                DeviceKey::Csr(csr.clone()),
                now,
                not_after,
            )
            .unwrap()
        })
    });
    g.bench_function("identity_of_client_certificate", |b| {
        b.iter(|| identity(black_box(&der)).unwrap())
    });
    g.finish();
}

criterion_group!(benches, certificates);
criterion_main!(benches);
