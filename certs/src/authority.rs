//! The certificate authority itself: the loaded CA (certificate and signing key) and what
//! `ca show` prints. How it is kept on disk is `at_rest`, what it signs `issue`,
//! `server_cert` and `crl`.

use ::time::OffsetDateTime;
use rcgen::{Issuer, KeyPair, SerialNumber};
use rustls_pki_types::CertificateDer;

/// The loaded CA: certificate, signing key and what `ca show` prints.
pub struct Ca {
    pub(crate) cert_pem: String,
    pub(crate) cert_der: CertificateDer<'static>,
    pub(crate) issuer: Issuer<'static, KeyPair>,
    pub(crate) info: CaInfo,
}

/// Subject, fingerprint and validity of the CA certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaInfo {
    pub subject: String,
    pub sha256_fingerprint: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Ca {
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn info(&self) -> &CaInfo {
        &self.info
    }
}

pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rand::fill(&mut bytes);
    bytes
}

/// 16 random octets, top bit clear (positive) and first octet non-zero (no shorter encoding):
/// 127 bits of entropy, well above the 64 the CA/B baseline asks for.
pub(crate) fn random_serial() -> SerialNumber {
    let mut bytes = random_bytes::<16>();
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}
