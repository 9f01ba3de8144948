//! The CA's files at rest: `ca.pem` and `ca.key` (mode 0600, encrypted with a passphrase
//! when one is set, see `keyfile`), created on first use and loaded after; and the private,
//! atomically replaced files every part of the CA writes. Signs nothing itself.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ::time::{Duration, OffsetDateTime};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyIdMethod,
    KeyPair, KeyUsagePurpose,
};
use x509_parser::prelude::*;

use crate::CertError;
use crate::authority::{Ca, CaInfo, random_bytes, random_serial};
use crate::identity::identity;
use crate::pem::parse_certificates;

const CA_VALIDITY: Duration = Duration::days(3650);

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

    /// Puts a CA made elsewhere (another node of the same gateway, through the shared
    /// database) into `ca_dir` — `ca.pem`, and `ca.key` (mode 0600) as given, encrypted with
    /// `passphrase` — and loads it, which proves the key opens with that passphrase and
    /// belongs to the certificate's issuer. Nothing is written when it does not load.
    pub fn install(
        ca_dir: &Path,
        cert_pem: &str,
        key_pem: &str,
        passphrase: Option<&str>,
    ) -> Result<Ca, CertError> {
        let staging = ca_dir.with_extension("incoming");
        create_private_dir(&staging)?;
        write_file(&staging.join("ca.key"), key_pem.as_bytes(), 0o600)?;
        write_file(&staging.join("ca.pem"), cert_pem.as_bytes(), 0o644)?;
        let loaded = Self::load_with(&staging, passphrase);
        let moved = loaded.and_then(|_| {
            create_private_dir(ca_dir)?;
            write_file(&ca_dir.join("ca.key"), key_pem.as_bytes(), 0o600)?;
            write_file(&ca_dir.join("ca.pem"), cert_pem.as_bytes(), 0o644)
        });
        let _ = fs::remove_dir_all(&staging);
        moved?;
        Self::load_with(ca_dir, passphrase)
    }

    /// The key file of the CA in `ca_dir` as it is stored (encrypted when a passphrase was
    /// set): what another node needs, with the passphrase, to sign as this CA.
    pub fn stored_key(ca_dir: &Path) -> Result<String, CertError> {
        read_string(&ca_dir.join("ca.key"))
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
        let bad_key = |source: rcgen::Error| CertError::BadFile {
            path: key_path.clone(),
            what: "private key",
            source: source.into(),
        };
        let key = match crate::keyfile::decrypt(&key_pem, passphrase, &key_path)? {
            Some(der) => KeyPair::try_from(der.as_slice()).map_err(bad_key)?,
            None => {
                let key = KeyPair::from_pem(&key_pem).map_err(bad_key)?;
                if passphrase.is_some() {
                    // A passphrase was set for a CA made without one: encrypt the key now.
                    let encrypted = crate::keyfile::encode(&key.serialize_der(), passphrase)?;
                    write_file(&key_path, encrypted.as_bytes(), 0o600)?;
                }
                key
            }
        };
        let cert_der = parse_certificates(&cert_pem)
            .map_err(|source| CertError::BadFile {
                path: cert_path.clone(),
                what: "certificate",
                source: source.into(),
            })?
            .remove(0);
        let issuer =
            Issuer::from_ca_cert_der(&cert_der, key).map_err(|source| CertError::BadFile {
                path: cert_path.clone(),
                what: "CA certificate",
                source: source.into(),
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
}

fn read_string(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|source| CertError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Creates `dir` (and missing parents) and makes it mode 0700 whatever the umask, also when
/// it already existed looser: it holds private keys.
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), CertError> {
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
pub(crate) fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    let tmp = stage_file(path, contents, mode)?;
    move_into_place(&tmp, path)
}

/// Writes `contents` durably beside `path` (`NAME.tmp`, one per file: `server.key` and
/// `server.pem` are staged together); returns the staging path.
pub(crate) fn stage_file(path: &Path, contents: &[u8], mode: u32) -> Result<PathBuf, CertError> {
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

pub(crate) fn move_into_place(tmp: &Path, path: &Path) -> Result<(), CertError> {
    fs::rename(tmp, path).map_err(|source| CertError::Write {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::issue_30_days;

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
        let issued = issue_30_days(&again, "RE4A1", now);
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
    fn an_unreadable_key_file_is_reported_with_its_cause() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        Ca::load_or_create(&ca_dir, OffsetDateTime::now_utc()).unwrap();
        fs::write(
            ca_dir.join("ca.key"),
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = Ca::load(&ca_dir).err().unwrap();
        assert!(
            matches!(
                err,
                CertError::BadFile {
                    what: "private key",
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            std::error::Error::source(&err).is_some(),
            "the reason the key was refused is kept: {err:?}"
        );
    }

    #[test]
    fn another_nodes_ca_is_installed_only_when_it_opens_with_the_passphrase() {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("first");
        let (ca, _) = Ca::open(&first, OffsetDateTime::now_utc(), Some("shared secret")).unwrap();
        let key = Ca::stored_key(&first).unwrap();
        assert!(key.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"));

        let other = dir.path().join("other");
        let err = Ca::install(&other, ca.cert_pem(), &key, Some("wrong"))
            .err()
            .unwrap();
        assert!(matches!(err, CertError::KeyPassphrase { .. }), "{err}");
        assert!(
            !other.join("ca.pem").exists(),
            "nothing is written when it does not load"
        );

        let installed = Ca::install(&other, ca.cert_pem(), &key, Some("shared secret")).unwrap();
        assert_eq!(installed.info(), ca.info());
        assert_eq!(
            fs::metadata(other.join("ca.key"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        assert!(
            !dir.path().join("other.incoming").exists(),
            "the staging folder is gone"
        );
    }
}
