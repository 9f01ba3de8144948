//! The broker's server certificate: issued for `mqtt.hostnames`, kept in `server/`, and
//! reissued when it no longer fits (another CA, other names, within 30 days of its end).

use std::fs;
use std::net::IpAddr;
use std::path::Path;

use ::time::{Duration, OffsetDateTime};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair,
    KeyUsagePurpose, PublicKeyData,
};
use x509_parser::prelude::*;

use crate::CertError;
use crate::at_rest::{create_private_dir, move_into_place, stage_file};
use crate::authority::{Ca, random_serial};
use crate::pem::parse_certificates;

const SERVER_VALIDITY: Duration = Duration::days(397);
/// A server certificate this close to its end is reissued at start-up.
const SERVER_RENEW_BEFORE: Duration = Duration::days(30);

/// The broker's TLS certificate and key.
#[derive(Debug, Clone)]
pub struct ServerCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: OffsetDateTime,
}

/// The DNS names and IP addresses (subject alternative names) of a certificate, IP
/// addresses in their usual text form; `None` when it has no such extension.
fn san_names(cert: &X509Certificate<'_>) -> Option<Vec<String>> {
    match cert.subject_alternative_name() {
        Ok(Some(san)) => Some(
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::DNSName(d) => Some((*d).to_owned()),
                    GeneralName::IPAddress(b) => match b.len() {
                        4 => Some(IpAddr::from(<[u8; 4]>::try_from(*b).ok()?).to_string()),
                        16 => Some(IpAddr::from(<[u8; 16]>::try_from(*b).ok()?).to_string()),
                        _ => None,
                    },
                    _ => None,
                })
                .collect(),
        ),
        _ => None,
    }
}

/// The names a server certificate (the first of `pem`) holds: what a device may put in its
/// broker address and still pass TLS verification. Empty when it cannot be read.
pub fn certificate_names(pem: &str) -> Vec<String> {
    parse_certificates(pem)
        .ok()
        .and_then(|certs| certs.into_iter().next())
        .map(|der| certificate_names_der(&der))
        .unwrap_or_default()
}

/// [`certificate_names`] of one DER certificate.
pub fn certificate_names_der(der: &[u8]) -> Vec<String> {
    parse_x509_certificate(der)
        .ok()
        .and_then(|(_, cert)| san_names(&cert))
        .unwrap_or_default()
}

impl Ca {
    /// Issues the broker's server certificate for these DNS names and IP addresses.
    pub fn issue_server(
        &self,
        hostnames: &[String],
        now: OffsetDateTime,
    ) -> Result<ServerCert, CertError> {
        let mut params =
            CertificateParams::new(hostnames.to_vec()).map_err(|source| CertError::Generate {
                what: "server certificate parameters",
                source,
            })?;
        params.distinguished_name = DistinguishedName::new();
        let cn = hostnames
            .first()
            .map(String::as_str)
            .unwrap_or("tms-gateway");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - Duration::hours(1);
        params.not_after = (now + SERVER_VALIDITY).min(self.info.not_after);
        params.serial_number = Some(random_serial());
        let key = KeyPair::generate().map_err(|source| CertError::Generate {
            what: "server key pair",
            source,
        })?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| CertError::Generate {
                what: "server certificate",
                source,
            })?;
        self.check_issued(cert.der(), &key.subject_public_key_info())?;
        Ok(ServerCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            not_after: params.not_after,
        })
    }

    /// Returns the server certificate in `server_dir`, reissuing it when it is missing, was
    /// issued by another CA, names other hostnames, or ends within 30 days. The bool says
    /// whether it was (re)issued.
    pub fn ensure_server_cert(
        &self,
        server_dir: &Path,
        hostnames: &[String],
        now: OffsetDateTime,
    ) -> Result<(ServerCert, bool), CertError> {
        create_private_dir(server_dir)?;
        let cert_path = server_dir.join("server.pem");
        let key_path = server_dir.join("server.key");
        if let (Ok(cert_pem), Ok(key_pem)) = (
            fs::read_to_string(&cert_path),
            fs::read_to_string(&key_path),
        ) && let Some(not_after) = self.server_cert_still_fits(&cert_pem, hostnames, now)
        {
            return Ok((
                ServerCert {
                    cert_pem,
                    key_pem,
                    not_after,
                },
                false,
            ));
        }
        Ok((self.renew_server_cert(server_dir, hostnames, now)?, true))
    }

    /// Issues a new server certificate into `server_dir` unconditionally (key first, both
    /// files replaced atomically). A running broker picks it up without dropping sessions.
    pub fn renew_server_cert(
        &self,
        server_dir: &Path,
        hostnames: &[String],
        now: OffsetDateTime,
    ) -> Result<ServerCert, CertError> {
        create_private_dir(server_dir)?;
        let cert = self.issue_server(hostnames, now)?;
        // Both files are written before either replaces the old one: a failure on the way
        // (disk full) leaves the working pair, never a new key beside the old certificate.
        let key = stage_file(
            &server_dir.join("server.key"),
            cert.key_pem.as_bytes(),
            0o600,
        )?;
        let pem = match stage_file(
            &server_dir.join("server.pem"),
            cert.cert_pem.as_bytes(),
            0o644,
        ) {
            Ok(pem) => pem,
            Err(e) => {
                let _ = fs::remove_file(&key);
                return Err(e);
            }
        };
        // The watcher reloads on a new server.pem, so the key goes in place first.
        move_into_place(&key, &server_dir.join("server.key"))?;
        move_into_place(&pem, &server_dir.join("server.pem"))?;
        Ok(cert)
    }

    fn server_cert_still_fits(
        &self,
        pem: &str,
        hostnames: &[String],
        now: OffsetDateTime,
    ) -> Option<OffsetDateTime> {
        let der = parse_certificates(pem).ok()?.remove(0);
        let (_, cert) = parse_x509_certificate(&der).ok()?;
        let (_, ca) = parse_x509_certificate(&self.cert_der).ok()?;
        if cert.issuer() != ca.subject() || cert.verify_signature(Some(ca.public_key())).is_err() {
            return None;
        }
        let not_after = cert.validity().not_after.to_datetime();
        if not_after - now < SERVER_RENEW_BEFORE {
            return None;
        }
        let mut have = san_names(&cert)?;
        let mut want: Vec<String> = hostnames
            .iter()
            .map(|h| {
                h.parse::<IpAddr>()
                    .map(|ip| ip.to_string())
                    .unwrap_or_else(|_| h.clone())
            })
            .collect();
        have.sort();
        want.sort();
        (have == want).then_some(not_after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_certificate_is_reissued_only_when_hostnames_change() {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let (ca, _) = Ca::load_or_create(&dir.path().join("ca"), now).unwrap();
        let hosts = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let (first, issued) = ca
            .ensure_server_cert(&dir.path().join("server"), &hosts, now)
            .unwrap();
        assert!(issued);
        let (same, issued) = ca
            .ensure_server_cert(&dir.path().join("server"), &hosts, now)
            .unwrap();
        assert!(!issued);
        assert_eq!(first.cert_pem, same.cert_pem);
        let hosts = vec!["gw.example".to_owned()];
        let (_, issued) = ca
            .ensure_server_cert(&dir.path().join("server"), &hosts, now)
            .unwrap();
        assert!(issued);
        let (_, issued) = ca
            .ensure_server_cert(
                &dir.path().join("server"),
                &hosts,
                now + Duration::days(380),
            )
            .unwrap();
        assert!(issued, "a certificate near its end must be renewed");
    }
}
