//! A device's certificate signing request through what Generate Certificate calls,
//! `Ca::issue_device` with `DeviceKey::Csr`: the PEM armor, the PKCS#10 DER parser, the key
//! and signature-algorithm rules, the self-signature and the one-CN rule. Each input goes in
//! twice: as PEM text (what `csr_pem` carries), and base64-encoded inside a
//! `CERTIFICATE REQUEST` armor so that the fuzzer's bytes reach the DER parser directly.
//!
//! Refusals are expected. A certificate that does come out must read back as the CA's own,
//! name exactly the requested serial, and carry the CSR's public key byte for byte
//! (`fuzz/src/csr_check.rs`, shared with the mutation test in `certs/tests/`).
use ::time::{Duration, OffsetDateTime};
use tms_certs::Ca;
use tms_model::DeviceSerial;

#[path = "../csr_check.rs"]
mod csr_check;

/// The serial every seed CSR names as its CN.
const SERIAL: &str = "RE4A000123";
/// A fixed clock (2026-12-01 UTC), so a run does not depend on the day it is made.
const NOW: i64 = 1_796_083_200;

fn main() {
    // Start-up invariants: the timestamp and the serial are constants that are valid, and a
    // CA that cannot be created in the temp directory leaves nothing to fuzz.
    let now = OffsetDateTime::from_unix_timestamp(NOW).expect("NOW is a valid timestamp");
    let serial = DeviceSerial::parse(SERIAL).expect("SERIAL is a valid device serial");
    // Made once, before afl's fork server starts, so every child shares it; the files are
    // removed at once, the CA lives on in memory.
    let dir = std::env::temp_dir().join(format!("tms-fuzz-csr-{}", std::process::id()));
    let created = Ca::load_or_create(&dir, now);
    let _ = std::fs::remove_dir_all(&dir);
    let (ca, _) = created.expect("creating the fuzzing CA");
    // A panic aborts the process (that is the crash AFL records), so no input ever sees a CA
    // left half-way by an earlier one.
    let ca = std::panic::AssertUnwindSafe(ca);
    let not_after = now + Duration::days(365);

    afl::fuzz!(|data: &[u8]| {
        csr_check::submit_both_ways(&ca, &serial, data, now, not_after);
    });
}
