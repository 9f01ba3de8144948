//! The certificate authority itself: its files, and what it signs.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ::time::{Duration, OffsetDateTime};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PublicKeyData, RevocationReason, RevokedCertParams, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use tms_model::DeviceSerial;
use x509_parser::prelude::*;

use crate::CertError;
use crate::identity::{fingerprint_sha256, identity, serial_hex};
use crate::pem::parse_certificates;

const CA_VALIDITY: Duration = Duration::days(3650);
const SERVER_VALIDITY: Duration = Duration::days(397);
/// A server certificate this close to its end is reissued at start-up.
const SERVER_RENEW_BEFORE: Duration = Duration::days(30);
/// Devices with slightly wrong clocks still accept a certificate issued "just now".
const DEVICE_BACKDATE: Duration = Duration::hours(1);

/// The loaded CA: certificate, signing key and what `ca show` prints.
pub struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    info: CaInfo,
}

/// Subject, fingerprint and validity of the CA certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaInfo {
    pub subject: String,
    pub sha256_fingerprint: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

/// Where a device certificate's key comes from.
pub enum DeviceKey {
    /// The gateway generates the key pair and hands the private key out once.
    Generate,
    /// The device keeps its key; the PEM CSR carries the public key and CN = serial.
    Csr(String),
}

/// A freshly issued device certificate. `private_key_pem` is present only when the gateway
/// generated the key; nothing here keeps a copy of it.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub certificate_pem: String,
    pub certificate_der: Vec<u8>,
    pub private_key_pem: Option<String>,
    pub serial_number: String,
    pub sha256_fingerprint: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

/// The broker's TLS certificate and key.
#[derive(Debug, Clone)]
pub struct ServerCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: OffsetDateTime,
}

/// One entry of the revocation list.
#[derive(Debug, Clone)]
pub struct Revoked {
    /// Lower-case hex, as [`IssuedCert::serial_number`].
    pub serial_number: String,
    pub revoked_at: OffsetDateTime,
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
    /// Loads the CA from `ca_dir` (`ca.pem`, `ca.key`), creating it on first use. Returns the CA
    /// and whether it was created now. The key file is kept at mode 0600.
    pub fn load_or_create(ca_dir: &Path, now: OffsetDateTime) -> Result<(Ca, bool), CertError> {
        Self::open(ca_dir, now, None)
    }

