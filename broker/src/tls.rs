//! TLS for the device listener: the server configuration, and a client-certificate verifier
//! that checks chain, validity and revocation, and remembers *who* was refused and *why*.
//!
//! rustls tells the connection only "bad certificate"; to attribute a refused handshake to the
//! device its certificate names, the verifier writes what it saw into a per-connection note
//! (a tokio task-local set around the handshake future). Revocation is a set of serial numbers
//! swapped atomically, so a revocation is seen by the very next handshake without re-verifying
//! a CRL signature on every connection.
//!
//! A refusal is attributed to a device (the note's identity keeps its CN) only when the
//! presented certificate is provably ours: signed by our CA, and — when the handshake got that
//! far — used by a client holding its key. Anyone can make a certificate naming a real serial,
//! or replay a real one seen on the wire; what such a stranger is refused for must not land on
//! that device's record. The claim is kept in the refusal detail, marked unverified, so it is
//! still logged and counted with the peer address.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};
use tms_certs::CertIdentity;

use crate::{BrokerError, RefusalReason};

/// What the verifier learned during one handshake.
#[derive(Debug, Default)]
pub(crate) struct HandshakeNote {
    /// The presented certificate; its `common_name` is `None` unless the certificate was
    /// issued by our CA and not shown to be used without its key (see the module header).
    pub identity: Option<CertIdentity>,
    pub refusal: Option<(RefusalReason, String)>,
    /// Set when the server certificate was chosen (it is sent next).
    pub server_cert: Option<SentCert>,
}

/// The server certificate a handshake got, and the name the client asked for.
#[derive(Debug)]
pub(crate) struct SentCert {
    /// The client's SNI; clients connecting by IP address send none.
    pub sni: Option<String>,
    /// The names the server certificate holds.
    pub names: Arc<[String]>,
}

/// Hands out the server certificate and notes the name the client asked for, so a client
/// that then gives up on the certificate can be told which name it used.
#[derive(Debug)]
struct NotingResolver {
    key: Arc<CertifiedKey>,
    names: Arc<[String]>,
}

impl ResolvesServerCert for NotingResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sent = SentCert {
            sni: hello.server_name().map(str::to_owned),
            names: self.names.clone(),
        };
        note(|n| n.server_cert = Some(sent));
        Some(self.key.clone())
    }
}

/// A client that ends the handshake with an alert after the server certificate was sent and
/// before showing its own did not accept the server certificate — almost always because it
/// connects by a name the certificate does not hold. `None` for any other failure.
pub(crate) fn server_cert_refused(
    e: &rustls::Error,
    identity: Option<&CertIdentity>,
    sent: Option<&SentCert>,
) -> Option<(RefusalReason, String)> {
    let rustls::Error::AlertReceived(alert) = e else {
        return None;
    };
    let sent = sent.filter(|_| identity.is_none())?;
    let names = sent.names.join(", ");
    let alert = spoken(&format!("{alert:?}"));
    let detail = match &sent.sni {
        Some(sni) if !sent.names.iter().any(|n| n.eq_ignore_ascii_case(sni)) => format!(
            "the client connects as \"{sni}\", a name the server certificate does not hold \
             (it holds {names}); add the name to mqtt.hostnames or set the device's broker to \
             one of those (the client ended the handshake: {alert})"
        ),
        Some(sni) => format!(
            "the client connects as \"{sni}\" and did not accept the server certificate \
             (it ended the handshake: {alert}); check that it trusts this gateway's CA (ca.pem)"
        ),
        None => format!(
            "the client sent no server name (it connects by IP address) and did not accept the \
             server certificate (it ended the handshake: {alert}); the certificate holds {names}"
        ),
    };
    Some((RefusalReason::ServerNameMismatch, detail))
}

/// `BadCertificate` → "bad certificate": an alert's name as words.
fn spoken(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push(' ');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

tokio::task_local! {
    pub(crate) static NOTE: RefCell<HandshakeNote>;
}

fn note(f: impl FnOnce(&mut HandshakeNote)) {
    // Outside a connection task (no note) there is nobody to tell.
    let _ = NOTE.try_with(|n| f(&mut n.borrow_mut()));
}

/// Revoked certificate serial numbers (lower-case hex), shared with whoever loads them; the
/// value says whether the certificate was superseded by a newer one (rotation) rather than
/// revoked outright.
pub type RevokedSet = Arc<ArcSwap<HashMap<String, bool>>>;

#[derive(Debug)]
struct DeviceVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revoked: RevokedSet,
    /// Our CA certificate, to tell our certificates that fail verification (expired, not
    /// yet valid) from anyone else's.
    ca: CertificateDer<'static>,
}

