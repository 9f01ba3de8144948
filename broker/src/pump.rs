//! The packet pump of an admitted session: packets between the device and the router and
//! ingest, PUBACKs released as ingest commits, commands written to the device and their
//! PUBACKs reported, until the session ends. Admission (TLS, CONNECT, identity) is
//! `session.rs`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::Notification;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{
    Disconnect, DisconnectReasonCode, Packet, PingResp, PubAck, PubAckReason, PubComp,
    PubCompReason, PubRec, PubRecReason, QoS, SubAck, SubscribeReasonCode,
};
use tms_model::DeviceSerial;
use tokio_util::sync::CancellationToken;

use crate::codec::{Codec, next_packet};
use crate::downlink::{FIRST_COMMAND_PKID, Inbox, OutgoingCommand};
use crate::{
    Acks, Broker, BrokerEvent, DeviceMessage, DisconnectReason, Handed, RefusalReason,
    SessionControl, TopicKind, acl,
};

use crate::io::{read_some, ready_now, write_out};
use crate::session::{Stream, open_link};

pub(crate) struct Session<'a> {
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
    received: [metrics::Counter; TopicKind::ALL.len()],
    /// Commands handed to this session by the delivery worker.
    downlink: &'a Inbox,
    /// Commands written with QoS 1 and not yet PUBACKed, by packet id.
    inflight: HashMap<u16, OutgoingCommand>,
    /// Commands written with QoS 0: delivered once the write succeeds.
    written: Vec<OutgoingCommand>,
    next_command_pkid: u16,
    /// Command filters sent to the router, by SUBSCRIBE packet id, until its SUBACK.
    awaiting_suback: HashMap<u16, Vec<String>>,
}

enum Step {
    Continue,
    End(DisconnectReason),
    /// Ingest's queue is full: the caller waits to hand `event` over, then owes the device
    /// its acknowledgement and reads on. (Waiting here instead would make the future of
    /// every read part of every session's task: 1 KB of each idle device's memory.)
    Full {
        event: BrokerEvent,
        qos: u8,
        pkid: u16,
    },
}

/// One acknowledgement owed to the device.
struct Owed {
    qos: u8,
    pkid: u16,
    reason: PubAckReason,
    /// Waits until ingest has committed the message.
    durable: bool,
}

