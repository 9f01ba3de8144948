//! One device connection, from TCP accept to disconnect.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttd::Notification;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{
    ConnAck, ConnectReturnCode, Disconnect, DisconnectReasonCode, Packet, PingResp, PubAck,
    PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, SubAck, SubscribeReasonCode,
};
use tms_model::{DeviceSerial, now_ms};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::codec::{Codec, next_connect, next_packet};
use crate::tls::{self, HandshakeNote, NOTE, classify};
use crate::{
    Acks, Broker, BrokerEvent, DeviceMessage, DisconnectReason, LinkRequest, RefusalReason,
    SessionControl, TopicKind, acl,
};

/// Keep-alive 0 ("never time out") would let a dead device look online forever.
const KEEPALIVE_WHEN_ZERO: u16 = 300;
const KEEPALIVE_MAX: u16 = 3600;

type Stream = TlsStream<TcpStream>;

/// Runs one connection to its end. Never panics the accept loop; every outcome is an event.
pub(crate) async fn run(
    broker: Arc<Broker>,
    tcp: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + broker.settings().handshake_timeout;
    let acceptor = TlsAcceptor::from(broker.tls.load_full());

    let handshake = NOTE.scope(RefCell::new(HandshakeNote::default()), async {
        let result = tokio::select! {
            r = tokio::time::timeout_at(deadline, acceptor.accept(tcp)) => Some(r),
            _ = shutdown.cancelled() => None,
        };
        (result, NOTE.with(|n| n.take()))
    });
    let (result, note) = handshake.await;
    let cn = note.identity.as_ref().and_then(|id| id.common_name.clone());
    let mut stream = match result {
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

    // CONNECT, under the same deadline as the handshake.
    let max = broker.settings().max_packet_bytes;
    let mut rbuf = BytesMut::with_capacity(1024);
    let connect = tokio::select! {
        r = tokio::time::timeout_at(deadline, read_connect(&mut stream, &mut rbuf, max)) => r,
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
    let Packet::Connect(connect, props, will, _will_props, _login) = packet else {
        return broker.emit_refusal(
            cn,
            peer,
            RefusalReason::ProtocolError,
            "first packet is not CONNECT".into(),
        );
    };

    let mut wbuf = BytesMut::with_capacity(1024);
    // MQTT 5 §3.1.2.11.3: a Receive Maximum of 0 is a protocol error.
    let receive_max_zero = props.as_ref().and_then(|p| p.receive_maximum) == Some(0);
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
    });
    // Registering first closes an older session of the same device as taken over.
    broker.register(&serial, control.clone());

    // A device's publishes go to ingest, never through the router: the router is needed only
    // for its subscriptions (tms/<serial>/cmd/#) and a persistent session. So a clean-session
    // device gets its router link (rumqttd pre-allocates ~225 KB of queues per link) only when
    // it first subscribes; the CONNACK is ours. A persistent session asks the router at once,
    // which answers whether the session was present.
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
        will,
    }));
    tracing::info!(device.serial = %serial, peer.addr = %peer, session.id = %session_id, mqtt.v5 = codec.is_v5(), "device connected");
    broker
        .emit(BrokerEvent::Connected {
            serial: serial.clone(),
            session_id: session_id.clone(),
            peer,
            cert_serial: identity.serial_number.clone(),
            keep_alive_secs: keep_alive,
            at_ms: now_ms(),
        })
        .await;

    let mut session = Session {
        broker: &broker,
        serial: &serial,
        session_id: &session_id,
        peer,
        codec,
        max,
        rbuf,
        wbuf,
        qos2_pending: HashSet::new(),
        acks: Arc::new(Acks::default()),
        released: 0,
        owed: VecDeque::new(),
        partial_subscribes: HashMap::new(),
        received: TopicKind::ALL
            .map(|k| metrics::counter!("tms_broker_messages_received_total", "kind" => k.as_str())),
    };
    let reason = session
        .pump(
            &mut stream,
            link,
            connect.clean_session,
            idle_limit,
            &control,
            &shutdown,
        )
        .await;

    let reason = control
        .reason
        .lock()
        .ok()
        .and_then(|r| *r)
        .unwrap_or(reason);
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
    ending.finish(reason).await;
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
                    received_at_ms: now_ms(),
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
                at_ms: now_ms(),
            })
            .await;
    }
}

