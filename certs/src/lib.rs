//! The gateway's built-in certificate authority.
//!
//! Creates and reloads the CA (ECDSA P-256), issues the broker's server certificate and device
//! certificates (from a key pair it generates, or from a CSR with a P-256, P-384, Ed25519 or
//! RSA key; each read back and verified before it is returned), reads the identity out of a
//! presented certificate, and signs revocation lists. Synchronous and free of MQTT and HTTP:
//! callers run it on a blocking thread and keep the records.

mod at_rest;
mod authority;
mod crl;
mod csr;
mod identity;
mod issue;
mod keyfile;
mod pem;
mod server_cert;
#[cfg(test)]
mod testing;

pub use authority::{Ca, CaInfo};
pub use crl::Revoked;
pub use csr::CsrError;
pub use identity::{CertIdentity, fingerprint_sha256, identity, issued_by};
pub use issue::{DeviceKey, IssuedCert};
pub use pem::{parse_certificates, parse_private_key};
pub use server_cert::{ServerCert, certificate_names, certificate_names_der};

use std::path::PathBuf;

/// Everything that can go wrong in the CA; each variant names what was being done.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no usable {what}")]
    BadFile {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    #[error("creating the {what}")]
    Generate {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    /// The CSR was refused; the message says why (key type, size, signature algorithm).
    #[error(transparent)]
    Csr(#[from] CsrError),
    #[error("the CSR names {found:?} as its subject CN, but the device serial is {expected:?}")]
    CsrSubject { expected: String, found: String },
    #[error("the certificate is not valid X.509: {0}")]
    Parse(String),
    #[error("PEM input holds no {0}")]
    Pem(&'static str),
    #[error("PEM input holds no readable {what}")]
    PemDecode {
        what: &'static str,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path} is encrypted: set TMS_CA_KEY_PASSPHRASE")]
    KeyLocked { path: PathBuf },
    #[error("{path} could not be decrypted with TMS_CA_KEY_PASSPHRASE (wrong passphrase?)")]
    KeyPassphrase {
        path: PathBuf,
        #[source]
        source: pkcs8::Error,
    },
    #[error("encrypting the CA key")]
    KeyEncryption(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
    /// A revoked serial number as recorded is not hex; the list is not signed without it.
    #[error("the revoked serial number {serial:?} is not hexadecimal")]
    RevokedSerial {
        serial: String,
        #[source]
        source: hex::FromHexError,
    },
    /// A certificate just signed failed to read back as issued by this CA for the requested
    /// key; it was neither recorded nor handed out.
    #[error("the certificate just issued failed its check: {what}")]
    IssuedCheck {
        what: &'static str,
        #[source]
        source: x509_parser::error::X509Error,
    },
    #[error("the validity would end before it starts (not after {not_after})")]
    EmptyValidity { not_after: time::OffsetDateTime },
}
