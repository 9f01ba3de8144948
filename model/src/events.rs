//! What the broker tells ingest: connection events and device messages, and the reasons a
//! connection was refused or ended. The broker produces them and ingest consumes them; the two
//! crates meet only here, so ingest builds without the MQTT router or TLS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use crate::DeviceSerial;

/// What a device-published message is, from its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicKind {
    Telemetry,
    Location,
    Info,
    Status,
    /// A device's answer to a command (`tms/<serial>/reply`, CONTRACT §9).
    Reply,
}

impl TopicKind {
    /// Every kind, in discriminant order (`kind as usize` indexes this).
    pub const ALL: [TopicKind; 5] = [
        TopicKind::Telemetry,
        TopicKind::Location,
        TopicKind::Info,
        TopicKind::Status,
        TopicKind::Reply,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TopicKind::Telemetry => "telemetry",
            TopicKind::Location => "location",
            TopicKind::Info => "info",
            TopicKind::Status => "status",
            TopicKind::Reply => "reply",
        }
    }
}

/// Why a connection attempt was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    NoClientCertificate,
    UnknownCa,
    Expired,
    NotYetValid,
    Revoked,
    InvalidCertificate,
    InvalidIdentity,
    ClientIdMismatch,
    AclDenied,
    ProtocolError,
    HandshakeTimeout,
    TlsError,
    ConnectionLimit,
    Superseded,
    /// The client gave up on the server certificate (an alert before it sent its own):
    /// usually it connects by a name the certificate does not hold.
    ServerNameMismatch,
}

impl RefusalReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoClientCertificate => "no_client_certificate",
            Self::UnknownCa => "unknown_ca",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Revoked => "revoked",
            Self::InvalidCertificate => "invalid_certificate",
            Self::InvalidIdentity => "invalid_identity",
            Self::ClientIdMismatch => "client_id_mismatch",
            Self::AclDenied => "acl_denied",
            Self::ProtocolError => "protocol_error",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::TlsError => "tls_error",
            Self::ConnectionLimit => "connection_limit",
            Self::Superseded => "superseded",
            Self::ServerNameMismatch => "server_name_mismatch",
        }
    }
}

/// Why an established session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DisconnectReason {
    ClientDisconnect,
    ConnectionLost,
    KeepaliveTimeout,
    TakenOver,
    Revoked,
    ServerShutdown,
    ProtocolError,
    IngestClosed,
    CertificateExpired,
    /// The device sent malformed payloads faster than ingest keeps them.
    Abuse,
    /// Other nodes declared this node dead (its heartbeat stopped reaching the database) and
    /// ended its sessions; the device is sent away to connect again and be recorded anew.
    NodeLost,
}

impl DisconnectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientDisconnect => "client_disconnect",
            Self::ConnectionLost => "connection_lost",
            Self::KeepaliveTimeout => "keepalive_timeout",
            Self::TakenOver => "taken_over",
            Self::Revoked => "revoked",
            Self::ServerShutdown => "server_shutdown",
            Self::ProtocolError => "protocol_error",
            Self::IngestClosed => "ingest_closed",
            Self::CertificateExpired => "certificate_expired",
            Self::Abuse => "abuse",
            Self::NodeLost => "node_lost",
        }
    }
}

/// What the broker reports to ingest, in the order it happened per connection.
#[derive(Debug, Clone)]
pub enum BrokerEvent {
    Connected {
        serial: DeviceSerial,
        session_id: Arc<str>,
        peer: SocketAddr,
        cert_serial: String,
        keep_alive_secs: u16,
        at_ms: i64,
    },
    Disconnected {
        serial: DeviceSerial,
        session_id: Arc<str>,
        reason: DisconnectReason,
        at_ms: i64,
    },
    /// A refused handshake, CONNECT or packet. `common_name` is the CN of the certificate
    /// the client presented, when it presented one.
    Refused {
        common_name: Option<String>,
        peer: SocketAddr,
        reason: RefusalReason,
        detail: String,
        at_ms: i64,
    },
    Message(DeviceMessage),
}

/// A message a device published to one of its own topics.
#[derive(Debug, Clone)]
pub struct DeviceMessage {
    pub serial: DeviceSerial,
    pub session_id: Arc<str>,
    pub kind: TopicKind,
    pub topic: Bytes,
    pub payload: Bytes,
    pub received_at_ms: i64,
    /// Where to report the message durable, when the device waits for that (QoS 1 and 2).
    pub ack: Option<Arc<Acks>>,
}

/// How ingest tells a session that its messages are stored, so that their PUBACKs may go.
///
/// Ingest commits a session's messages in the order the session queued them, so a count is
/// enough: the session acknowledges that many of its waiting messages, oldest first. One
/// atomic add and one wake-up per session per committed batch, however many messages.
#[derive(Debug, Default)]
pub struct Acks {
    durable: AtomicU64,
    /// Notified on every [`Acks::release`]; the session waits on it, then reads
    /// [`Acks::durable`]. A spurious wake-up only makes it read the same count again.
    pub wake: tokio::sync::Notify,
}

impl Acks {
    /// `n` more of this session's acknowledged-on-commit messages are durable.
    pub fn release(&self, n: u64) {
        self.durable.fetch_add(n, Ordering::Release);
        self.wake.notify_one();
    }

    /// How many of this session's acknowledged-on-commit messages are durable so far.
    pub fn durable(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }
}
