//! Handshake admission: at most a fixed number of TLS handshakes in progress at once,
//! granted oldest first, and none started while ingest is behind on connects.
//!
//! Without it, every socket accepted in a reconnect storm starts its handshake at once:
//! thousands of runnable handshake tasks share the cores, so each of them finishes late —
//! many past the client's own connect time-out, which makes their work wasted — and the
//! sessions that already have their CONNACK, and ingest, wait behind them in the run queue.
//! With a bounded number of slots the handshakes that started first finish first, and the
//! rest wait parked, costing no CPU.
//!
//! A connection asks once its client has sent something (an idle TCP connection holds
//! nothing). It first passes the presence gate ([`PresenceGate`]): while the connects ingest
//! has not committed, plus the handshakes under way, fill it, new handshakes wait (one at a
//! time looks at the gate, the others queue behind it in order), so the status page lags
//! the CONNACKs by a fraction of a second instead of by the whole storm. Then it takes a
//! slot; slots are granted in the order asked (tokio's `Semaphore` is fair). A connection
//! that has waited [`ADMISSION_WAIT_MAX`] is closed without any TLS work (shed: its client
//! backs off and dials again, rather than time out waiting), as is one whose deadline
//! (counted from accept) passes, or whose client gave up, while it waits. A slot is held
//! while the handshake works, given back whenever it waits for the client and taken again
//! before it goes on ([`Slot::hold`]): a client that stalls mid-handshake cannot keep honest
//! devices waiting, nor does it count at the gate.
//!
//! Not here: the handshake itself and the refusals it records (`session`).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use tms_model::PresenceGate;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// How long a connection waits for the gate and a slot before it is shed. A client's own
/// connect time-out is a few seconds (rumqttc's default is 5 s, and the handshake still
/// needs its round trips after the wait): closing it sooner lets it back off and come back
/// when there is room, instead of timing out on work that would be wasted.
pub const ADMISSION_WAIT_MAX: Duration = Duration::from_secs(2);

/// How often the connection at the head of the gate looks again when no commit woke it:
/// handshakes that end make room too, and they do not notify.
const GATE_RECHECK: Duration = Duration::from_millis(5);

/// Handshake slots per core when not given: the server's half of a handshake is CPU work,
/// but each one also waits on its client, so a core can keep two in flight.
const SLOTS_PER_CORE: usize = 2;

/// How many handshakes may be in progress at once on this machine.
pub fn default_handshake_slots() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()) * SLOTS_PER_CORE
}

/// The gate, the slots and the queues for them.
pub(crate) struct Admission {
    slots: Arc<Semaphore>,
    /// Connections that passed the gate and wait for a slot, or hold one: the handshakes
    /// under way that the gate counts.
    busy: Arc<AtomicUsize>,
    presence: Arc<PresenceGate>,
    /// The turn to look at the gate while it is closed, oldest first.
    gate_turn: Mutex<()>,
    /// Connections waiting at the gate.
    at_gate: AtomicUsize,
    /// [`ADMISSION_WAIT_MAX`], shorter in tests.
    wait_max: Duration,
}

/// What became of a connection that asked for a slot.
pub(crate) enum Admitted {
    /// Go on with the handshake; hold the slot while it runs ([`Slot::hold`]).
    Granted(Slot),
    /// The client closed (or reset) the connection before it sent anything.
    ClosedEarly,
    /// The handshake deadline passed before the client sent anything.
    Silent,
    /// The handshake deadline passed while the connection waited for a slot.
    Late,
    /// Waited [`ADMISSION_WAIT_MAX`] for the gate or a slot: closed so that the client
    /// comes back later.
    Shed,
    /// The client gave up (closed the connection) while it waited for a slot.
    GaveUp,
}

/// One handshake slot, held by a connection.
pub(crate) struct Slot {
    slots: Arc<Semaphore>,
    busy: Arc<AtomicUsize>,
    held: Option<Held>,
}

/// A slot while it is held: the permit and the counts of handshakes under way.
struct Held {
    _permit: OwnedSemaphorePermit,
    _in_progress: GaugeGuard,
    _busy: Busy,
}

impl Held {
    fn new(permit: OwnedSemaphorePermit, busy: &Arc<AtomicUsize>) -> Self {
        Held {
            _permit: permit,
            _in_progress: GaugeGuard::enter("tms_broker_handshakes_in_progress"),
            _busy: Busy::enter(busy),
        }
    }
}

