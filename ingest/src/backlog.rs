//! Presence first: the events ingest has taken off the broker's queue but not yet batched,
//! from which connects are batched ahead of everything else.
//!
//! In a reconnect storm every device publishes as soon as it is connected, so the queue is
//! thousands of messages deep and a connect waited behind all of them — several commits of
//! hundreds of rows — before the device was shown online. Taking connects first makes that
//! wait one small commit. Only connects move: a disconnect keeps its place after the
//! session's last messages (and its will), and a connect only ever moves ahead of events,
//! so it is still written before any message of its own session. A connect that passes an
//! older session's disconnect is harmless: the store applies a disconnect only to the session
//! it names.
//!
//! Not here: receiving (`Ingest::run`) or what an event becomes in the store (`batcher`).

use std::collections::VecDeque;

use tms_model::BrokerEvent;

/// Events waiting to be batched, in arrival order.
#[derive(Default)]
pub(crate) struct Backlog {
    events: VecDeque<BrokerEvent>,
    /// How many of `events` are connects.
    connects: usize,
}

impl Backlog {
    pub(crate) fn push(&mut self, event: BrokerEvent) {
        if matches!(event, BrokerEvent::Connected { .. }) {
            self.connects += 1;
        }
        self.events.push_back(event);
    }

    pub(crate) fn len(&self) -> usize {
        self.events.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The next events to batch, at most `max`: the waiting connects (oldest first) when
    /// there are any, on their own so their commit is small; else the oldest events.
    pub(crate) fn next(&mut self, max: usize) -> Vec<BrokerEvent> {
        let max = max.max(1);
        if self.connects == 0 {
            let n = max.min(self.events.len());
            return self.events.drain(..n).collect();
        }
        let mut taken = Vec::with_capacity(max.min(self.connects));
        let mut rest = VecDeque::with_capacity(self.events.len());
        for event in self.events.drain(..) {
            if taken.len() < max && matches!(event, BrokerEvent::Connected { .. }) {
                taken.push(event);
            } else {
                rest.push_back(event);
            }
        }
        self.connects -= taken.len();
        self.events = rest;
        taken
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use tms_model::{DeviceMessage, DeviceSerial, DisconnectReason, TopicKind};

    fn serial(n: u32) -> DeviceSerial {
        DeviceSerial::parse(&format!("RE4G{n:06}")).unwrap_or_else(|e| panic!("{e}"))
    }

    fn connected(n: u32) -> BrokerEvent {
        BrokerEvent::Connected {
            serial: serial(n),
            session_id: Arc::from(format!("s-{n}")),
            peer: "127.0.0.1:1".parse().unwrap_or_else(|e| panic!("{e}")),
            cert_serial: String::new(),
            keep_alive_secs: 30,
            at_ms: i64::from(n),
        }
    }

    fn message(n: u32) -> BrokerEvent {
        BrokerEvent::Message(DeviceMessage {
            serial: serial(n),
            session_id: Arc::from(format!("s-{n}")),
            kind: TopicKind::Telemetry,
            topic: format!("tms/{}/telemetry", serial(n)).into(),
            payload: "{}".into(),
            received_at_ms: i64::from(n),
            ack: None,
        })
    }

    fn disconnected(n: u32) -> BrokerEvent {
        BrokerEvent::Disconnected {
            serial: serial(n),
            session_id: Arc::from(format!("s-{n}")),
            reason: DisconnectReason::ClientDisconnect,
            at_ms: i64::from(n),
        }
    }

    /// Which event, as (kind, device number).
    fn names(events: &[BrokerEvent]) -> Vec<(&'static str, String)> {
        events
            .iter()
            .map(|e| match e {
                BrokerEvent::Connected { serial, .. } => ("connected", serial.to_string()),
                BrokerEvent::Disconnected { serial, .. } => ("disconnected", serial.to_string()),
                BrokerEvent::Message(m) => ("message", m.serial.to_string()),
                BrokerEvent::Refused { .. } => ("refused", String::new()),
            })
            .collect()
    }

    #[test]
    fn connects_queued_behind_messages_are_batched_first_and_the_rest_keep_their_order() {
        let mut backlog = Backlog::default();
        for n in 1..=3 {
            backlog.push(message(n));
        }
        backlog.push(disconnected(1));
        backlog.push(connected(4));
        backlog.push(message(4));
        backlog.push(connected(5));
        assert_eq!(backlog.len(), 7);

        assert_eq!(
            names(&backlog.next(1)),
            names(&[connected(4)]),
            "the oldest connect first, within the limit"
        );
        assert_eq!(names(&backlog.next(10)), names(&[connected(5)]));
        assert_eq!(
            names(&backlog.next(3)),
            names(&[message(1), message(2), message(3)]),
            "then the rest in arrival order"
        );
        assert_eq!(
            names(&backlog.next(10)),
            names(&[disconnected(1), message(4)]),
            "a disconnect never moves ahead of messages"
        );
        assert!(backlog.is_empty());
        assert!(backlog.next(10).is_empty());
    }
}
