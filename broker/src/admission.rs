//! Handshake admission: at most a fixed number of TLS handshakes in progress at once,
//! granted oldest first.
//!
//! Without it, every socket accepted in a reconnect storm starts its handshake at once:
//! thousands of runnable handshake tasks share the cores, so each of them finishes late —
//! many past the client's own connect time-out, which makes their work wasted — and the
//! sessions that already have their CONNACK, and ingest, wait behind them in the run queue.
//! With a bounded number of slots the handshakes that started first finish first, and the
//! rest wait parked, costing no CPU.
//!
//! A connection asks for a slot once its client has sent something (an idle TCP connection
//! holds no slot), slots are granted in the order asked (tokio's `Semaphore` is fair), and
//! a connection whose deadline (counted from accept) passes while it waits, or whose client
//! gave up meanwhile, is closed without any TLS work. A slot is held while the handshake
//! works, given back whenever it waits for the client and taken again before it goes on
//! ([`Slot::hold`]): a client that stalls mid-handshake cannot keep honest devices waiting.
//!
//! Not here: the handshake itself and the refusals it records (`session`).

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Handshake slots per core when not given: the server's half of a handshake is CPU work,
/// but each one also waits on its client, so a core can keep two in flight.
const SLOTS_PER_CORE: usize = 2;

/// How many handshakes may be in progress at once on this machine.
pub fn default_handshake_slots() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()) * SLOTS_PER_CORE
}

/// The slots and the queue for them.
pub(crate) struct Admission {
    slots: Arc<Semaphore>,
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
    /// The client gave up (closed the connection) while it waited for a slot.
    GaveUp,
}

/// One handshake slot, held by a connection.
pub(crate) struct Slot {
    slots: Arc<Semaphore>,
    held: Option<Held>,
}

/// A slot while it is held: the permit and the in-progress count.
struct Held {
    _permit: OwnedSemaphorePermit,
    _in_progress: GaugeGuard,
}

impl Held {
    fn new(permit: OwnedSemaphorePermit) -> Self {
        Held {
            _permit: permit,
            _in_progress: GaugeGuard::enter("tms_broker_handshakes_in_progress"),
        }
    }
}

impl Admission {
    pub(crate) fn new(slots: usize) -> Self {
        let slots = slots.max(1);
        metrics::gauge!("tms_broker_handshake_slots").set(slots as f64);
        Admission {
            slots: Arc::new(Semaphore::new(slots)),
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
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                metrics::counter!("tms_broker_handshakes_queued_total").increment(1);
                let waiting = GaugeGuard::enter("tms_broker_handshakes_waiting");
                let acquired =
                    tokio::time::timeout_at(deadline, self.slots.clone().acquire_owned()).await;
                drop(waiting);
                match acquired {
                    Ok(Ok(permit)) => permit,
                    // The semaphore is never closed; treat it as the deadline to be safe.
                    Err(_) | Ok(Err(_)) => return Admitted::Late,
                }
            }
        };
        metrics::histogram!("tms_broker_handshake_admission_wait_seconds")
            .record(asked.elapsed().as_secs_f64());
        // Not consumed yet, so the socket is still readable and this returns at once; its
        // readiness says whether the client closed the connection while it waited (its own
        // connect time-out).
        match tokio::time::timeout_at(deadline, tcp.ready(Interest::READABLE)).await {
            Err(_elapsed) => Admitted::Late,
            Ok(Ok(ready)) if !ready.is_read_closed() => Admitted::Granted(Slot {
                slots: self.slots.clone(),
                held: Some(Held::new(permit)),
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
                        self.held = permit.ok().map(Held::new);
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
        let admission = Admission::new(1);
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
        let admission = Admission::new(1);
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
    async fn a_client_that_closes_before_sending_anything_takes_no_slot() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admission = Admission::new(1);
        let (c1, s1) = pair(&listener).await;
        drop(c1);
        assert!(matches!(
            admission.admit(&s1, far()).await,
            Admitted::ClosedEarly
        ));
        assert_eq!(admission.slots.available_permits(), 1);
    }
}