impl DeviceVerifier {
    /// Notes that the client failed to prove it holds the key of the certificate it showed:
    /// whoever it is, it is not the device that certificate names.
    fn note_signature(
        &self,
        result: Result<HandshakeSignatureValid, rustls::Error>,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if let Err(e) = &result {
            note(|n| {
                let claimed = n.identity.as_mut().and_then(|id| id.common_name.take());
                let serial = n.identity.as_ref().map(|id| id.serial_number.as_str());
                n.refusal = Some((
                    RefusalReason::InvalidCertificate,
                    format!(
                        "the client did not prove it holds the key of certificate {} ({e}){}",
                        serial.unwrap_or("?"),
                        unverified(claimed.as_deref())
                    ),
                ));
            });
        }
        result
    }
}

/// The CN a certificate we cannot stand behind claims, for the refusal detail.
fn unverified(claimed: Option<&str>) -> String {
    match claimed {
        Some(cn) => format!("; it claims CN {cn:?} (unverified, not attributed to that device)"),
        None => String::new(),
    }
}

impl ClientCertVerifier for DeviceVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let identity = tms_certs::identity(end_entity).ok();
        let mut superseded = false;
        let result = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
            .and_then(|ok| {
                match identity
                    .as_ref()
                    .and_then(|id| self.revoked.load().get(&id.serial_number).copied())
                {
                    Some(by_rotation) => {
                        superseded = by_rotation;
                        Err(rustls::Error::InvalidCertificate(CertificateError::Revoked))
                    }
                    None => Ok(ok),
                }
            });
        let mut identity = identity;
        note(|n| {
            if let Err(e) = &result {
                n.refusal = Some(if superseded {
                    (
                        RefusalReason::Superseded,
                        "a newer certificate of this device has been used (or its overlap ended); install the new one".into(),
                    )
                } else {
                    let (reason, mut detail) = classify(e, identity.as_ref());
                    // Only a failure of *our* certificate (expired, revoked, …) says something
                    // about the device it names; the extra signature check runs on this path
                    // alone, so accepted handshakes cost nothing more.
                    if !tms_certs::issued_by(end_entity, &self.ca) {
                        let claimed = identity.as_mut().and_then(|id| id.common_name.take());
                        detail.push_str(&unverified(claimed.as_deref()));
                    }
                    (reason, detail)
                });
            }
            n.identity = identity;
        });
        result
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.note_signature(self.inner.verify_tls12_signature(message, cert, dss))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.note_signature(self.inner.verify_tls13_signature(message, cert, dss))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn secs_between(a: UnixTime, b: UnixTime) -> i64 {
    a.as_secs() as i64 - b.as_secs() as i64
}

/// Turns a rustls failure into a reason a person can act on, with detail.
pub(crate) fn classify(e: &rustls::Error, id: Option<&CertIdentity>) -> (RefusalReason, String) {
    use CertificateError as C;
    match e {
        rustls::Error::NoCertificatesPresented => (
            RefusalReason::NoClientCertificate,
            "the client presented no certificate; set the device key and certificate".into(),
        ),
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer | C::BadSignature => (
                RefusalReason::UnknownCa,
                match id {
                    Some(id) => format!("issued by {:?}, not by this gateway's CA", id.issuer),
                    None => "not issued by this gateway's CA".into(),
                },
            ),
            C::Expired => (RefusalReason::Expired, "the certificate has expired".into()),
            C::ExpiredContext { time, not_after } => (
                RefusalReason::Expired,
                format!(
                    "the certificate expired {} s ago",
                    secs_between(*time, *not_after)
                ),
            ),
            C::NotValidYet => (
                RefusalReason::NotYetValid,
                "the certificate is not valid yet".into(),
            ),
            C::NotValidYetContext { time, not_before } => (
                RefusalReason::NotYetValid,
                format!(
                    "the certificate becomes valid in {} s; if it was just issued, the device clock is off",
                    secs_between(*not_before, *time)
                ),
            ),
            C::Revoked => (RefusalReason::Revoked, "the certificate was revoked".into()),
            other => (RefusalReason::InvalidCertificate, certificate_words(other)),
        },
        rustls::Error::AlertReceived(alert) => (RefusalReason::TlsError, alert_words(*alert)),
        rustls::Error::PeerMisbehaved(how) => (
            RefusalReason::TlsError,
            format!(
                "the client broke the TLS handshake's rules ({}); check its TLS settings and the broker name it uses",
                spoken(&format!("{how:?}"))
            ),
        ),
        rustls::Error::PeerIncompatible(how) => (
            RefusalReason::TlsError,
            format!(
                "the client's TLS cannot work with the gateway's ({}); it needs TLS 1.2 or 1.3",
                spoken(&format!("{how:?}"))
            ),
        ),
        other => (RefusalReason::TlsError, other.to_string()),
    }
}

/// A certificate failure without a reason of its own, as a sentence (rustls and webpki
/// print these with `Debug`, which a person cannot act on).
fn certificate_words(e: &CertificateError) -> String {
    use CertificateError as C;
    match e {
        C::BadEncoding => "the certificate is not valid DER".into(),
        C::UnhandledCriticalExtension => {
            "the certificate has a critical extension the gateway does not know".into()
        }
        C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
            "the certificate is not for TLS client authentication".into()
        }
        C::NotValidForName | C::NotValidForNameContext { .. } => {
            "the certificate is not valid for this name".into()
        }
        C::Other(other) => match other.0.downcast_ref::<webpki::Error>() {
            Some(e) => webpki_words(e),
            None => format!("the certificate was refused: {}", other.0),
        },
        _ => "the certificate cannot be verified".into(),
    }
}

