//! The CSR fuzz target's checks (`fuzz/src/csr_check.rs`) over seeded mutations of the real
//! CSRs in `fuzz/seeds/csr/`, in every `cargo test`: a short, repeatable stand-in for the AFL
//! runs (`scripts/fuzz`), whose instrumented build is too slow for each CI run. Whatever the
//! bytes, Generate Certificate refuses them or issues a certificate that is the CA's own, for
//! the requested serial, with the request's key.

#![expect(clippy::expect_used, reason = "the shared checks fail loudly")]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use time::{Duration, OffsetDateTime};
use tms_certs::Ca;
use tms_model::DeviceSerial;

#[path = "../../fuzz/src/csr_check.rs"]
mod csr_check;

#[test]
fn no_mutation_of_a_real_csr_panics_or_gets_a_wrong_certificate() {
    let now = OffsetDateTime::from_unix_timestamp(1_796_083_200).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = Ca::load_or_create(dir.path(), now).unwrap();
    let serial = DeviceSerial::parse("RE4A000123").unwrap();
    let not_after = now + Duration::days(365);
    let seeds_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/seeds/csr");
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(seeds_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 10, "{} seeds in {seeds_dir}", seeds.len());

    // Unmutated, the good seeds are issued (P-256, P-384 signed with SHA-256, Ed25519,
    // RSA 2048, each as PEM and DER) and the refused ones are not.
    let issued: Vec<&str> = seeds
        .iter()
        .filter(|(_, bytes)| csr_check::submit_both_ways(&ca, &serial, bytes, now, not_after) > 0)
        .map(|(name, _)| name.as_str())
        .collect();
    for good in ["p256", "p384-sha256", "ed25519", "rsa2048"] {
        for ext in ["pem", "der"] {
            let name = format!("{good}.{ext}");
            assert!(
                issued.contains(&name.as_str()),
                "{name} not issued: {issued:?}"
            );
        }
    }
    for refused in ["rsa1024-refused", "two-cns", "bad-signature"] {
        assert!(
            !issued.iter().any(|n| n.starts_with(refused)),
            "{refused} issued: {issued:?}"
        );
    }

    // Flip, insert, delete and truncate bytes of the DER seeds.
    let ders: Vec<&Vec<u8>> = seeds
        .iter()
        .filter(|(name, _)| name.ends_with(".der"))
        .map(|(_, bytes)| bytes)
        .collect();
    // Seeded: the same mutations on every run.
    let mut rng = StdRng::seed_from_u64(0x2545_f491_4f6c_dd1d);
    let mut still_issued = 0;
    for case in 0..1_500 {
        let mut bytes = ders[case % ders.len()].clone();
        match case % 4 {
            3 => bytes.truncate(rng.random_range(0..bytes.len())),
            _ => {
                for _ in 0..rng.random_range(1..=4) {
                    let at = rng.random_range(0..bytes.len());
                    match rng.random_range(0..3) {
                        0 => bytes[at] = rng.random(),
                        1 => bytes.insert(at, rng.random()),
                        _ => {
                            bytes.remove(at);
                        }
                    }
                }
            }
        }
        still_issued += csr_check::submit_both_ways(&ca, &serial, &bytes, now, not_after);
    }
    // A mutation that changes the signed bytes breaks the self-signature: few survive, and
    // those that do passed every check of csr_check.
    assert!(
        still_issued < 150,
        "{still_issued} of 1,500 mutated CSRs issued"
    );
}
