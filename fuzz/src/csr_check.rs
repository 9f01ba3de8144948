//! What must hold of a device CSR submitted to `Ca::issue_device`, whatever its bytes:
//! shared by the AFL target `fuzz/src/bin/csr.rs` and the seeded mutation test
//! `certs/tests/csr_mutations.rs` (both include this file with `#[path]`).

use ::time::OffsetDateTime;
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use tms_certs::{Ca, DeviceKey};
use tms_model::DeviceSerial;
use x509_parser::prelude::*;

/// Submits `der` both ways Generate Certificate can meet it: as PEM text when it is UTF-8
/// (what `csr_pem` carries), and base64-encoded in a `CERTIFICATE REQUEST` armor, so that
/// the bytes reach the DER parser directly. Returns how many certificates were issued.
pub fn submit_both_ways(
    ca: &Ca,
    serial: &DeviceSerial,
    data: &[u8],
    now: OffsetDateTime,
    not_after: OffsetDateTime,
) -> usize {
    let mut issued = 0;
    if let Ok(text) = std::str::from_utf8(data) {
        issued += usize::from(issue_and_check(ca, serial, text.to_owned(), now, not_after));
    }
    let armored = armor(data);
    // The armor must give back exactly the bytes it wraps; otherwise the DER half would test
    // something other than the input.
    if let Ok(der) = CertificateSigningRequestDer::from_pem_slice(armored.as_bytes()) {
        assert_eq!(der.as_ref(), data, "PEM armor round trip");
    }
    issued += usize::from(issue_and_check(ca, serial, armored, now, not_after));
    issued
}

/// Submits `pem` as a device's CSR for `serial`; if a certificate is issued, checks it
/// against the CA, the serial and the key the CSR holds.
/// True when a certificate was issued (and passed every check).
pub fn issue_and_check(
    ca: &Ca,
    serial: &DeviceSerial,
    pem: String,
    now: OffsetDateTime,
    not_after: OffsetDateTime,
) -> bool {
    // The key the request carries, read independently of certs' own CSR check.
    let requested_key = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .ok()
        .and_then(|der| {
            X509CertificationRequest::from_der(der.as_ref())
                .ok()
                .map(|(_, csr)| csr.certification_request_info.subject_pki.raw.to_vec())
        });
    let Ok(issued) = ca.issue_device(serial, DeviceKey::Csr(pem), now, not_after) else {
        return false;
    };
    let der = issued.certificate_der.as_slice();
    let (rest, cert) = parse_x509_certificate(der).expect("an issued certificate parses");
    assert!(
        rest.is_empty(),
        "trailing bytes after the issued certificate"
    );
    assert!(
        tms_certs::issued_by(der, ca.cert_der()),
        "the issued certificate is not signed by the CA"
    );
    let names: Vec<Option<&str>> = cert
        .subject()
        .iter_common_name()
        .map(|cn| cn.as_str().ok())
        .collect();
    assert_eq!(names, [Some(serial.as_str())], "subject CN");
    let requested_key = requested_key.expect("a CSR that was accepted parses on its own");
    assert_eq!(
        cert.public_key().raw,
        requested_key.as_slice(),
        "public key"
    );
    let identity = tms_certs::identity(der).expect("identity of an issued certificate");
    assert_eq!(
        identity.serial_number, issued.serial_number,
        "serial number"
    );
    let from_pem = tms_certs::parse_certificates(&issued.certificate_pem)
        .expect("the issued PEM holds a certificate");
    assert_eq!(from_pem.len(), 1, "certificates in the issued PEM");
    assert_eq!(from_pem[0].as_ref(), der, "issued PEM and DER differ");
    assert!(
        issued.private_key_pem.is_none(),
        "a key handed out for a CSR"
    );
    true
}

/// `der` as a PEM `CERTIFICATE REQUEST` block: standard base64 with padding, 64 columns.
pub fn armor(der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut body = String::with_capacity(der.len() * 4 / 3 + 4);
    for chunk in der.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                body.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 0x3f) as usize]));
            } else {
                body.push('=');
            }
        }
    }
    let mut pem = String::from("-----BEGIN CERTIFICATE REQUEST-----\n");
    // The body is ASCII, so every 64-byte slice falls on a character boundary.
    for line in body.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE REQUEST-----\n");
    pem
}
