//! PEM decoding through `rustls-pki-types` (`rustls-pemfile` is archived).

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::CertError;

/// Every certificate in a PEM text, in order.
pub fn parse_certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|source| CertError::PemDecode {
            what: "certificate",
            source,
        })?;
    if certs.is_empty() {
        return Err(CertError::Pem("certificate"));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, SEC1 or PKCS#1) in a PEM text.
pub fn parse_private_key(pem: &str) -> Result<PrivateKeyDer<'static>, CertError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|source| match source {
        rustls_pki_types::pem::Error::NoItemsFound => CertError::Pem("private key"),
        source => CertError::PemDecode {
            what: "private key",
            source,
        },
    })
}
