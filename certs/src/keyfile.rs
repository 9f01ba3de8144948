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
    let cost = scrypt::Params::new(14, 8, 1, 32).map_err(|_| CertError::KeyEncryption)?;
    let params = pbes2::Parameters::scrypt_aes256cbc(cost, &salt, &iv)
        .map_err(|_| CertError::KeyEncryption)?;
    let info = PrivateKeyInfo::try_from(pkcs8_der).map_err(|_| CertError::KeyEncryption)?;
    let encrypted = info
        .encrypt_with_params(params, passphrase)
        .map_err(|_| CertError::KeyEncryption)?;
    pem(ENCRYPTED_LABEL, encrypted.as_bytes())
}

fn pem(label: &'static str, der: &[u8]) -> Result<String, CertError> {
    let doc = SecretDocument::try_from(der).map_err(|_| CertError::KeyEncryption)?;
    doc.to_pem(label, LineEnding::LF)
        .map(|p| p.to_string())
        .map_err(|_| CertError::KeyEncryption)
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
    let bad = || CertError::BadFile {
        path: path.to_owned(),
        what: "encrypted private key",
    };
    let (label, doc) = SecretDocument::from_pem(pem).map_err(|_| bad())?;
    if label != ENCRYPTED_LABEL {
        return Err(bad());
    }
    let info = EncryptedPrivateKeyInfo::try_from(doc.as_bytes()).map_err(|_| bad())?;
    let plain = info
        .decrypt(passphrase)
        .map_err(|_| CertError::KeyPassphrase {
            path: path.to_owned(),
        })?;
    Ok(Some(plain.as_bytes().to_vec()))
}
