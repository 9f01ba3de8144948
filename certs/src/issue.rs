//! Device certificates: from a key pair the gateway generates or from the device's CSR,
//! each read back and checked before it is returned. Records nothing: the caller stores
//! the certificate and hands out the key.

use ::time::{Duration, OffsetDateTime};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair,
    KeyUsagePurpose, PublicKeyData,
};
use tms_model::DeviceSerial;
use x509_parser::prelude::*;

use crate::CertError;
use crate::authority::{Ca, random_serial};
use crate::identity::{fingerprint_sha256, serial_hex};

/// Devices with slightly wrong clocks still accept a certificate issued "just now".
const DEVICE_BACKDATE: Duration = Duration::hours(1);

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

impl Ca {
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

    /// Reads a certificate just signed back as any verifier would, before anyone records or
    /// receives it: it must parse, name this CA as issuer, carry a signature that verifies
    /// with the CA's key, and hold exactly the public key `spki_der` it was issued for.
    pub(crate) fn check_issued(&self, der: &[u8], spki_der: &[u8]) -> Result<(), CertError> {
        let failed = |what: &'static str| move |source| CertError::IssuedCheck { what, source };
        let (rest, cert) =
            parse_x509_certificate(der).map_err(|e| failed("it does not parse")(x509_error(e)))?;
        let (_, ca) = parse_x509_certificate(&self.cert_der)
            .map_err(|e| failed("the CA certificate does not parse")(x509_error(e)))?;
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
}

/// The error inside a parser's result; an input that ended early is an invalid certificate.
fn x509_error(e: nom::Err<X509Error>) -> X509Error {
    match e {
        nom::Err::Error(e) | nom::Err::Failure(e) => e,
        nom::Err::Incomplete(_) => X509Error::InvalidCertificate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::identity;
    use crate::testing::serial;
    use std::fs;
    use std::path::Path;

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

    use crate::CsrError;
}
