//! The certificate revocation list the CA signs for the serials it has revoked.

use ::time::{Duration, OffsetDateTime};
use rcgen::{
    CertificateRevocationListParams, KeyIdMethod, RevocationReason, RevokedCertParams, SerialNumber,
};

use crate::CertError;
use crate::authority::Ca;

/// One entry of the revocation list.
#[derive(Debug, Clone)]
pub struct Revoked {
    /// Lower-case hex, as [`IssuedCert::serial_number`].
    pub serial_number: String,
    pub revoked_at: OffsetDateTime,
}

impl Ca {
    /// Signs a revocation list (PEM) valid from `now` for a day.
    pub fn crl_pem(
        &self,
        revoked: &[Revoked],
        crl_number: u64,
        now: OffsetDateTime,
    ) -> Result<String, CertError> {
        // A serial that cannot be read fails the list: leaving it out would sign a CRL
        // on which a revoked certificate looks valid.
        let revoked_certs = revoked
            .iter()
            .map(|r| {
                let serial =
                    hex::decode(&r.serial_number).map_err(|source| CertError::RevokedSerial {
                        serial: r.serial_number.clone(),
                        source,
                    })?;
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&serial),
                    revocation_time: r.revoked_at,
                    reason_code: Some(RevocationReason::Unspecified),
                    invalidity_date: None,
                })
            })
            .collect::<Result<_, CertError>>()?;
        let params = CertificateRevocationListParams {
            this_update: now - Duration::minutes(5),
            next_update: now + Duration::days(1),
            crl_number: SerialNumber::from(crl_number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params
            .signed_by(&self.issuer)
            .map_err(|source| CertError::Generate {
                what: "certificate revocation list",
                source,
            })?;
        crl.pem().map_err(|source| CertError::Generate {
            what: "certificate revocation list PEM",
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::serial_hex;
    use crate::testing::issue_30_days;
    use rustls_pki_types::pem::PemObject;
    use x509_parser::prelude::*;

    #[test]
    fn crl_lists_revoked_serials() {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let (ca, _) = Ca::load_or_create(dir.path(), now).unwrap();
        let cert = issue_30_days(&ca, "RE4A1", now);
        let pem = ca
            .crl_pem(
                &[Revoked {
                    serial_number: cert.serial_number.clone(),
                    revoked_at: now,
                }],
                7,
                now,
            )
            .unwrap();
        let der =
            rustls_pki_types::CertificateRevocationListDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (_, crl) = parse_x509_crl(&der).unwrap();
        let listed: Vec<String> = crl
            .iter_revoked_certificates()
            .map(|r| serial_hex(r.raw_serial()))
            .collect();
        assert_eq!(listed, vec![cert.serial_number]);
    }

    #[test]
    fn a_serial_that_is_not_hex_fails_the_list_instead_of_being_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let (ca, _) = Ca::load_or_create(dir.path(), now).unwrap();
        let err = ca
            .crl_pem(
                &[Revoked {
                    serial_number: "not-hex".to_owned(),
                    revoked_at: now,
                }],
                1,
                now,
            )
            .unwrap_err();
        assert!(matches!(err, CertError::RevokedSerial { .. }), "{err}");
    }
}
