//! One device connection, from TCP accept to disconnect.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rumqttd::Notification;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{ConnAck, ConnectReturnCode, Packet};
use tms_model::DeviceSerial;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::admission::Admitted;
use crate::codec::{Codec, next_connect};
use crate::io::write_out;
use crate::pump::Session;
use crate::tls::{self, HandshakeNote, NOTE, classify};
use crate::{
    Broker, BrokerEvent, DeviceMessage, DisconnectReason, LinkRequest, RefusalReason,
    SessionControl, acl,
};

/// Keep-alive 0 ("never time out") would let a dead device look online forever.
const KEEPALIVE_WHEN_ZERO: u16 = 300;
const KEEPALIVE_MAX: u16 = 3600;

pub(crate) type Stream = TlsStream<TcpStream>;

/// Runs one connection to its end. Never panics the accept loop; every outcome is an event.
pub(crate) async fn run(
    broker: Arc<Broker>,
    tcp: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    // Counted from accept: time spent waiting for a handshake slot is part of it.
    let deadline = tokio::time::Instant::now() + broker.settings().handshake_timeout;
    let admitted = tokio::select! {
        a = Box::pin(broker.admission.admit(&tcp, deadline)) => a,
        _ = shutdown.cancelled() => return,
    };
    let slot = match admitted {
        Admitted::Granted(slot) => slot,
        Admitted::ClosedEarly => {
            let detail = "connection closed before the TLS handshake".to_owned();
            return broker.emit_refusal(None, peer, RefusalReason::TlsError, detail);
        }
        Admitted::Silent => {
            let timeout = broker.settings().handshake_timeout;
            let detail = format!("no TLS handshake within {timeout:?}");
            return broker.emit_refusal(None, peer, RefusalReason::HandshakeTimeout, detail);
        }
        Admitted::Late => {
            let timeout = broker.settings().handshake_timeout;
            let detail = format!("waited {timeout:?} for a handshake slot (connect storm)");
            return broker.emit_refusal(None, peer, RefusalReason::HandshakeTimeout, detail);
        }
        Admitted::Shed => {
            let detail = format!(
                "closed after waiting {:?} for the presence gate or a handshake slot (connect storm); the client may dial again",
                crate::admission::ADMISSION_WAIT_MAX
            );
            return broker.emit_refusal(None, peer, RefusalReason::HandshakeTimeout, detail);
        }
        Admitted::GaveUp => {
            let detail = "the client gave up while waiting for a handshake slot".to_owned();
            return broker.emit_refusal(None, peer, RefusalReason::HandshakeTimeout, detail);
        }
    };
    let started = Instant::now();
    let acceptor = TlsAcceptor::from(broker.tls.load_full());

    let handshake = NOTE.scope(RefCell::new(HandshakeNote::default()), async {
        let result = tokio::select! {
            r = tokio::time::timeout_at(deadline, slot.hold(acceptor.accept(tcp))) => Some(r),
            _ = shutdown.cancelled() => None,
        };
        (result, NOTE.with(|n| n.take()))
    });
    // Admission, the handshake, the CONNECT read, the connect event, the packet pump and the
    // ending are boxed: inline, their states took room in every session's task for as long
    // as it lives (a task was 13.6 KB, the largest share of an idle device's memory in
    // heaptrack). And the phases before the pump are blocks: a local moved out of stays in
    // the task for as long as its scope lasts, and these scopes end before the session's long
    // wait (the handshake's result holds a whole TLS stream, CONNECT's packet all its
    // properties). The task is 3.6 KB now and the pump 3.6 KB (`tests` hold both).
    let (mut stream, identity, cn) = {
        let (result, note) = Box::pin(handshake).await;
        let cn = note.identity.as_ref().and_then(|id| id.common_name.clone());
        let stream = match result {
            None => return,
            Some(Err(_elapsed)) => {
                let detail = format!(
                    "no TLS handshake within {:?}",
                    broker.settings().handshake_timeout
                );
                return broker.emit_refusal(cn, peer, RefusalReason::HandshakeTimeout, detail);
            }
            Some(Ok(Err(io))) => {
                let (reason, detail) = note.refusal.unwrap_or_else(|| {
                    match io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
                        Some(e) => tls::server_cert_refused(
                            e,
                            note.identity.as_ref(),
                            note.server_cert.as_ref(),
                        )
                        .unwrap_or_else(|| classify(e, note.identity.as_ref())),
                        None => (RefusalReason::TlsError, io.to_string()),
                    }
                });
                return broker.emit_refusal(cn, peer, reason, detail);
            }
            Some(Ok(Ok(stream))) => stream,
        };
        metrics::histogram!("tms_broker_handshake_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        let Some(identity) = note.identity else {
            return broker.emit_refusal(
                cn,
                peer,
                RefusalReason::InvalidCertificate,
                "unreadable client certificate".into(),
            );
        };
        (stream, identity, cn)
    };

    // CONNECT, under the same deadline as the handshake.
    let max = broker.settings().max_packet_bytes;
    let mut rbuf = BytesMut::with_capacity(1024);
    let (codec, connect, will, receive_max_zero) = {
        let connect = tokio::select! {
            r = tokio::time::timeout_at(deadline, Box::pin(read_connect(&mut stream, &mut rbuf, max))) => r,
            _ = shutdown.cancelled() => return,
        };
        let (codec, packet) = match connect {
            Err(_) => {
                let detail = "no CONNECT packet after the TLS handshake".to_owned();
                return broker.emit_refusal(cn, peer, RefusalReason::HandshakeTimeout, detail);
            }
            Ok(Err(detail)) => {
                return broker.emit_refusal(cn, peer, RefusalReason::ProtocolError, detail);
            }
            Ok(Ok(pair)) => pair,
        };
        let Packet::Connect(connect, props, will, _, _) = packet else {
            return broker.emit_refusal(
                cn,
                peer,
                RefusalReason::ProtocolError,
                "first packet is not CONNECT".into(),
            );
        };
        // MQTT 5 §3.1.2.11.3: a Receive Maximum of 0 is a protocol error.
        let receive_max_zero = props.as_ref().and_then(|p| p.receive_maximum) == Some(0);
        (codec, connect, will, receive_max_zero)
    };

    let mut wbuf = BytesMut::with_capacity(1024);
    let refusal = match cn.as_deref().map(DeviceSerial::parse) {
        _ if receive_max_zero => Err((
            RefusalReason::ProtocolError,
            "CONNECT with Receive Maximum 0".to_owned(),
        )),
        None => Err((
            RefusalReason::InvalidIdentity,
            "the certificate has no subject CN".to_owned(),
        )),
        Some(Err(e)) => Err((RefusalReason::InvalidIdentity, e.to_string())),
        Some(Ok(serial)) if !connect.client_id.eq_ignore_ascii_case(serial.as_str()) => Err((
            RefusalReason::ClientIdMismatch,
            format!(
                "client id {:?} differs from the certificate CN {:?}",
                connect.client_id,
                serial.as_str()
            ),
        )),
        Some(Ok(serial)) => match &will {
            Some(w) if acl::publish_kind(&serial, &w.topic).is_none() => Err((
                RefusalReason::AclDenied,
                format!(
                    "will topic {:?} is outside tms/{serial}/",
                    String::from_utf8_lossy(&w.topic)
                ),
            )),
            _ => Ok(serial),
        },
    };
    let serial = match refusal {
        Ok(serial) => serial,
        Err((reason, detail)) => {
            let ack = ConnAck {
                session_present: false,
                // rumqttd's 3.1.1 codec can write only the 3.1.1 return codes.
                code: match reason {
                    RefusalReason::ProtocolError if codec.is_v5() => {
                        ConnectReturnCode::ProtocolError
                    }
                    _ => ConnectReturnCode::NotAuthorized,
                },
            };
            if codec.write(Packet::ConnAck(ack, None), &mut wbuf).is_ok() {
                let _ = write_out(&mut stream, &mut wbuf).await;
            }
            let _ = stream.shutdown().await;
            return broker.emit_refusal(cn, peer, reason, detail);
        }
    };

    let session_id = broker.new_session_id();
    let control = Arc::new(SessionControl {
        session_id: session_id.clone(),
        cert_serial: identity.serial_number.clone(),
        cert_not_after: identity.not_after.unix_timestamp(),
        close: CancellationToken::new(),
        reason: Mutex::new(None),
        downlink: Default::default(),
        subscriptions: Mutex::new(Default::default()),
    });
    // Registering first closes an older session of the same device as taken over.
    broker.register(&serial, control.clone());

    // A device's publishes go to ingest, never through the router: the router is needed only
    // for its subscriptions (tms/<serial>/cmd/#) and a persistent session. So a clean-session
    // device gets its router link (rumqttd pre-allocates ~225 KB of queues per link) only when
    // it first subscribes; the CONNACK is ours. A persistent session asks the router at once,
    // which answers whether the session was present.
    // In a block, for the same reason as above: the CONNACK packets.
    let (link, keep_alive) = {
        let (link, connack) = if connect.clean_session {
            let ack = ConnAck {
                session_present: false,
                code: ConnectReturnCode::Success,
            };
            (None, Some(Packet::ConnAck(ack, None)))
        } else {
            match open_link(&broker, &serial, false).await {
                Some((tx, rx, connack)) => (Some((tx, rx)), Option::<Packet>::from(connack)),
                None => {
                    broker.deregister(&serial, &session_id);
                    return;
                }
            }
        };
        // A resumed persistent session still holds the command filters it subscribed to.
        let session_present =
            matches!(&connack, Some(Packet::ConnAck(ack, _)) if ack.session_present);
        if let Ok(mut subs) = control.subscriptions.lock() {
            *subs = broker.resumed_subscriptions(&serial, session_present);
        }
        let keep_alive = match connect.keep_alive {
            0 => KEEPALIVE_WHEN_ZERO,
            k => k.min(KEEPALIVE_MAX),
        };
        let connack = connack.map(|p| match p {
            // MQTT 5 lets the server say which keep-alive it enforces: tell a client whose
            // keep-alive was clamped, so it pings often enough.
            Packet::ConnAck(ack, props) if codec.is_v5() && keep_alive != connect.keep_alive => {
                let mut props = props.unwrap_or_default();
                props.server_keep_alive = Some(keep_alive);
                Packet::ConnAck(ack, Some(props))
            }
            other => other,
        });
        if let Some(p) = connack
            && codec.write(p, &mut wbuf).is_ok()
            && write_out(&mut stream, &mut wbuf).await.is_err()
        {
            broker.deregister(&serial, &session_id);
            return;
        }
        (link, keep_alive)
    };

    let idle_limit = broker
        .settings()
        .offline_after
        .unwrap_or_else(|| Duration::from_millis(u64::from(keep_alive) * 1500));
    metrics::counter!("tms_broker_connects_accepted_total").increment(1);
    metrics::gauge!("tms_broker_connections").increment(1.0);
    let ending = Ending(Some(EndingParts {
        broker: broker.clone(),
        serial: serial.clone(),
        session_id: session_id.clone(),
        peer,
        // Copied out of the read buffer: the parsed will's topic and message point into the
        // 1 KiB that CONNECT was read into, and held it for the whole session (heaptrack).
        will: will.map(|w| rumqttd::protocol::LastWill {
            topic: Bytes::copy_from_slice(&w.topic),
            message: Bytes::copy_from_slice(&w.message),
            ..w
        }),
    }));
    tracing::info!(device.serial = %serial, peer.addr = %peer, session.id = %session_id, mqtt.v5 = codec.is_v5(), "device connected");
    let presence = &broker.settings().presence;
    presence.handed_over();
    metrics::gauge!("tms_presence_connects_uncommitted").set(presence.uncommitted() as f64);
    Box::pin(broker.emit(BrokerEvent::Connected {
        serial: serial.clone(),
        session_id: session_id.clone(),
        peer,
        cert_serial: identity.serial_number.clone(),
        keep_alive_secs: keep_alive,
        at_ms: broker.now_ms(),
    }))
    .await;

    let mut session = Session::new(
        &broker,
        &serial,
        &session_id,
        peer,
        codec,
        max,
        rbuf,
        wbuf,
        &control.downlink,
    );
    if !control.subscriptions.lock().is_ok_and(|s| s.is_empty()) {
        broker.wake_commands();
    }
    let reason = Box::pin(session.pump(
        &mut stream,
        link,
        connect.clean_session,
        idle_limit,
        &control,
        &shutdown,
    ))
    .await;

    let reason = control
        .reason
        .lock()
        .ok()
        .and_then(|r| *r)
        .unwrap_or(reason);
    // Commands handed to this session and not acknowledged go back to the queue.
    drop(session);
    if !connect.clean_session
        && let Ok(subs) = control.subscriptions.lock()
    {
        broker.retain_subscriptions(&serial, subs.clone());
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
    Box::pin(ending.finish(reason)).await;
}

