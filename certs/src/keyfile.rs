//! The CA key file at rest: PKCS#8 PEM, or — with a passphrase (`TMS_CA_KEY_PASSPHRASE`) —
//! encrypted PKCS#8 (PBES2: scrypt N=2^14, r=8, p=1 — OpenSSL's default and within its
//! memory limit — then AES-256-CBC), the format
//! `openssl pkcs8 -topk8 -v2 aes-256-cbc -scrypt` writes and reads.

use std::path::Path;

use pkcs8::der::pem::LineEnding;
use pkcs8::pkcs5::{pbes2, scrypt};
use pkcs8::{EncryptedPrivateKeyInfo, PrivateKeyInfo, SecretDocument};

use crate::CertError;

const ENCRYPTED_LABEL: &str = "ENCRYPTED PRIVATE KEY";

/// PEM of a PKCS#8 key, encrypted when `passphrase` is given.
pub(crate) fn encode(pkcs8_der: &[u8], passphrase: Option<&str>) -> Result<String, CertError> {
    let Some(passphrase) = passphrase else {
        return pem("PRIVATE KEY", pkcs8_der);
    };
    let salt: [u8; 16] = crate::authority::random_bytes();
    let iv: [u8; 16] = crate::authority::random_bytes();
    // Neither error type implements `std::error::Error` (their crates' `std` features are
    // off), so their message is what is kept of the cause.
    let cost = scrypt::Params::new(14, 8, 1, 32).map_err(|e| encryption(Display(e)))?;
    let params = pbes2::Parameters::scrypt_aes256cbc(cost, &salt, &iv)
        .map_err(|e| encryption(Display(e)))?;
    let info = PrivateKeyInfo::try_from(pkcs8_der).map_err(encryption)?;
    let encrypted = info
        .encrypt_with_params(params, passphrase)
        .map_err(encryption)?;
    pem(ENCRYPTED_LABEL, encrypted.as_bytes())
}

/// The cause of a failure whose type only implements `Display`, as an error.
#[derive(Debug)]
struct Display<E>(E);

impl<E: std::fmt::Display> std::fmt::Display for Display<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<E: std::fmt::Display + std::fmt::Debug> std::error::Error for Display<E> {}

/// A step of encrypting the key failed: the cause is kept, for the log.
fn encryption(source: impl std::error::Error + Send + Sync + 'static) -> CertError {
    CertError::KeyEncryption(Box::new(source))
}

fn pem(label: &'static str, der: &[u8]) -> Result<String, CertError> {
    let doc = SecretDocument::try_from(der).map_err(encryption)?;
    doc.to_pem(label, LineEnding::LF)
        .map(|p| p.to_string())
        .map_err(encryption)
}

/// The PKCS#8 DER of the key in `pem` if it is encrypted (`Some`), decrypted with
/// `passphrase`; `None` for a plain key.
pub(crate) fn decrypt(
    pem: &str,
    passphrase: Option<&str>,
    path: &Path,
) -> Result<Option<Vec<u8>>, CertError> {
    if !pem.contains(&format!("-----BEGIN {ENCRYPTED_LABEL}-----")) {
        return Ok(None);
    }
    let Some(passphrase) = passphrase else {
        return Err(CertError::KeyLocked {
            path: path.to_owned(),
        });
    };
    let bad = |source: Box<dyn std::error::Error + Send + Sync>| CertError::BadFile {
        path: path.to_owned(),
        what: "encrypted private key",
        source,
    };
    let (label, doc) = SecretDocument::from_pem(pem).map_err(|e| bad(e.into()))?;
    if label != ENCRYPTED_LABEL {
        return Err(bad(format!(
            "its PEM block is {label:?}, not {ENCRYPTED_LABEL:?}"
        )
        .into()));
    }
    let info = EncryptedPrivateKeyInfo::try_from(doc.as_bytes()).map_err(|e| bad(e.into()))?;
    let plain = info
        .decrypt(passphrase)
        .map_err(|source| CertError::KeyPassphrase {
            path: path.to_owned(),
            source,
        })?;
    Ok(Some(plain.as_bytes().to_vec()))
}