fn webpki_words(e: &webpki::Error) -> String {
    use webpki::Error as W;
    match e {
        W::CaUsedAsEndEntity => {
            "the client presented a CA certificate (for example ca.pem) instead of its device \
             certificate; load <SERIAL>.pem as the device certificate"
                .into()
        }
        W::EndEntityUsedAsCa => "a device certificate was used to issue another one".into(),
        W::BadDer | W::BadDerTime | W::TrailingData(_) => "the certificate is not valid DER".into(),
        W::UnsupportedCertVersion => "the certificate is not an X.509 v3 certificate".into(),
        W::InvalidSignatureForPublicKey | W::SignatureAlgorithmMismatch => {
            "the certificate's signature does not verify".into()
        }
        W::UnsupportedSignatureAlgorithmContext(_)
        | W::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => {
            "the certificate is signed with an algorithm the gateway does not accept".into()
        }
        W::RequiredEkuNotFoundContext(_) | W::EmptyEkuExtension => {
            "the certificate is not for TLS client authentication".into()
        }
        W::PathLenConstraintViolated
        | W::MaximumPathDepthExceeded
        | W::MaximumPathBuildCallsExceeded
        | W::MaximumSignatureChecksExceeded => {
            "the certificate chain is too long or not one this gateway issued".into()
        }
        W::InvalidCertValidity => "the certificate's validity period is invalid".into(),
        W::MalformedExtensions | W::ExtensionValueInvalid => {
            "the certificate has a malformed extension".into()
        }
        _ => "the certificate cannot be verified".into(),
    }
}

/// The TLS alert a client aborted the handshake with, and what usually causes it.
fn alert_words(alert: rustls::AlertDescription) -> String {
    use rustls::AlertDescription as A;
    let why = match alert {
        A::UnknownCA => {
            "it does not trust the gateway's CA: load ca.pem (or the .pem file) on the device"
        }
        A::BadCertificate | A::CertificateUnknown | A::InternalError => {
            "it rejected the gateway's server certificate: often the host name it connects to \
             is not in mqtt.hostnames, or it trusts another CA"
        }
        A::CertificateExpired => {
            "it finds the gateway's server certificate expired (check its clock)"
        }
        A::HandshakeFailure | A::ProtocolVersion | A::InsufficientSecurity => {
            "it shares no TLS version or cipher suite with the gateway (TLS 1.2 or 1.3 is required)"
        }
        A::DecryptError => "the handshake could not be verified",
        _ => "the handshake failed on the client's side",
    };
    format!("the client aborted the TLS handshake: {why}")
}

/// Builds the listener's TLS configuration: TLS 1.2 and 1.3, client certificate required and
/// issued by `ca`, not revoked.
pub fn server_config(
    ca: &CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    revoked: RevokedSet,
) -> Result<Arc<ServerConfig>, BrokerError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let names: Arc<[String]> = chain
        .first()
        .map(|c| tms_certs::certificate_names_der(c))
        .unwrap_or_default()
        .into();
    let key = CertifiedKey::from_der(chain, key, &provider).map_err(BrokerError::Tls)?;
    let resolver = Arc::new(NotingResolver {
        key: Arc::new(key),
        names,
    });
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).map_err(BrokerError::Tls)?;
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| BrokerError::Verifier(e.to_string()))?;
    let verifier = Arc::new(DeviceVerifier {
        inner,
        revoked,
        ca: ca.clone(),
    });
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(BrokerError::Tls)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A person reads the detail on the device page: sentences, never `Debug` names.
    #[test]
    fn refusal_details_are_sentences() {
        let ca_as_device = rustls::Error::InvalidCertificate(CertificateError::Other(
            rustls::OtherError(Arc::new(webpki::Error::CaUsedAsEndEntity)),
        ));
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::InternalError);
        let bad_der = rustls::Error::InvalidCertificate(CertificateError::BadEncoding);
        for e in [ca_as_device, alert, bad_der] {
            let (_, detail) = classify(&e, None);
            for debug in [
                "Other(",
                "OtherError",
                "CaUsedAsEndEntity",
                "InternalError",
                "BadEncoding",
            ] {
                assert!(!detail.contains(debug), "{detail}");
            }
            assert!(detail.starts_with("the "), "{detail}");
        }
        let (reason, detail) = classify(
            &rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                Arc::new(webpki::Error::CaUsedAsEndEntity),
            ))),
            None,
        );
        assert_eq!(reason, RefusalReason::InvalidCertificate);
        assert!(detail.contains("CA certificate"), "{detail}");
    }
}