/// Builds the device's router link; `None` (logged) when the router refuses it.
async fn open_link(
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

async fn write_out(stream: &mut Stream, wbuf: &mut BytesMut) -> std::io::Result<()> {
    if wbuf.is_empty() {
        return Ok(());
    }
    stream.write_all(wbuf).await?;
    wbuf.clear();
    stream.flush().await
}

/// Polls `f` once: its value if ready now, else `None` (and `f` is dropped).
async fn ready_now<F: Future>(f: F) -> Option<F::Output> {
    let mut f = pin!(f);
    std::future::poll_fn(|cx| match f.as_mut().poll(cx) {
        Poll::Ready(v) => Poll::Ready(Some(v)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

struct Session<'a> {
    broker: &'a Arc<Broker>,
    serial: &'a DeviceSerial,
    session_id: &'a Arc<str>,
    peer: SocketAddr,
    codec: Codec,
    max: usize,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// QoS 2 packet ids received (PUBREC sent or owed) and not yet released.
    qos2_pending: HashSet<u16>,
    /// Ingest's count of this session's messages that are durable.
    acks: Arc<Acks>,
    /// How many of those have been acknowledged to the device.
    released: u64,
    /// PUBACK/PUBREC owed to the device, in the order its PUBLISHes arrived (MQTT 3.1.1
    /// §4.6): one waiting for its message to be stored holds back those after it.
    owed: VecDeque<Owed>,
    /// SUBSCRIBEs sent to the router without their denied filters: packet id -> positions
    /// of the denied filters, filled in as failures when the router's SUBACK comes back.
    partial_subscribes: HashMap<u16, Vec<usize>>,
    /// `tms_broker_messages_received_total` per kind (`TopicKind as usize`), looked up once
    /// per session rather than per message.
    received: [metrics::Counter; 4],
}

enum Step {
    Continue,
    End(DisconnectReason),
}

/// One acknowledgement owed to the device.
struct Owed {
    qos: u8,
    pkid: u16,
    reason: PubAckReason,
    /// Waits until ingest has committed the message.
    durable: bool,
}

impl Session<'_> {
    /// Moves packets between the device and ingest/router until the session ends; returns why.
    async fn pump(
        &mut self,
        stream: &mut Stream,
        mut link: Option<(LinkTx, LinkRx)>,
        clean_session: bool,
        idle_limit: Duration,
        control: &SessionControl,
        shutdown: &CancellationToken,
    ) -> DisconnectReason {
        let mut to_router: Vec<Packet> = Vec::new();
        let acks = self.acks.clone();
        let reason = loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break DisconnectReason::ServerShutdown,
                _ = control.close.cancelled() => break DisconnectReason::Revoked,
                // Ingest committed messages of this session: their PUBACKs may go out.
                _ = acks.wake.notified() => {
                    self.release_acks();
                    if write_out(stream, &mut self.wbuf).await.is_err() {
                        break DisconnectReason::ConnectionLost;
                    }
                }
                read = tokio::time::timeout(idle_limit, stream.read_buf(&mut self.rbuf)) => {
                    match read {
                        Err(_) => break DisconnectReason::KeepaliveTimeout,
                        Ok(Ok(0)) | Ok(Err(_)) => break DisconnectReason::ConnectionLost,
                        Ok(Ok(n)) => metrics::counter!("tms_broker_bytes_received_total").increment(n as u64),
                    }
                    let step = self.read_packets(&mut to_router).await;
                    self.release_acks();
                    if write_out(stream, &mut self.wbuf).await.is_err() {
                        break DisconnectReason::ConnectionLost;
                    }
                    if !to_router.is_empty() && link.is_none() {
                        match open_link(self.broker, self.serial, clean_session).await {
                            // The router's CONNACK is not sent: the device has ours.
                            Some((tx, rx, _connack)) => link = Some((tx, rx)),
                            None => return DisconnectReason::ProtocolError,
                        }
                    }
                    if let Some((link_tx, _)) = link.as_mut()
                        && !to_router.is_empty()
                    {
                        let last = to_router.pop();
                        link_tx.buffer().extend(to_router.drain(..));
                        if let Some(last) = last
                            && link_tx.send(last).await.is_err()
                        {
                            return DisconnectReason::ProtocolError;
                        }
                    }
                    if let Step::End(reason) = step {
                        break reason;
                    }
                }
                notification = async {
                    match link.as_mut() {
                        Some((_, rx)) => rx.next().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let Some((_, link_rx)) = link.as_mut() else { continue };
                    match notification {
                        Ok(Some(n)) => {
                            let mut next = Some(n);
                            // Everything the router has ready goes out in one TLS write.
                            while let Some(n) = next.take() {
                                match n {
                                    Notification::Unschedule => {
                                        let _ = link_rx.wake().await;
                                    }
                                    Notification::Disconnect(..) => {
                                        return DisconnectReason::ProtocolError;
                                    }
                                    n => {
                                        if let Some(p) = Option::<Packet>::from(n) {
                                            let p = self.with_denied_filters(p);
                                            let _ = self.codec.write(p, &mut self.wbuf);
                                        }
                                    }
                                }
                                next = ready_now(link_rx.next()).await.and_then(Result::ok).flatten();
                            }
                            if write_out(stream, &mut self.wbuf).await.is_err() {
                                break DisconnectReason::ConnectionLost;
                            }
                        }
                        Ok(None) => {}
                        // The router dropped the link: a newer session of this device took it.
                        Err(_) => return DisconnectReason::TakenOver,
                    }
                }
            }
        };
        if reason != DisconnectReason::ClientDisconnect
            && let Some((link_tx, _)) = link.as_mut()
        {
            // Tell the router the link is gone so it frees it (and keeps a persistent session).
            let d = Disconnect {
                reason_code: DisconnectReasonCode::NormalDisconnection,
            };
            let _ = link_tx.send(Packet::Disconnect(d, None)).await;
        }
        reason
    }

    /// Decodes every complete packet in the read buffer and acts on it.
    async fn read_packets(&mut self, to_router: &mut Vec<Packet>) -> Step {
        loop {
            let (packet, header) = match next_packet(self.codec, &mut self.rbuf, self.max) {
                Ok(Some(p)) => p,
                Ok(None) => return Step::Continue,
                Err(detail) => {
                    self.refuse_in_session(RefusalReason::ProtocolError, detail);
                    return Step::End(DisconnectReason::ProtocolError);
                }
            };
            match packet {
                Packet::Publish(publish, _) => {
                    let (qos, pkid) = header.unwrap_or((0, 0));
                    match acl::publish_kind(self.serial, &publish.topic) {
                        Some(kind) => {
                            // A QoS 2 redelivery of a message not yet released was already queued.
                            let fresh = qos != 2 || self.qos2_pending.insert(pkid);
                            if fresh {
                                self.received[kind as usize].increment(1);
                                let message = DeviceMessage {
                                    serial: self.serial.clone(),
                                    session_id: self.session_id.clone(),
                                    kind,
                                    topic: publish.topic,
                                    payload: publish.payload,
                                    received_at_ms: now_ms(),
                                    ack: (qos > 0).then(|| self.acks.clone()),
                                };
                                // Waits while ingest is full, and the PUBACK waits until ingest
                                // has committed the message: a slow or failing store slows
                                // publishers down and nothing unstored is acknowledged.
                                if !self.broker.emit(BrokerEvent::Message(message)).await {
                                    return Step::End(DisconnectReason::IngestClosed);
                                }
                            }
                            self.owe(qos, pkid, PubAckReason::Success, fresh);
                        }
                        None => {
                            metrics::counter!("tms_broker_acl_denied_total", "action" => "publish")
                                .increment(1);
                            let topic = String::from_utf8_lossy(&publish.topic).into_owned();
                            self.refuse_in_session(
                                RefusalReason::AclDenied,
                                format!(
                                    "publish to {topic:?} denied: outside tms/{}/",
                                    self.serial
                                ),
                            );
                            if qos == 2 {
                                self.qos2_pending.insert(pkid);
                            }
                            // MQTT 3.1.1 has no negative PUBACK: acknowledge and drop, so the
                            // device does not retry the same forbidden message forever.
                            self.owe(qos, pkid, PubAckReason::NotAuthorized, false);
                        }
                    }
                }
                Packet::PubRel(rel, _) => {
                    self.qos2_pending.remove(&rel.pkid);
                    let comp = PubComp {
                        pkid: rel.pkid,
                        reason: PubCompReason::Success,
                    };
                    let _ = self
                        .codec
                        .write(Packet::PubComp(comp, None), &mut self.wbuf);
                }
                Packet::Subscribe(mut subscribe, props) => {
                    let denied: Vec<usize> = subscribe
                        .filters
                        .iter()
                        .enumerate()
                        .filter(|(_, f)| !acl::may_subscribe(self.serial, &f.path))
                        .map(|(i, _)| i)
                        .collect();
                    if let Some(&first) = denied.first() {
                        metrics::counter!("tms_broker_acl_denied_total", "action" => "subscribe")
                            .increment(denied.len() as u64);
                        self.refuse_in_session(
                            RefusalReason::AclDenied,
                            format!(
                                "subscribe to {:?} denied: only tms/{}/cmd/# is allowed",
                                subscribe.filters[first].path, self.serial
                            ),
                        );
                    }
                    if denied.len() == subscribe.filters.len() {
                        let ack = SubAck {
                            pkid: subscribe.pkid,
                            return_codes: vec![
                                SubscribeReasonCode::Failure;
                                subscribe.filters.len()
                            ],
                        };
                        let _ = self.codec.write(Packet::SubAck(ack, None), &mut self.wbuf);
                    } else {
                        // Each filter is answered on its own (MQTT 3.1.1 §3.9.3): the allowed
                        // ones go to the router, the denied ones are failures in its SUBACK.
                        if !denied.is_empty() {
                            for &i in denied.iter().rev() {
                                subscribe.filters.remove(i);
                            }
                            self.partial_subscribes.insert(subscribe.pkid, denied);
                        }
                        to_router.push(Packet::Subscribe(subscribe, props));
                    }
                }
                Packet::PingReq(_) => {
                    let _ = self.codec.write(Packet::PingResp(PingResp), &mut self.wbuf);
                }
                Packet::Disconnect(..) => return Step::End(DisconnectReason::ClientDisconnect),
                p @ (Packet::Unsubscribe(..)
                | Packet::PubAck(..)
                | Packet::PubRec(..)
                | Packet::PubComp(..)) => to_router.push(p),
                other => {
                    let name = match other {
                        Packet::Connect(..) => "a second CONNECT",
                        _ => "a server-only packet",
                    };
                    self.refuse_in_session(
                        RefusalReason::ProtocolError,
                        format!("client sent {name}"),
                    );
                    return Step::End(DisconnectReason::ProtocolError);
                }
            }
        }
    }

    /// Records the PUBACK (QoS 1) or PUBREC (QoS 2) a PUBLISH is owed; QoS 0 owes nothing.
    fn owe(&mut self, qos: u8, pkid: u16, reason: PubAckReason, durable: bool) {
        if qos > 0 {
            self.owed.push_back(Owed {
                qos,
                pkid,
                reason,
                durable,
            });
        }
    }

    /// Writes every owed acknowledgement that may go out now: oldest first, each waiting one
    /// only once ingest has committed its message.
    fn release_acks(&mut self) {
        let durable = self.acks.durable();
        while let Some(front) = self.owed.front() {
            if front.durable {
                if self.released >= durable {
                    break;
                }
                self.released += 1;
            }
            if let Some(owed) = self.owed.pop_front() {
                self.ack_publish(owed.qos, owed.pkid, owed.reason);
            }
        }
    }

    /// Puts the failures for the filters a SUBSCRIBE was sent to the router without into the
    /// router's SUBACK, so each filter has its own answer in its own position.
    fn with_denied_filters(&mut self, packet: Packet) -> Packet {
        match packet {
            Packet::SubAck(mut ack, props) => {
                if let Some(denied) = self.partial_subscribes.remove(&ack.pkid) {
                    for i in denied {
                        let at = i.min(ack.return_codes.len());
                        ack.return_codes.insert(at, SubscribeReasonCode::Failure);
                    }
                }
                Packet::SubAck(ack, props)
            }
            other => other,
        }
    }

    fn ack_publish(&mut self, qos: u8, pkid: u16, reason: PubAckReason) {
        let v5 = self.codec.is_v5();
        let packet = match qos {
            1 => Packet::PubAck(
                PubAck {
                    pkid,
                    reason: if v5 { reason } else { PubAckReason::Success },
                },
                None,
            ),
            2 => Packet::PubRec(
                PubRec {
                    pkid,
                    reason: if v5 && reason == PubAckReason::NotAuthorized {
                        PubRecReason::NotAuthorized
                    } else {
                        PubRecReason::Success
                    },
                },
                None,
            ),
            _ => return,
        };
        let _ = self.codec.write(packet, &mut self.wbuf);
    }

    fn refuse_in_session(&self, reason: RefusalReason, detail: String) {
        self.broker
            .emit_refusal(Some(self.serial.to_string()), self.peer, reason, detail);
    }
}