/// Ends a session that reported `Connected`, exactly once: normally through
/// [`Ending::finish`]; if the session task panics (or is dropped) on the way, its `Drop`
/// still sends the will, frees the device's place and reports the disconnect, so a device
/// is never left "online" by a session that no longer exists.
struct Ending(Option<EndingParts>);

struct EndingParts {
    broker: Arc<Broker>,
    serial: DeviceSerial,
    session_id: Arc<str>,
    peer: SocketAddr,
    will: Option<rumqttd::protocol::LastWill>,
}

impl Ending {
    async fn finish(mut self, reason: DisconnectReason) {
        if let Some(parts) = self.0.take() {
            parts.finish(reason).await;
        }
    }
}

impl Drop for Ending {
    fn drop(&mut self) {
        let Some(parts) = self.0.take() else { return };
        tracing::error!(device.serial = %parts.serial, session.id = %parts.session_id, panicking = std::thread::panicking(), "session task ended abnormally; closing the session");
        metrics::counter!("tms_broker_session_panics_total").increment(1);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(parts.finish(DisconnectReason::ProtocolError));
        }
    }
}

impl EndingParts {
    async fn finish(self, reason: DisconnectReason) {
        let EndingParts {
            broker,
            serial,
            session_id,
            peer,
            will,
        } = self;
        if reason != DisconnectReason::ClientDisconnect
            && let Some(w) = will
            && let Some(kind) = acl::publish_kind(&serial, &w.topic)
        {
            // The will: the device's own last word about itself, stored like any message.
            broker
                .emit(BrokerEvent::Message(DeviceMessage {
                    serial: serial.clone(),
                    session_id: session_id.clone(),
                    kind,
                    topic: w.topic,
                    payload: w.message,
                    received_at_ms: broker.now_ms(),
                    ack: None,
                }))
                .await;
        }
        broker.deregister(&serial, &session_id);
        metrics::gauge!("tms_broker_connections").decrement(1.0);
        metrics::counter!("tms_broker_disconnects_total", "reason" => reason.as_str()).increment(1);
        tracing::info!(device.serial = %serial, peer.addr = %peer, reason = reason.as_str(), "device disconnected");
        broker
            .emit(BrokerEvent::Disconnected {
                serial,
                session_id,
                reason,
                at_ms: broker.now_ms(),
            })
            .await;
    }
}

