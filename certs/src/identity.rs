//! What a presented certificate says about its holder: CN, serial number, validity.

use ::time::OffsetDateTime;
use sha2::{Digest, Sha256};
use x509_parser::prelude::*;

use crate::CertError;

/// The identity the broker and the store care about in a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIdentity {
    /// Subject common name; for a device, its serial.
    pub common_name: Option<String>,
    /// Certificate serial number as lower-case hex, no leading zero octets.
    pub serial_number: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub sha256_fingerprint: String,
    /// Issuer distinguished name, as text (for "issued by a foreign CA" diagnostics).
    pub issuer: String,
}

/// Reads the identity out of a DER certificate. Does not verify anything.
pub fn identity(der: &[u8]) -> Result<CertIdentity, CertError> {
    let (_, cert) = parse_x509_certificate(der).map_err(|e| CertError::Parse(e.to_string()))?;
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);
    Ok(CertIdentity {
        common_name,
        serial_number: serial_hex(cert.raw_serial()),
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
        sha256_fingerprint: fingerprint_sha256(der),
        issuer: cert.issuer().to_string(),
    })
}

/// True when `der` names the CA certificate `ca_der` as its issuer and its signature
/// verifies with that CA's key: the certificate is the gateway's own, whatever else is wrong
/// with it (expired, revoked). Anyone can make a certificate that merely *says* our CA.
pub fn issued_by(der: &[u8], ca_der: &[u8]) -> bool {
    let (Ok((_, cert)), Ok((_, ca))) =
        (parse_x509_certificate(der), parse_x509_certificate(ca_der))
    else {
        return false;
    };
    cert.issuer() == ca.subject() && cert.verify_signature(Some(ca.public_key())).is_ok()
}

/// SHA-256 of the DER encoding, lower-case hex without separators.
pub fn fingerprint_sha256(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Serial number octets as lower-case hex without leading zero octets, so the same number
/// always has the same spelling whichever encoder produced it.
pub(crate) fn serial_hex(raw: &[u8]) -> String {
    let first = raw
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    hex::encode(&raw[first..])
}
