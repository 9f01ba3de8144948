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
        let revoked_certs = revoked
            .iter()
            .filter_map(|r| {
                Some(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&hex::decode(&r.serial_number).ok()?),
                    revocation_time: r.revoked_at,
                    reason_code: Some(RevocationReason::Unspecified),
                    invalidity_date: None,
                })
            })
            .collect();
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
    use crate::DeviceKey;
    use crate::identity::serial_hex;
    use rustls_pki_types::pem::PemObject;
    use tms_model::DeviceSerial;
    use x509_parser::prelude::*;

    fn serial(s: &str) -> DeviceSerial {
        DeviceSerial::parse(s).unwrap()
    }

    #[test]
    fn crl_lists_revoked_serials() {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let (ca, _) = Ca::load_or_create(dir.path(), now).unwrap();
        let cert = ca
            .issue_device(
                &serial("RE4A1"),
                DeviceKey::Generate,
                now,
                now + Duration::days(30),
            )
            .unwrap();
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
}