/// Adds one to the handshakes under way for as long as it lives.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn enter(busy: &Arc<AtomicUsize>) -> Self {
        busy.fetch_add(1, Ordering::AcqRel);
        Busy(busy.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    pub(crate) fn new(slots: usize, presence: Arc<PresenceGate>) -> Self {
        let slots = slots.max(1);
        metrics::gauge!("tms_broker_handshake_slots").set(slots as f64);
        Admission {
            slots: Arc::new(Semaphore::new(slots)),
            busy: Arc::new(AtomicUsize::new(0)),
            presence,
            gate_turn: Mutex::new(()),
            at_gate: AtomicUsize::new(0),
            wait_max: ADMISSION_WAIT_MAX,
        }
    }

    /// Waits until the gate has room for one more handshake, behind those that came first.
    async fn pass_gate(&self) {
        if self.at_gate.load(Ordering::Acquire) == 0
            && self.presence.has_room(self.busy.load(Ordering::Acquire))
        {
            return;
        }
        metrics::counter!("tms_broker_presence_gate_waits_total").increment(1);
        let _waiting = GaugeGuard::enter("tms_broker_handshakes_at_presence_gate");
        self.at_gate.fetch_add(1, Ordering::AcqRel);
        let _left = Defer(|| {
            self.at_gate.fetch_sub(1, Ordering::AcqRel);
        });
        let _turn = self.gate_turn.lock().await;
        loop {
            let changed = self.presence.changed();
            if self.presence.has_room(self.busy.load(Ordering::Acquire)) {
                return;
            }
            let _ = tokio::time::timeout(GATE_RECHECK, changed).await;
        }
    }

    /// Waits for the client's first bytes, then for a slot, both before `deadline`.
    /// Cancel-safe: dropping the future leaves the queue.
    pub(crate) async fn admit(&self, tcp: &TcpStream, deadline: Instant) -> Admitted {
        // Peeked, not read: the bytes stay for the handshake. (Readiness alone would do
        // but may report a socket readable that is not.)
        let mut first = [0u8; 1];
        match tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await {
            Err(_elapsed) => return Admitted::Silent,
            // Closed or reset before a byte: nothing to shake hands with.
            Ok(Ok(0) | Err(_)) => return Admitted::ClosedEarly,
            Ok(Ok(_)) => {}
        }
        let asked = Instant::now();
        let shed_at = asked + self.wait_max;
        // Which of the two ends the wait: the handshake's deadline or the shedding.
        let ran_out = || {
            if deadline <= shed_at {
                Admitted::Late
            } else {
                metrics::counter!("tms_broker_handshakes_shed_total").increment(1);
                Admitted::Shed
            }
        };
        let wait_until = deadline.min(shed_at);
        if tokio::time::timeout_at(wait_until, self.pass_gate())
            .await
            .is_err()
        {
            return ran_out();
        }
        // Counted from the gate on: the next connection at the gate sees this one.
        let queued = Busy::enter(&self.busy);
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                metrics::counter!("tms_broker_handshakes_queued_total").increment(1);
                let waiting = GaugeGuard::enter("tms_broker_handshakes_waiting");
                let acquired =
                    tokio::time::timeout_at(wait_until, self.slots.clone().acquire_owned()).await;
                drop(waiting);
                match acquired {
                    Ok(Ok(permit)) => permit,
                    // The semaphore is never closed; treat it as the deadline to be safe.
                    Err(_) | Ok(Err(_)) => return ran_out(),
                }
            }
        };
        let held = Held::new(permit, &self.busy);
        drop(queued);
        metrics::histogram!("tms_broker_handshake_admission_wait_seconds")
            .record(asked.elapsed().as_secs_f64());
        // Not consumed yet, so the socket is still readable and this returns at once; its
        // readiness says whether the client closed the connection while it waited (its own
        // connect time-out).
        match tokio::time::timeout_at(deadline, tcp.ready(Interest::READABLE)).await {
            Err(_elapsed) => Admitted::Late,
            Ok(Ok(ready)) if !ready.is_read_closed() => Admitted::Granted(Slot {
                slots: self.slots.clone(),
                busy: self.busy.clone(),
                held: Some(held),
            }),
            Ok(_) => Admitted::GaveUp,
        }
    }
}

impl Slot {
    /// Runs `handshake`, holding a slot whenever it runs. A slot stands for a core: the
    /// handshake uses the CPU only when the client's bytes are there (the server's flight
    /// right after the ClientHello, then the check of the client's certificate), and between
    /// the two it waits a round trip for the client. At each wait the slot is given back, and
    /// taken again (in turn, behind the others) before the handshake goes on: a client that
    /// stalls mid-handshake, on purpose or on a slow link, holds no slot while it stalls, and
    /// no more than the slots' number of handshakes compete for the cores at once.
    pub(crate) async fn hold<F: Future>(mut self, handshake: F) -> F::Output {
        let mut handshake = std::pin::pin!(handshake);
        let mut taking = None;
        let mut waited = false;
        std::future::poll_fn(|cx| {
            if self.held.is_none() {
                let take =
                    taking.get_or_insert_with(|| Box::pin(self.slots.clone().acquire_owned()));
                match take.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(permit) => {
                        taking = None;
                        // Closed only if the broker is gone: go on without a slot.
                        self.held = permit.ok().map(|p| Held::new(p, &self.busy));
                    }
                }
            }
            let polled = handshake.as_mut().poll(cx);
            if polled.is_pending() {
                self.held = None;
                if !waited {
                    waited = true;
                    metrics::counter!("tms_broker_handshake_slots_released_early_total")
                        .increment(1);
                }
            }
            polled
        })
        .await
    }
}

