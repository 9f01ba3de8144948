//! Certificate signing requests from devices: which key a CSR carries, whether the gateway
//! takes it, and whether the CSR is signed by that key. Issues nothing.
//!
//! The key is read from the CSR's SubjectPublicKeyInfo, never inferred from the algorithm
//! the CSR was signed with: `openssl req -new -key p384.key` signs with ECDSA-SHA-256 by
//! default, and a key named after that hash would be written as a P-256 key around a P-384
//! point — a certificate nobody can use.

use rcgen::{PublicKeyData, SignatureAlgorithm};
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::asn1_rs::Oid;
use x509_parser::prelude::*;
use x509_parser::public_key::PublicKey;

/// RSA moduli the gateway signs: below 2048 bits is breakable, above 8192 is more than the
/// TLS stack verifies.
const RSA_MIN_BITS: usize = 2048;
const RSA_MAX_BITS: usize = 8192;

/// Why a CSR was refused. The text names the key type, size or signature algorithm found and
/// what would be accepted, so the person holding the device can fix it.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("csr_pem holds no PEM \"CERTIFICATE REQUEST\" block")]
    Pem(#[source] rustls_pki_types::pem::Error),
    #[error("the CSR is not a valid PKCS#10 request")]
    Parse(#[source] X509Error),
    #[error(
        "the CSR's key is {found}; accepted keys: ECDSA P-256, ECDSA P-384, Ed25519, RSA of {RSA_MIN_BITS} to {RSA_MAX_BITS} bits"
    )]
    KeyType { found: String },
    #[error("the CSR's ECDSA key is on curve {found}; accepted curves: P-256, P-384")]
    Curve { found: String },
    #[error(
        "the CSR's RSA key has {bits} bits; RSA keys must have {RSA_MIN_BITS} to {RSA_MAX_BITS} bits"
    )]
    RsaSize { bits: usize },
    #[error("the CSR's {key} public key is malformed: {problem}")]
    KeyEncoding {
        key: &'static str,
        problem: &'static str,
    },
    #[error(
        "the CSR is signed with {found}, which is not accepted for a {key} key; sign it with {accepted}"
    )]
    SignatureAlgorithm {
        found: String,
        key: &'static str,
        accepted: &'static str,
    },
    #[error("the CSR's signature does not verify with its own public key")]
    Signature(#[source] X509Error),
}

/// The key types a device certificate may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyKind {
    P256,
    P384,
    Ed25519,
    Rsa { bits: usize },
}

impl KeyKind {
    fn name(self) -> &'static str {
        match self {
            KeyKind::P256 => "ECDSA P-256",
            KeyKind::P384 => "ECDSA P-384",
            KeyKind::Ed25519 => "Ed25519",
            KeyKind::Rsa { .. } => "RSA",
        }
    }

    /// The rcgen algorithm whose SubjectPublicKeyInfo encoding is this key type's. The
    /// device certificate is signed by the CA key; this only decides how the device's own
    /// key is written into it.
    fn spki_algorithm(self) -> &'static SignatureAlgorithm {
        match self {
            KeyKind::P256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyKind::P384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyKind::Ed25519 => &rcgen::PKCS_ED25519,
            KeyKind::Rsa { .. } => &rcgen::PKCS_RSA_SHA256,
        }
    }
}

/// The public key of an accepted CSR, in the form rcgen writes into a certificate.
#[derive(Debug, Clone)]
pub(crate) struct CsrKey {
    pub kind: KeyKind,
    /// The CSR's SubjectPublicKeyInfo, DER, exactly as the device sent it.
    pub spki_der: Vec<u8>,
    /// The subjectPublicKey bits.
    key: Vec<u8>,
}

impl PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.key
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.kind.spki_algorithm()
    }
}

/// A CSR whose key is accepted and whose signature verifies with that key.
#[derive(Debug, Clone)]
pub(crate) struct CheckedCsr {
    /// Every subject CN of the request, in order.
    pub common_names: Vec<String>,
    pub key: CsrKey,
}

