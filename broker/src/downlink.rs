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

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc};

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
    control: Arc<crate::SessionControl>,
}

impl CommandRoute {
    pub(crate) fn new(control: Arc<crate::SessionControl>) -> Self {
        CommandRoute { control }
    }

    /// Hands `command` to the session; gives it back when the session has ended or is full.
    pub fn send(&self, command: OutgoingCommand) -> Result<(), OutgoingCommand> {
        self.control.downlink.push(command)
    }
}

/// A session's commands, handed over and not yet written. Nothing is allocated until a
/// command comes: a tokio channel allocated 801 bytes for every session, used or not
/// (heaptrack of 3,000 idle devices).
#[derive(Debug, Default)]
pub(crate) struct Inbox {
    state: Mutex<InboxState>,
    /// Notified at each command pushed; a notification with no session waiting is kept for
    /// its next wait, so none is missed.
    pub(crate) wake: Notify,
}

#[derive(Debug, Default)]
struct InboxState {
    commands: VecDeque<OutgoingCommand>,
    /// The session has ended: nothing more is taken.
    closed: bool,
}

impl Inbox {
    fn push(&self, command: OutgoingCommand) -> Result<(), OutgoingCommand> {
        let Ok(mut state) = self.state.lock() else {
            return Err(command);
        };
        if state.closed || state.commands.len() >= SESSION_COMMANDS {
            return Err(command);
        }
        state.commands.push_back(command);
        drop(state);
        self.wake.notify_one();
        Ok(())
    }

    /// Whether a command pushed now would be taken.
    pub(crate) fn has_room(&self) -> bool {
        self.state
            .lock()
            .is_ok_and(|s| !s.closed && s.commands.len() < SESSION_COMMANDS)
    }

    /// The commands waiting, oldest first.
    pub(crate) fn take(&self) -> VecDeque<OutgoingCommand> {
        self.state
            .lock()
            .map(|mut s| std::mem::take(&mut s.commands))
            .unwrap_or_default()
    }

    /// Takes nothing more from now on; returns what was waiting.
    pub(crate) fn close(&self) -> VecDeque<OutgoingCommand> {
        match self.state.lock() {
            Ok(mut s) => {
                s.closed = true;
                std::mem::take(&mut s.commands)
            }
            Err(_) => VecDeque::new(),
        }
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

    fn command(id: usize) -> (OutgoingCommand, mpsc::UnboundedReceiver<CommandOutcome>) {
        let (outcome, outcomes) = mpsc::unbounded_channel();
        let command = OutgoingCommand {
            id: id.to_string(),
            name: "self_test".into(),
            payload: Bytes::from_static(b"{}"),
            outcome,
        };
        (command, outcomes)
    }

    #[test]
    fn a_session_holds_a_bounded_number_of_commands_and_none_after_it_ends() {
        let inbox = Inbox::default();
        for id in 0..SESSION_COMMANDS {
            assert!(inbox.push(command(id).0).is_ok(), "command {id} taken");
        }
        assert!(!inbox.has_room());
        let refused = inbox.push(command(99).0).unwrap_err();
        assert_eq!(refused.id, "99", "a full session gives the command back");
        let taken: Vec<String> = inbox.take().into_iter().map(|c| c.id).collect();
        assert_eq!(taken.len(), SESSION_COMMANDS);
        assert_eq!(taken[0], "0", "oldest first");
        assert!(inbox.has_room());
        assert!(inbox.push(command(1).0).is_ok());
        // The session ends: what waits comes back, and nothing more is taken.
        assert_eq!(inbox.close().len(), 1);
        assert!(!inbox.has_room());
        assert!(inbox.push(command(2).0).is_err());
    }

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