/// Builds the device's router link; `None` (logged) when the router refuses it.
pub(crate) async fn open_link(
    broker: &Arc<Broker>,
    serial: &DeviceSerial,
    clean_session: bool,
) -> Option<(LinkTx, LinkRx, Notification)> {
    let request = LinkRequest {
        client_id: serial.to_string(),
        clean_session,
    };
    let link_broker = broker.clone();
    // `LinkBuilder::build` blocks until the router thread answers.
    match tokio::task::spawn_blocking(move || link_broker.link(request)).await {
        Ok(Ok(link)) => Some(link),
        Ok(Err(e)) => {
            tracing::error!(device.serial = %serial, error = %e, "router refused the link");
            None
        }
        Err(e) => {
            tracing::error!(device.serial = %serial, error = %e, "router link task failed");
            None
        }
    }
}

async fn read_connect(
    stream: &mut Stream,
    rbuf: &mut BytesMut,
    max: usize,
) -> Result<(Codec, Packet), String> {
    loop {
        if let Some(connect) = next_connect(rbuf, max)? {
            return Ok(connect);
        }
        match stream.read_buf(rbuf).await {
            Ok(0) => return Err("connection closed before CONNECT".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("reading CONNECT: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    /// The size of what `f` returns (here: the future an async fn makes).
    fn returned_size<F, A, B, C, D, R>(_: F) -> usize
    where
        F: FnOnce(A, B, C, D) -> R,
    {
        std::mem::size_of::<R>()
    }

    /// Every idle device holds one session task for as long as it is connected, and the task
    /// is as large as the largest state of `run`'s future: 6,608 bytes before the handshake's
    /// result, CONNECT's packet and the CONNACKs were scoped to blocks (heaptrack put the task
    /// at a third of an idle device's memory), 3,576 after.
    fn returned_size7<F, A, B, C, D, E, G, H, R>(_: F) -> usize
    where
        F: FnOnce(A, B, C, D, E, G, H) -> R,
    {
        std::mem::size_of::<R>()
    }

    /// The packet pump's future lives as long as the session too (boxed, beside the task):
    /// 3,800 bytes while a read's handling and the router link's rare waits were inline,
    /// 3,568 since.
    #[test]
    fn a_packet_pump_stays_small() {
        let size = returned_size7(crate::pump::Session::pump);
        assert!(size <= 3_700, "Session::pump's future is {size} bytes");
    }

    #[test]
    fn a_session_task_stays_small() {
        let size = returned_size(super::run);
        assert!(
            size <= 4096,
            "session::run's future is {size} bytes: a local kept across the session's wait?"
        );
    }
}