/// Parses a PEM CSR, accepts or refuses its key and signature algorithm, and verifies the
/// signature (proof that the requester holds the private key).
pub(crate) fn check(pem: &str) -> Result<CheckedCsr, CsrError> {
    let der =
        CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).map_err(CsrError::Pem)?;
    let (rest, csr) = X509CertificationRequest::from_der(der.as_ref()).map_err(nom_error)?;
    if !rest.is_empty() {
        return Err(CsrError::Parse(X509Error::InvalidCertificate));
    }
    let info = &csr.certification_request_info;
    let spki = &info.subject_pki;
    let kind = key_kind(spki)?;
    let key = CsrKey {
        kind,
        spki_der: spki.raw.to_vec(),
        key: spki.subject_public_key.data.to_vec(),
    };
    // What the certificate will say must be byte for byte what the device sent (e.g. RSA
    // with its NULL parameters, Ed25519 without any); anything else is an odd encoding.
    if key.subject_public_key_info() != key.spki_der {
        return Err(CsrError::KeyEncoding {
            key: kind.name(),
            problem: "its algorithm parameters are not the standard ones",
        });
    }
    check_signature_algorithm(kind, &csr.signature_algorithm)?;
    csr.verify_signature().map_err(|e| match e {
        X509Error::SignatureUnsupportedAlgorithm => CsrError::SignatureAlgorithm {
            found: signature_name(&csr.signature_algorithm),
            key: kind.name(),
            accepted: accepted_signatures(kind),
        },
        other => CsrError::Signature(other),
    })?;
    let common_names = info
        .subject
        .iter_common_name()
        .map(|cn| {
            cn.as_str()
                .map(str::to_owned)
                .unwrap_or_else(|_| String::from_utf8_lossy(cn.as_slice()).into_owned())
        })
        .collect();
    Ok(CheckedCsr { common_names, key })
}

fn nom_error(e: nom::Err<X509Error>) -> CsrError {
    match e {
        nom::Err::Error(e) | nom::Err::Failure(e) => CsrError::Parse(e),
        nom::Err::Incomplete(_) => CsrError::Parse(X509Error::InvalidCertificate),
    }
}

fn key_kind(spki: &SubjectPublicKeyInfo<'_>) -> Result<KeyKind, CsrError> {
    let alg = spki.algorithm.algorithm.to_id_string();
    let bits = spki.subject_public_key.data.as_ref();
    match alg.as_str() {
        "1.2.840.10045.2.1" => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .ok_or(CsrError::KeyEncoding {
                    key: "ECDSA",
                    problem: "it names no curve",
                })?;
            let (kind, coordinate) = match curve.to_id_string().as_str() {
                "1.2.840.10045.3.1.7" => (KeyKind::P256, 32),
                "1.3.132.0.34" => (KeyKind::P384, 48),
                _ => {
                    return Err(CsrError::Curve {
                        found: curve_name(&curve),
                    });
                }
            };
            // Uncompressed points only: that is what the TLS stack verifies with.
            if bits.len() != 1 + 2 * coordinate || bits.first() != Some(&4) {
                return Err(CsrError::KeyEncoding {
                    key: kind.name(),
                    problem: "the point is not an uncompressed point on the curve",
                });
            }
            Ok(kind)
        }
        "1.3.101.112" => {
            if bits.len() != 32 {
                return Err(CsrError::KeyEncoding {
                    key: "Ed25519",
                    problem: "the key is not 32 bytes",
                });
            }
            Ok(KeyKind::Ed25519)
        }
        "1.2.840.113549.1.1.1" => {
            let Ok(PublicKey::RSA(rsa)) = spki.parsed() else {
                return Err(CsrError::KeyEncoding {
                    key: "RSA",
                    problem: "the modulus and exponent cannot be read",
                });
            };
            let bits = rsa_bits(rsa.modulus);
            if !(RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) {
                return Err(CsrError::RsaSize { bits });
            }
            Ok(KeyKind::Rsa { bits })
        }
        _ => Err(CsrError::KeyType {
            found: key_type_name(&spki.algorithm.algorithm),
        }),
    }
}

/// Bit length of a big-endian unsigned integer (the DER sign octet and any zeros ignored).
fn rsa_bits(modulus: &[u8]) -> usize {
    let Some(start) = modulus.iter().position(|b| *b != 0) else {
        return 0;
    };
    (modulus.len() - start) * 8 - modulus[start].leading_zeros() as usize
}