/// Runs a closure when dropped.
struct Defer<F: FnMut()>(F);

impl<F: FnMut()> Drop for Defer<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// Adds one to a gauge for as long as it lives.
struct GaugeGuard(&'static str);

impl GaugeGuard {
    fn enter(name: &'static str) -> Self {
        metrics::gauge!(name).increment(1.0);
        GaugeGuard(name)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        metrics::gauge!(self.0).decrement(1.0);
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// A connected pair: the client's end and the server's.
    async fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, server) = tokio::join!(client, listener.accept());
        (client.unwrap(), server.unwrap().0)
    }

    /// A pair whose server end has seen the client's first bytes.
    async fn hello(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let (mut client, server) = pair(listener).await;
        client.write_all(b"\x16\x03\x01").await.unwrap();
        server.readable().await.unwrap();
        (client, server)
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(30)
    }

    #[tokio::test]
    async fn slots_go_to_the_oldest_waiter_and_a_client_that_gave_up_gets_no_handshake() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admission = Admission::new(1, Arc::new(PresenceGate::default()));
        let (_c1, s1) = hello(&listener).await;
        let (_c2, s2) = hello(&listener).await;
        let (c3, s3) = hello(&listener).await;
        let Admitted::Granted(first) = admission.admit(&s1, far()).await else {
            panic!("a free slot is granted at once");
        };
        // Two wait, the second asked first; the third's client gives up while it waits.
        let mut second = std::pin::pin!(admission.admit(&s2, far()));
        let mut third = std::pin::pin!(admission.admit(&s3, far()));
        tokio::select! {
            biased;
            _ = &mut second => panic!("no slot is free"),
            _ = &mut third => panic!("no slot is free"),
            _ = tokio::task::yield_now() => {}
        }
        drop(c3);
        while !s3.ready(Interest::READABLE).await.unwrap().is_read_closed() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        drop(first);
        assert!(matches!(second.await, Admitted::Granted(_)), "oldest first");
        assert!(matches!(third.await, Admitted::GaveUp));
        assert_eq!(admission.slots.available_permits(), 1, "every slot back");
    }

    #[tokio::test]
    async fn a_deadline_passed_in_the_queue_or_before_any_bytes_refuses_without_a_slot() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admission = Admission::new(1, Arc::new(PresenceGate::default()));
        let (_c1, s1) = hello(&listener).await;
        let (_c2, s2) = hello(&listener).await;
        let (_quiet, s3) = pair(&listener).await;
        let Admitted::Granted(_held) = admission.admit(&s1, far()).await else {
            panic!("a free slot is granted at once");
        };
        let soon = Instant::now() + Duration::from_millis(50);
        assert!(matches!(admission.admit(&s2, soon).await, Admitted::Late));
        assert!(matches!(admission.admit(&s3, soon).await, Admitted::Silent));
    }

    #[tokio::test]
    async fn no_handshake_starts_while_ingest_is_behind_on_connects_and_a_long_wait_is_shed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gate = Arc::new(PresenceGate::new(2));
        let mut admission = Admission::new(4, gate.clone());
        // Two connects handed to ingest and not committed: the gate of 2 is full.
        gate.handed_over();
        gate.handed_over();
        let (_c1, s1) = hello(&listener).await;
        let (_c2, s2) = hello(&listener).await;
        let held = {
            let mut first = std::pin::pin!(admission.admit(&s1, far()));
            tokio::select! {
                biased;
                _ = &mut first => panic!("a handshake started while the gate was full"),
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            assert_eq!(
                admission.slots.available_permits(),
                4,
                "no slot taken at the gate"
            );
            // Ingest commits one connect: room for one handshake, and it is counted at once.
            gate.committed(1);
            let Admitted::Granted(held) = first.await else {
                panic!("the commit made room");
            };
            held
        };
        // The handshake under way fills the gate again, so the next connection waits, and
        // past its longest wait it is shed without a slot.
        admission.wait_max = Duration::from_millis(100);
        assert!(matches!(admission.admit(&s2, far()).await, Admitted::Shed));
        drop(held);
        assert_eq!(admission.slots.available_permits(), 4, "every slot back");
        assert_eq!(admission.busy.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn a_client_that_closes_before_sending_anything_takes_no_slot() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admission = Admission::new(1, Arc::new(PresenceGate::default()));
        let (c1, s1) = pair(&listener).await;
        drop(c1);
        assert!(matches!(
            admission.admit(&s1, far()).await,
            Admitted::ClosedEarly
        ));
        assert_eq!(admission.slots.available_permits(), 1);
    }
}
