//! Commands going down to devices (CONTRACT §9): what the delivery worker hands a live
//! session, and what the session reports back.
//!
//! The session itself writes the PUBLISH (QoS 1, or 0 to a device that subscribed with QoS
//! 0) with a packet id from a range the router never uses, and reports the command
//! delivered when the device's PUBACK for that id comes in. A command that has not been
//! acknowledged when the session ends, for whatever reason, is reported returned, so the
//! worker queues it again: nothing handed to a session is lost. The router is not involved:
//! a publish through it reaches only a subscriber that is there at that instant.
//! Not here: which commands to send (the worker reads them from the store).

use bytes::Bytes;
use tokio::sync::mpsc;

/// Packet ids from here up are commands; rumqttd's router numbers its outgoing publishes
/// 1..=100 (`router/iobufs.rs`, `MAX_INFLIGHT`), so the two never meet.
pub(crate) const FIRST_COMMAND_PKID: u16 = 1000;

/// Commands a session holds at most (handed over, not yet acknowledged by the device).
pub(crate) const SESSION_COMMANDS: usize = 16;

/// One command for a live session.
#[derive(Debug)]
pub struct OutgoingCommand {
    pub id: String,
    /// The `<name>` of `tms/<serial>/cmd/<name>`.
    pub name: String,
    /// `{"id", "name", "args", "issued_at"}` as JSON.
    pub payload: Bytes,
    /// Where the session reports what became of it.
    pub outcome: mpsc::UnboundedSender<CommandOutcome>,
}

impl OutgoingCommand {
    fn report(self, outcome: impl FnOnce(String) -> CommandOutcome) {
        let _ = self.outcome.send(outcome(self.id));
    }

    pub(crate) fn delivered(self, at_ms: i64) {
        self.report(|id| CommandOutcome::Delivered { id, at_ms });
    }

    pub(crate) fn returned(self) {
        self.report(|id| CommandOutcome::Returned { id });
    }
}

/// What became of a command handed to a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandOutcome {
    /// The device acknowledged it (PUBACK; for a QoS 0 subscription: it was written).
    Delivered { id: String, at_ms: i64 },
    /// It did not reach the device: the session ended or dropped the subscription first.
    Returned { id: String },
}

/// A live session able to take a command now: see [`crate::Broker::command_route`].
#[derive(Debug, Clone)]
pub struct CommandRoute {
    sender: mpsc::Sender<Queued>,
}

/// A command in a session's queue. Boxed: a tokio channel allocates its slots 32 at a time
/// when it is made, and every session has one (88-byte commands made that 2.8 KB a session,
/// used or not; heaptrack of 3,000 idle devices).
pub(crate) type Queued = Box<OutgoingCommand>;

impl CommandRoute {
    pub(crate) fn new(sender: mpsc::Sender<Queued>) -> Self {
        CommandRoute { sender }
    }

    /// Hands `command` to the session; gives it back when the session has ended or is full.
    pub fn send(&self, command: OutgoingCommand) -> Result<(), OutgoingCommand> {
        self.sender
            .try_send(Box::new(command))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(c) | mpsc::error::TrySendError::Closed(c) => *c,
            })
    }
}

/// The filters a session holds (path, granted QoS), as the device subscribed them.
#[derive(Debug, Default, Clone)]
pub(crate) struct Subscriptions(Vec<(String, u8)>);

impl Subscriptions {
    pub(crate) fn add(&mut self, path: &str, qos: u8) {
        self.0.retain(|(p, _)| p != path);
        self.0.push((path.to_owned(), qos.min(2)));
    }

    pub(crate) fn remove(&mut self, path: &str) {
        self.0.retain(|(p, _)| p != path);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The topic and QoS (at most 1) a command `name` goes out with to `serial`, if a filter
    /// matches it: the serial level spelled as the matching filter spells it, the highest QoS
    /// of the matching filters (MQTT 3.1.1 §3.3.5).
    pub(crate) fn route(&self, serial: &str, name: &str) -> Option<(String, u8)> {
        let topic = format!("tms/{serial}/cmd/{name}");
        let (filter, qos) = self
            .0
            .iter()
            .filter(|(f, _)| crate::acl::filter_matches(f, &topic))
            .max_by_key(|(_, q)| *q)?;
        let spelled = filter.split('/').nth(1).unwrap_or(serial);
        Some((format!("tms/{spelled}/cmd/{name}"), (*qos).min(1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_goes_out_on_the_highest_qos_of_the_matching_filters() {
        let mut s = Subscriptions::default();
        assert_eq!(s.route("RE4A1", "self_test"), None);
        s.add("tms/RE4A1/cmd/report_now", 1);
        assert_eq!(s.route("RE4A1", "self_test"), None);
        s.add("tms/re4a1/cmd/+", 0);
        assert_eq!(
            s.route("RE4A1", "self_test"),
            Some(("tms/re4a1/cmd/self_test".to_owned(), 0))
        );
        s.add("tms/RE4A1/cmd/#", 2);
        assert_eq!(
            s.route("RE4A1", "self_test"),
            Some(("tms/RE4A1/cmd/self_test".to_owned(), 1))
        );
        s.remove("tms/RE4A1/cmd/#");
        s.remove("tms/re4a1/cmd/+");
        assert_eq!(s.route("RE4A1", "self_test"), None);
        assert!(!s.is_empty());
    }
}