impl<'a> Session<'a> {
    /// A session admitted with `codec` (the device's protocol level) and what was read after
    /// its CONNECT in `rbuf`.
    #[expect(
        clippy::too_many_arguments,
        reason = "the parts admission hands over, once"
    )]
    pub(crate) fn new(
        broker: &'a Arc<Broker>,
        serial: &'a DeviceSerial,
        session_id: &'a Arc<str>,
        peer: SocketAddr,
        codec: Codec,
        max: usize,
        rbuf: BytesMut,
        wbuf: BytesMut,
        downlink: &'a Inbox,
    ) -> Self {
        Session {
            broker,
            serial,
            session_id,
            peer,
            codec,
            max,
            // What CONNECT left unread is kept; an empty buffer's memory is not.
            rbuf: if rbuf.is_empty() {
                BytesMut::new()
            } else {
                rbuf
            },
            wbuf,
            qos2_pending: HashSet::new(),
            acks: Arc::new(Acks::default()),
            released: 0,
            owed: VecDeque::new(),
            partial_subscribes: HashMap::new(),
            received: TopicKind::ALL.map(
                |k| metrics::counter!("tms_broker_messages_received_total", "kind" => k.as_str()),
            ),
            downlink,
            inflight: HashMap::new(),
            written: Vec::new(),
            next_command_pkid: FIRST_COMMAND_PKID,
            awaiting_suback: HashMap::new(),
        }
    }

    /// Moves packets between the device and ingest/router until the session ends; returns why.
    pub(crate) async fn pump(
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
                // A command for the device: written now, reported when the device PUBACKs it.
                _ = self.downlink.wake.notified() => {
                    for command in self.downlink.take() {
                        self.write_command(command, control);
                    }
                    if write_out(stream, &mut self.wbuf).await.is_err() {
                        break DisconnectReason::ConnectionLost;
                    }
                    self.written_out();
                }
                // Ingest committed messages of this session: their PUBACKs may go out.
                _ = acks.wake.notified() => {
                    self.release_acks();
                    if write_out(stream, &mut self.wbuf).await.is_err() {
                        break DisconnectReason::ConnectionLost;
                    }
                }
                read = tokio::time::timeout(idle_limit, read_some(stream, &mut self.rbuf)) => {
                    match read {
                        Err(_) => break DisconnectReason::KeepaliveTimeout,
                        Ok(Ok(0)) | Ok(Err(_)) => break DisconnectReason::ConnectionLost,
                        Ok(Ok(n)) => metrics::counter!("tms_broker_bytes_received_total").increment(n as u64),
                    }
                    let mut step = self.read_packets(&mut to_router, control);
                    while let Step::Full { event, qos, pkid } = step {
                        // Boxed: rare, and inline it would take room in every session.
                        if !Box::pin(self.broker.emit(event)).await {
                            step = Step::End(DisconnectReason::IngestClosed);
                            break;
                        }
                        self.owe(qos, pkid, PubAckReason::Success, true);
                        step = self.read_packets(&mut to_router, control);
                    }
                    if self.rbuf.is_empty() {
                        // Nothing partial left: an idle session holds no read buffer.
                        self.rbuf = BytesMut::new();
                    }
                    self.release_acks();
                    if write_out(stream, &mut self.wbuf).await.is_err() {
                        break DisconnectReason::ConnectionLost;
                    }
                    if !to_router.is_empty() && link.is_none() {
                        match Box::pin(open_link(self.broker, self.serial, clean_session)).await {
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
                            && Box::pin(link_tx.send(last)).await.is_err()
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
                            let mut granted = false;
                            // Everything the router has ready goes out in one TLS write.
                            while let Some(n) = next.take() {
                                match n {
                                    Notification::Unschedule => {
                                        let _ = Box::pin(link_rx.wake()).await;
                                    }
                                    Notification::Disconnect(..) => {
                                        return DisconnectReason::ProtocolError;
                                    }
                                    n => {
                                        if let Some(p) = Option::<Packet>::from(n) {
                                            granted |= self.note_granted(&p, control);
                                            let p = self.with_denied_filters(p);
                                            let _ = self.codec.write(p, &mut self.wbuf);
                                        }
                                    }
                                }
                                next = Box::pin(ready_now(link_rx.next())).await.and_then(Result::ok).flatten();
                            }
                            if write_out(stream, &mut self.wbuf).await.is_err() {
                                break DisconnectReason::ConnectionLost;
                            }
                            if granted {
                                // The device has its SUBACK: queued commands may go out.
                                self.broker.wake_commands();
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
            let _ = Box::pin(link_tx.send(Packet::Disconnect(d, None))).await;
        }
        reason
    }

    /// Decodes every complete packet in the read buffer and acts on it.
    fn read_packets(&mut self, to_router: &mut Vec<Packet>, control: &SessionControl) -> Step {
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
                                    received_at_ms: self.broker.now_ms(),
                                    ack: (qos > 0).then(|| self.acks.clone()),
                                };
                                // Waits while ingest is full (`Step::Full`), and the PUBACK
                                // waits until ingest has committed the message: a slow or
                                // failing store slows publishers down and nothing unstored is
                                // acknowledged.
                                match self.broker.try_emit(BrokerEvent::Message(message)) {
                                    Handed::Now => {}
                                    Handed::Full(event) => return Step::Full { event, qos, pkid },
                                    Handed::Closed => {
                                        return Step::End(DisconnectReason::IngestClosed);
                                    }
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
                            return_codes: vec![self.denied_code(); subscribe.filters.len()],
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
                        // Commands go out on these filters once the router has granted them
                        // and the device has its SUBACK.
                        self.awaiting_suback.insert(
                            subscribe.pkid,
                            subscribe.filters.iter().map(|f| f.path.clone()).collect(),
                        );
                        to_router.push(Packet::Subscribe(subscribe, props));
                    }
                }
                Packet::PingReq(_) => {
                    let _ = self.codec.write(Packet::PingResp(PingResp), &mut self.wbuf);
                }
                Packet::Disconnect(..) => return Step::End(DisconnectReason::ClientDisconnect),
                Packet::PubAck(ack, _) if ack.pkid >= FIRST_COMMAND_PKID => {
                    // A command's PUBACK is ours, not the router's; one we did not send (or
                    // a duplicate) is ignored as MQTT asks.
                    if let Some(command) = self.inflight.remove(&ack.pkid) {
                        tracing::info!(device.serial = %self.serial, command.id = %command.id, "command delivered");
                        command.delivered(self.broker.now_ms());
                    }
                }
                Packet::Unsubscribe(unsubscribe, props) => {
                    if let Ok(mut subs) = control.subscriptions.lock() {
                        for f in &unsubscribe.filters {
                            subs.remove(f);
                        }
                    }
                    to_router.push(Packet::Unsubscribe(unsubscribe, props));
                }
                p @ (Packet::PubAck(..) | Packet::PubRec(..) | Packet::PubComp(..)) => {
                    to_router.push(p)
                }
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

    /// Writes `command` to the device if it still holds a filter that matches it; else it
    /// goes back to the queue.
    fn write_command(&mut self, command: OutgoingCommand, control: &SessionControl) {
        let route = control
            .subscriptions
            .lock()
            .ok()
            .and_then(|s| s.route(self.serial.as_str(), &command.name));
        let Some((topic, qos)) = route else {
            return command.returned();
        };
        // A free packet id of the command range; there are at most `SESSION_COMMANDS` in flight.
        let pkid = loop {
            let pkid = self.next_command_pkid;
            self.next_command_pkid = pkid.checked_add(1).unwrap_or(FIRST_COMMAND_PKID);
            if !self.inflight.contains_key(&pkid) {
                break pkid;
            }
        };
        match self.codec.write_publish(
            topic.as_bytes(),
            qos,
            pkid,
            &command.payload,
            &mut self.wbuf,
        ) {
            Ok(()) if qos == 0 => self.written.push(command),
            Ok(()) => {
                self.inflight.insert(pkid, command);
            }
            Err(e) => {
                tracing::warn!(device.serial = %self.serial, command.id = %command.id, error = %e, "command cannot be encoded");
                command.returned();
            }
        }
    }

    /// The write after [`Session::write_command`] succeeded: QoS 0 commands are delivered.
    fn written_out(&mut self) {
        let at = self.broker.now_ms();
        for command in self.written.drain(..) {
            command.delivered(at);
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

    /// Records the command filters the router granted in `packet`, if it is the SUBACK of a
    /// device's SUBSCRIBE; true when there are any.
    fn note_granted(&mut self, packet: &Packet, control: &SessionControl) -> bool {
        let Packet::SubAck(ack, _) = packet else {
            return false;
        };
        let Some(filters) = self.awaiting_suback.remove(&ack.pkid) else {
            return false;
        };
        let Ok(mut subs) = control.subscriptions.lock() else {
            return false;
        };
        let mut granted = false;
        for (path, code) in filters.iter().zip(&ack.return_codes) {
            let qos = match code {
                SubscribeReasonCode::QoS0 | SubscribeReasonCode::Success(QoS::AtMostOnce) => 0,
                SubscribeReasonCode::QoS1 | SubscribeReasonCode::Success(QoS::AtLeastOnce) => 1,
                SubscribeReasonCode::QoS2 | SubscribeReasonCode::Success(QoS::ExactlyOnce) => 2,
                _ => continue,
            };
            subs.add(path, qos);
            granted = true;
        }
        granted
    }

    /// Puts the failures for the filters a SUBSCRIBE was sent to the router without into the
    /// router's SUBACK, so each filter has its own answer in its own position.
    fn with_denied_filters(&mut self, packet: Packet) -> Packet {
        match packet {
            Packet::SubAck(mut ack, props) => {
                if let Some(denied) = self.partial_subscribes.remove(&ack.pkid) {
                    let code = self.denied_code();
                    for i in denied {
                        let at = i.min(ack.return_codes.len());
                        ack.return_codes.insert(at, code);
                    }
                }
                Packet::SubAck(ack, props)
            }
            other => other,
        }
    }

    /// A filter the ACL denies: 0x87 Not authorized in MQTT 5 (3.1.1 has only 0x80 Failure).
    fn denied_code(&self) -> SubscribeReasonCode {
        match self.codec.is_v5() {
            true => SubscribeReasonCode::NotAuthorized,
            false => SubscribeReasonCode::Failure,
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

impl Drop for Session<'_> {
    /// However the session ends, the commands it holds and the device has not acknowledged
    /// are handed back, to go out again in the device's next session.
    fn drop(&mut self) {
        for command in self.downlink.close() {
            command.returned();
        }
        for (_, command) in self.inflight.drain() {
            command.returned();
        }
        for command in self.written.drain(..) {
            command.returned();
        }
    }
}