    /// [`Ca::load_or_create`] with the key kept encrypted at rest when `passphrase` is given
    /// (`TMS_CA_KEY_PASSPHRASE`): a new key is written encrypted, and a plain key file found
    /// with a passphrase set is encrypted in place.
    pub fn open(
        ca_dir: &Path,
        now: OffsetDateTime,
        passphrase: Option<&str>,
    ) -> Result<(Ca, bool), CertError> {
        let cert_path = ca_dir.join("ca.pem");
        let key_path = ca_dir.join("ca.key");
        create_private_dir(ca_dir)?;
        if cert_path.exists() || key_path.exists() {
            return Ok((Self::load_with(ca_dir, passphrase)?, false));
        }
        let key = KeyPair::generate().map_err(|source| CertError::Generate {
            what: "CA key pair",
            source,
        })?;
        let mut params = CertificateParams::default();
        let suffix = hex::encode(random_bytes::<4>());
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "tms-gateway");
        params
            .distinguished_name
            .push(DnType::CommonName, format!("tms-gateway CA {suffix}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - Duration::hours(1);
        params.not_after = now + CA_VALIDITY;
        params.serial_number = Some(random_serial());
        params.key_identifier_method = KeyIdMethod::Sha256;
        let cert = params
            .self_signed(&key)
            .map_err(|source| CertError::Generate {
                what: "CA certificate",
                source,
            })?;
        // Key first: a crash in between leaves a key without a certificate, which `load`
        // reports, rather than a certificate whose key is lost.
        let key_pem = crate::keyfile::encode(&key.serialize_der(), passphrase)?;
        write_file(&key_path, key_pem.as_bytes(), 0o600)?;
        write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
        Ok((Self::load_with(ca_dir, passphrase)?, true))
    }

    /// Loads an existing CA with a plain key file; fails if either file is missing or
    /// unusable.
    pub fn load(ca_dir: &Path) -> Result<Ca, CertError> {
        Self::load_with(ca_dir, None)
    }

    /// Loads an existing CA whose key file may be encrypted with `passphrase`.
    pub fn load_with(ca_dir: &Path, passphrase: Option<&str>) -> Result<Ca, CertError> {
        let cert_path = ca_dir.join("ca.pem");
        let key_path = ca_dir.join("ca.key");
        let cert_pem = read_string(&cert_path)?;
        let key_pem = read_string(&key_path)?;
        // Tighten a key file that someone loosened; it must never be readable by others.
        let mode = fs::metadata(&key_path)
            .map_err(|source| CertError::Read {
                path: key_path.clone(),
                source,
            })?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600)).map_err(
                |source| CertError::Write {
                    path: key_path.clone(),
                    source,
                },
            )?;
        }
        let bad_key = || CertError::BadFile {
            path: key_path.clone(),
            what: "private key",
        };
        let key = match crate::keyfile::decrypt(&key_pem, passphrase, &key_path)? {
            Some(der) => KeyPair::try_from(der.as_slice()).map_err(|_| bad_key())?,
            None => {
                let key = KeyPair::from_pem(&key_pem).map_err(|_| bad_key())?;
                if passphrase.is_some() {
                    // A passphrase was set for a CA made without one: encrypt the key now.
                    let encrypted = crate::keyfile::encode(&key.serialize_der(), passphrase)?;
                    write_file(&key_path, encrypted.as_bytes(), 0o600)?;
                }
                key
            }
        };
        let cert_der = parse_certificates(&cert_pem)
            .map_err(|_| CertError::BadFile {
                path: cert_path.clone(),
                what: "certificate",
            })?
            .remove(0);
        let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(|_| CertError::BadFile {
            path: cert_path.clone(),
            what: "CA certificate",
        })?;
        let id = identity(&cert_der)?;
        let (_, parsed) =
            parse_x509_certificate(&cert_der).map_err(|e| CertError::Parse(e.to_string()))?;
        let info = CaInfo {
            subject: parsed.subject().to_string(),
            sha256_fingerprint: id.sha256_fingerprint,
            not_before: id.not_before,
            not_after: id.not_after,
        };
        Ok(Ca {
            cert_pem,
            cert_der,
            issuer,
            info,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn info(&self) -> &CaInfo {
        &self.info
    }

    /// Issues a device certificate: CN = serial, EKU clientAuth, valid from an hour before
    /// `now` until `not_after` (capped at the CA's own end), random 127-bit serial number.
    pub fn issue_device(
        &self,
        serial: &DeviceSerial,
        key: DeviceKey,
        now: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<IssuedCert, CertError> {
        let not_before = now - DEVICE_BACKDATE;
        let not_after = not_after.min(self.info.not_after);
        if not_after <= not_before {
            return Err(CertError::EmptyValidity { not_after });
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, serial.as_str());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
        let serial_number = random_serial();
        params.serial_number = Some(serial_number.clone());

        let (cert, private_key_pem) = match key {
            DeviceKey::Generate => {
                let key = KeyPair::generate().map_err(|source| CertError::Generate {
                    what: "device key pair",
                    source,
                })?;
                let cert =
                    params
                        .signed_by(&key, &self.issuer)
                        .map_err(|source| CertError::Generate {
                            what: "device certificate",
                            source,
                        })?;
                self.check_issued(cert.der(), &key.subject_public_key_info())?;
                (cert, Some(key.serialize_pem()))
            }
            DeviceKey::Csr(pem) => {
                let csr = crate::csr::check(&pem)?;
                // Exactly one CN, the serial: a second CN would be a second identity that
                // some TLS stacks read instead of the first.
                if csr.common_names.len() != 1 || csr.common_names[0] != serial.as_str() {
                    return Err(CertError::CsrSubject {
                        expected: serial.to_string(),
                        found: csr.common_names.join(", "),
                    });
                }
                let cert = params.signed_by(&csr.key, &self.issuer).map_err(|source| {
                    CertError::Generate {
                        what: "device certificate",
                        source,
                    }
                })?;
                self.check_issued(cert.der(), &csr.key.spki_der)?;
                (cert, None)
            }
        };
        let der = cert.der().to_vec();
        Ok(IssuedCert {
            certificate_pem: cert.pem(),
            sha256_fingerprint: fingerprint_sha256(&der),
            certificate_der: der,
            private_key_pem,
            serial_number: serial_hex(&serial_number.to_bytes()),
            not_before,
            not_after,
        })
    }

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

    /// Reads a certificate just signed back as any verifier would, before anyone records or
    /// receives it: it must parse, name this CA as issuer, carry a signature that verifies
    /// with the CA's key, and hold exactly the public key `spki_der` it was issued for.
    fn check_issued(&self, der: &[u8], spki_der: &[u8]) -> Result<(), CertError> {
        let failed = |what: &'static str| move |source| CertError::IssuedCheck { what, source };
        let (rest, cert) = parse_x509_certificate(der).map_err(|e| {
            failed("it does not parse")(match e {
                nom::Err::Error(e) | nom::Err::Failure(e) => e,
                nom::Err::Incomplete(_) => X509Error::InvalidCertificate,
            })
        })?;
        let (_, ca) = parse_x509_certificate(&self.cert_der).map_err(|_| {
            failed("the CA certificate does not parse")(X509Error::InvalidCertificate)
        })?;
        if !rest.is_empty() {
            return Err(failed("trailing data")(X509Error::InvalidCertificate));
        }
        if cert.issuer() != ca.subject() {
            return Err(failed("its issuer is not the CA")(
                X509Error::InvalidCertificate,
            ));
        }
        cert.verify_signature(Some(ca.public_key()))
            .map_err(failed("its signature does not verify with the CA key"))?;
        if cert.public_key().raw != spki_der {
            return Err(failed("its public key differs from the requested one")(
                X509Error::InvalidCertificate,
            ));
        }
        Ok(())
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

pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rand::fill(&mut bytes);
    bytes
}

/// 16 random octets, top bit clear (positive) and first octet non-zero (no shorter encoding):
/// 127 bits of entropy, well above the 64 the CA/B baseline asks for.
fn random_serial() -> SerialNumber {
    let mut bytes = random_bytes::<16>();
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

fn read_string(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|source| CertError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Creates `dir` (and missing parents) and makes it mode 0700 whatever the umask, also when
/// it already existed looser: it holds private keys.
fn create_private_dir(dir: &Path) -> Result<(), CertError> {
    let err = |source| CertError::Write {
        path: dir.to_owned(),
        source,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(err)?;
    if fs::metadata(dir).map_err(err)?.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    Ok(())
}

/// Writes through a temporary file created with `mode`, then renames: a reader never sees a
/// half-written key, and a key file is never briefly world-readable.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    let tmp = stage_file(path, contents, mode)?;
    move_into_place(&tmp, path)
}

/// Writes `contents` durably beside `path` (`NAME.tmp`, one per file: `server.key` and
/// `server.pem` are staged together); returns the staging path.
fn stage_file(path: &Path, contents: &[u8], mode: u32) -> Result<PathBuf, CertError> {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".tmp");
    let tmp: PathBuf = path.with_file_name(name);
    let err = |source| CertError::Write {
        path: path.to_owned(),
        source,
    };
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    if let Err(e) = file.write_all(contents).and_then(|()| file.sync_all()) {
        let _ = fs::remove_file(&tmp);
        return Err(err(e));
    }
    Ok(tmp)
}

fn move_into_place(tmp: &Path, path: &Path) -> Result<(), CertError> {
    fs::rename(tmp, path).map_err(|source| CertError::Write {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serial(s: &str) -> DeviceSerial {
        DeviceSerial::parse(s).unwrap()
    }

    #[test]
    fn ca_key_encrypted_at_rest_with_a_passphrase() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let now = OffsetDateTime::now_utc();
        let (ca, created) = Ca::open(&ca_dir, now, Some("correct horse")).unwrap();
        assert!(created);
        let key_path = ca_dir.join("ca.key");
        let key_file = fs::read_to_string(&key_path).unwrap();
        assert!(key_file.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"));
        assert_eq!(
            fs::metadata(&key_path).unwrap().permissions().mode() & 0o777,
            0o600
        );

        // The same CA comes back with the passphrase, and signs what verifies against it.
        let again = Ca::load_with(&ca_dir, Some("correct horse")).unwrap();
        assert_eq!(
            again.info().sha256_fingerprint,
            ca.info().sha256_fingerprint
        );
        let issued = again
            .issue_device(
                &serial("RE4A1"),
                DeviceKey::Generate,
                now,
                now + Duration::days(30),
            )
            .unwrap();
        assert_eq!(
            identity(&issued.certificate_der).unwrap().issuer,
            identity(ca.cert_der()).unwrap().issuer
        );

        // Without it, or with a wrong one, the CA does not load, and says why.
        assert!(matches!(
            Ca::load(&ca_dir),
            Err(CertError::KeyLocked { .. })
        ));
        assert!(matches!(
            Ca::load_with(&ca_dir, Some("wrong")),
            Err(CertError::KeyPassphrase { .. })
        ));

        // OpenSSL reads the file with the passphrase: a standard PKCS#8 PBES2 key.
        let out = std::process::Command::new("openssl")
            .args(["pkey", "-noout", "-passin", "pass:correct horse", "-in"])
            .arg(&key_path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn a_plain_ca_key_is_encrypted_once_a_passphrase_is_set() {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let (plain, _) = Ca::load_or_create(dir.path(), now).unwrap();
        assert!(
            fs::read_to_string(dir.path().join("ca.key"))
                .unwrap()
                .starts_with("-----BEGIN PRIVATE KEY-----")
        );
        let (ca, created) = Ca::open(dir.path(), now, Some("s3cret-pass")).unwrap();
        assert!(!created);
        assert_eq!(
            ca.info().sha256_fingerprint,
            plain.info().sha256_fingerprint
        );
        assert!(
            fs::read_to_string(dir.path().join("ca.key"))
                .unwrap()
                .starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----")
        );
        assert!(Ca::load_with(dir.path(), Some("s3cret-pass")).is_ok());
        assert!(matches!(
            Ca::load(dir.path()),
            Err(CertError::KeyLocked { .. })
        ));
    }

    #[test]
    fn ca_is_created_once_with_a_private_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let (ca, created) = Ca::load_or_create(&dir.path().join("ca"), now).unwrap();
        assert!(created);
        let mode = fs::metadata(dir.path().join("ca/ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (again, created) = Ca::load_or_create(&dir.path().join("ca"), now).unwrap();
        assert!(!created);
        assert_eq!(
            ca.info().sha256_fingerprint,
            again.info().sha256_fingerprint
        );
        assert!(ca.info().not_after - now > Duration::days(3649));
    }

    #[test]
    fn device_certificate_names_the_serial_and_carries_a_long_random_serial_number() {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let (ca, _) = Ca::load_or_create(dir.path(), now).unwrap();
        let lease_end = now + Duration::days(365);
        let a = ca
            .issue_device(&serial("RE4A000123"), DeviceKey::Generate, now, lease_end)
            .unwrap();
        let b = ca
            .issue_device(&serial("RE4A000123"), DeviceKey::Generate, now, lease_end)
            .unwrap();
        assert_ne!(a.serial_number, b.serial_number);
        assert!(crate::issued_by(&a.certificate_der, ca.cert_der()));
        let other = tempfile::tempdir().unwrap();
        let (foreign, _) = Ca::load_or_create(other.path(), now).unwrap();
        assert!(!crate::issued_by(&a.certificate_der, foreign.cert_der()));
        assert!(a.serial_number.len() >= 16, "{}", a.serial_number);
        let id = identity(&a.certificate_der).unwrap();
        assert_eq!(id.common_name.as_deref(), Some("RE4A000123"));
        assert_eq!(id.serial_number, a.serial_number);
        assert_eq!(
            id.not_before.unix_timestamp(),
            (now - DEVICE_BACKDATE).unix_timestamp()
        );
        assert_eq!(id.not_after.unix_timestamp(), lease_end.unix_timestamp());
        assert!(
            a.private_key_pem
                .as_deref()
                .unwrap()
                .contains("PRIVATE KEY")
        );
    }

    #[test]
    fn csr_keeps_the_device_key_and_must_name_the_serial() {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let (ca, _) = Ca::load_or_create(dir.path(), now).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "RE4A000123");
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let issued = ca
            .issue_device(
                &serial("RE4A000123"),
                DeviceKey::Csr(csr.clone()),
                now,
                now + Duration::days(30),
            )
            .unwrap();
        assert!(issued.private_key_pem.is_none());
        let (_, parsed) = parse_x509_certificate(&issued.certificate_der).unwrap();
        assert_eq!(
            parsed.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );

        let err = ca
            .issue_device(
                &serial("OTHER1"),
                DeviceKey::Csr(csr),
                now,
                now + Duration::days(30),
            )
            .unwrap_err();
        assert!(matches!(err, CertError::CsrSubject { .. }), "{err}");
        let err = ca
            .issue_device(
                &serial("OTHER1"),
                DeviceKey::Csr("garbage".into()),
                now,
                now + Duration::days(30),
            )
            .unwrap_err();
        assert!(matches!(err, CertError::Csr(_)), "{err}");
    }

    /// Runs openssl in `dir`; panics with its stderr when it fails.
    fn openssl(dir: &Path, args: &[&str]) -> String {
        let out = std::process::Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// A CSR for CN=RE4A1 made by `openssl req` from a key made by `genpkey_args`.
    fn openssl_csr(dir: &Path, name: &str, genpkey_args: &[&str], digest: Option<&str>) -> String {
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        let mut args = vec!["genpkey"];
        args.extend_from_slice(genpkey_args);
        args.extend_from_slice(&["-out", &key]);
        openssl(dir, &args);
        let mut args = vec![
            "req",
            "-new",
            "-key",
            &key,
            "-subj",
            "/CN=RE4A1",
            "-out",
            &csr,
        ];
        if let Some(d) = digest {
            args.push(d);
        }
        openssl(dir, &args);
        fs::read_to_string(dir.join(csr)).unwrap()
    }

    #[test]
    fn csr_keys_of_every_accepted_type_are_certified_as_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let (ca, _) = Ca::load_or_create(&dir.path().join("ca"), now).unwrap();
        let cases: [(&str, &[&str], Option<&str>); 6] = [
            // OpenSSL's default for a P-384 key: signed with SHA-256.
            (
                "p384-sha256",
                &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"],
                None,
            ),
            (
                "p384-sha384",
                &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"],
                Some("-sha384"),
            ),
            (
                "p256-sha384",
                &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
                Some("-sha384"),
            ),
            ("ed25519", &["-algorithm", "ED25519"], None),
            (
                "rsa2048",
                &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
                None,
            ),
            (
                "rsa3072-sha512",
                &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:3072"],
                Some("-sha512"),
            ),
        ];
        for (name, genpkey, digest) in cases {
            let csr = openssl_csr(dir.path(), name, genpkey, digest);
            let issued = ca
                .issue_device(
                    &serial("RE4A1"),
                    DeviceKey::Csr(csr),
                    now,
                    now + Duration::days(30),
                )
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let pem = format!("{name}.pem");
            fs::write(dir.path().join(&pem), &issued.certificate_pem).unwrap();
            // OpenSSL reads the key out of the certificate, it is the CSR's, and the
            // certificate verifies against the CA.
            let in_cert = openssl(dir.path(), &["x509", "-in", &pem, "-noout", "-pubkey"]);
            let in_csr = openssl(
                dir.path(),
                &["req", "-in", &format!("{name}.csr"), "-noout", "-pubkey"],
            );
            assert_eq!(in_cert, in_csr, "{name}");
            let in_key = openssl(
                dir.path(),
                &["pkey", "-in", &format!("{name}.key"), "-pubout"],
            );
            assert_eq!(in_cert, in_key, "{name}");
            openssl(dir.path(), &["verify", "-CAfile", "ca/ca.pem", &pem]);
        }
    }

    #[test]
    fn csrs_the_gateway_cannot_stand_behind_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc();
        let (ca, _) = Ca::load_or_create(&dir.path().join("ca"), now).unwrap();
        let refuse = |csr: String| {
            ca.issue_device(
                &serial("RE4A1"),
                DeviceKey::Csr(csr),
                now,
                now + Duration::days(30),
            )
            .unwrap_err()
        };
        let rsa1024 = openssl_csr(
            dir.path(),
            "rsa1024",
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"],
            None,
        );
        let err = refuse(rsa1024);
        assert!(
            matches!(err, CertError::Csr(CsrError::RsaSize { bits: 1024 })),
            "{err}"
        );
        assert!(err.to_string().contains("1024 bits"), "{err}");

        let p521 = openssl_csr(
            dir.path(),
            "p521",
            &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-521"],
            None,
        );
        let err = refuse(p521);
        assert!(
            matches!(err, CertError::Csr(CsrError::Curve { .. })),
            "{err}"
        );
        assert!(err.to_string().contains("P-521"), "{err}");

        let sha1 = openssl_csr(
            dir.path(),
            "rsa-sha1",
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
            Some("-sha1"),
        );
        let err = refuse(sha1);
        assert!(
            matches!(err, CertError::Csr(CsrError::SignatureAlgorithm { .. })),
            "{err}"
        );
        assert!(err.to_string().contains("sha1WithRSAEncryption"), "{err}");

        let ed448 = openssl_csr(dir.path(), "ed448", &["-algorithm", "ED448"], None);
        let err = refuse(ed448);
        assert!(
            matches!(err, CertError::Csr(CsrError::KeyType { .. })),
            "{err}"
        );
        assert!(err.to_string().contains("Ed448"), "{err}");

        // A CSR whose signature is not made by its key: change one base64 digit inside the
        // last 48 bytes, which are all Ed25519 signature (64 raw bytes, no structure).
        let good = openssl_csr(dir.path(), "ed25519-bad", &["-algorithm", "ED25519"], None);
        let mut lines: Vec<String> = good.lines().map(str::to_owned).collect();
        let at = lines.len() - 3;
        let line = &mut lines[at];
        let c = line.pop().unwrap();
        line.push(if c == 'A' { 'B' } else { 'A' });
        let err = refuse(lines.join("\n"));
        assert!(
            matches!(err, CertError::Csr(CsrError::Signature(_))),
            "{err}"
        );
    }

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

    use crate::CsrError;
    use rustls_pki_types::pem::PemObject;
}