fn check_signature_algorithm(kind: KeyKind, alg: &AlgorithmIdentifier<'_>) -> Result<(), CsrError> {
    let oid = alg.algorithm.to_id_string();
    let ok = match kind {
        // Either hash with either curve: a P-384 key signed with SHA-256 is what OpenSSL
        // makes by default, and the certificate carries the key, not the hash.
        KeyKind::P256 | KeyKind::P384 => {
            matches!(oid.as_str(), "1.2.840.10045.4.3.2" | "1.2.840.10045.4.3.3")
        }
        KeyKind::Ed25519 => oid == "1.3.101.112",
        // PKCS#1 v1.5 with SHA-2, or PSS (its hash is checked when verifying).
        KeyKind::Rsa { .. } => matches!(
            oid.as_str(),
            "1.2.840.113549.1.1.11"
                | "1.2.840.113549.1.1.12"
                | "1.2.840.113549.1.1.13"
                | "1.2.840.113549.1.1.10"
        ),
    };
    if ok {
        Ok(())
    } else {
        Err(CsrError::SignatureAlgorithm {
            found: signature_name(alg),
            key: kind.name(),
            accepted: accepted_signatures(kind),
        })
    }
}

fn accepted_signatures(kind: KeyKind) -> &'static str {
    match kind {
        KeyKind::P256 | KeyKind::P384 => "ecdsa-with-SHA256 or ecdsa-with-SHA384",
        KeyKind::Ed25519 => "Ed25519",
        KeyKind::Rsa { .. } => {
            "sha256WithRSAEncryption, sha384WithRSAEncryption, sha512WithRSAEncryption or RSASSA-PSS with SHA-256/384/512"
        }
    }
}

fn signature_name(alg: &AlgorithmIdentifier<'_>) -> String {
    let oid = alg.algorithm.to_id_string();
    let name = match oid.as_str() {
        "1.2.840.113549.1.1.4" => "md5WithRSAEncryption",
        "1.2.840.113549.1.1.5" => "sha1WithRSAEncryption",
        "1.2.840.113549.1.1.14" => "sha224WithRSAEncryption",
        "1.2.840.113549.1.1.11" => "sha256WithRSAEncryption",
        "1.2.840.113549.1.1.12" => "sha384WithRSAEncryption",
        "1.2.840.113549.1.1.13" => "sha512WithRSAEncryption",
        "1.2.840.113549.1.1.10" => "RSASSA-PSS",
        "1.2.840.10045.4.1" => "ecdsa-with-SHA1",
        "1.2.840.10045.4.3.1" => "ecdsa-with-SHA224",
        "1.2.840.10045.4.3.2" => "ecdsa-with-SHA256",
        "1.2.840.10045.4.3.3" => "ecdsa-with-SHA384",
        "1.2.840.10045.4.3.4" => "ecdsa-with-SHA512",
        "1.3.101.112" => "Ed25519",
        "1.3.101.113" => "Ed448",
        "1.2.840.10040.4.3" => "dsa-with-SHA1",
        "2.16.840.1.101.3.4.3.2" => "dsa-with-SHA256",
        _ => return format!("the algorithm {oid}"),
    };
    name.to_owned()
}

fn key_type_name(oid: &Oid<'_>) -> String {
    let oid = oid.to_id_string();
    let name = match oid.as_str() {
        "1.2.840.113549.1.1.10" => "an RSASSA-PSS key (use a plain rsaEncryption RSA key)",
        "1.3.101.113" => "Ed448",
        "1.3.101.110" => "X25519 (a key-agreement key, it cannot sign)",
        "1.3.101.111" => "X448 (a key-agreement key, it cannot sign)",
        "1.2.840.10040.4.1" => "DSA",
        "1.2.840.10046.2.1" => "Diffie-Hellman (it cannot sign)",
        _ => return format!("of unknown type {oid}"),
    };
    name.to_owned()
}

fn curve_name(oid: &Oid<'_>) -> String {
    let oid = oid.to_id_string();
    let name = match oid.as_str() {
        "1.3.132.0.35" => "P-521",
        "1.3.132.0.10" => "secp256k1",
        "1.2.840.10045.3.1.1" => "P-192",
        "1.3.132.0.33" => "P-224",
        "1.3.36.3.3.2.8.1.1.7" => "brainpoolP256r1",
        "1.3.36.3.3.2.8.1.1.11" => "brainpoolP384r1",
        "1.3.36.3.3.2.8.1.1.13" => "brainpoolP512r1",
        _ => return oid,
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsa_bits_ignore_the_sign_octet() {
        let mut m = vec![0u8; 257];
        m[1] = 0x80;
        assert_eq!(rsa_bits(&m), 2048);
        m[1] = 0x40;
        assert_eq!(rsa_bits(&m), 2047);
        assert_eq!(rsa_bits(&[0, 0]), 0);
    }
}
