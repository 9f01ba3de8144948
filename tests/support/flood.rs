//! A QoS 1 flood from a real client that records, per packet id, which messages the gateway
//! PUBACKed; and the checks that every one of those is stored.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{Event, Outgoing, Packet, QoS};

use super::{DeviceFiles, TestGateway, device_client};

/// What one publisher sent and which of its messages the gateway acknowledged.
#[derive(Default)]
pub struct Tracker {
    /// Sequence numbers handed to the client, not yet sent (rumqttc sends in order).
    pub queued: VecDeque<u64>,
    pub in_flight: HashMap<u16, u64>,
    pub acked: HashSet<u64>,
}

/// Publishes QoS 1 telemetry `{"seq":N,…}` as fast as the gateway acknowledges, until
/// `stop`, at most `max` messages, `pause` between them. Returns the tracker and the task.
pub fn flood(
    gw: &TestGateway,
    files: &DeviceFiles,
    stop: Arc<AtomicBool>,
    max: u64,
    pause: Duration,
) -> (Arc<Mutex<Tracker>>, tokio::task::JoinHandle<()>) {
    let (client, mut eventloop) = device_client(gw, files);
    let tracker = Arc::new(Mutex::new(Tracker::default()));
    let t = tracker.clone();
    let events = tokio::spawn(async move {
        loop {
            match tokio::time::timeout(Duration::from_secs(60), eventloop.poll()).await {
                Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                    let mut t = t.lock().unwrap();
                    if let Some(seq) = t.queued.pop_front() {
                        t.in_flight.insert(pkid, seq);
                    }
                }
                Ok(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                    let mut t = t.lock().unwrap();
                    if let Some(seq) = t.in_flight.remove(&ack.pkid) {
                        t.acked.insert(seq);
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => break,
            }
        }
    });
    let t = tracker.clone();
    let serial = files.serial.clone();
    let publisher = tokio::spawn(async move {
        for seq in 0..max {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            t.lock().unwrap().queued.push_back(seq);
            let payload = format!(r#"{{"seq":{seq},"mode":"online","load_pct":40}}"#);
            let sent = client
                .publish(
                    format!("tms/{serial}/telemetry"),
                    QoS::AtLeastOnce,
                    false,
                    payload.into_bytes(),
                )
                .await;
            if sent.is_err() {
                break;
            }
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
        // Keep the client (and its connection) until the event loop ends.
        let _ = events.await;
        drop(client);
    });
    (tracker, publisher)
}

pub fn acked(t: &Arc<Mutex<Tracker>>) -> HashSet<u64> {
    t.lock().unwrap().acked.clone()
}

/// The `seq` of every telemetry row of `serial` in the store (either backend).
pub async fn stored_seqs_in(store: &tms_store::Store, serial: &str) -> HashSet<u64> {
    store
        .telemetry(serial, i64::MAX)
        .await
        .unwrap()
        .iter()
        .filter_map(|r| r.payload["seq"].as_u64())
        .collect()
}

pub fn assert_all_stored(acked: &HashSet<u64>, stored: &HashSet<u64>, who: &str) {
    let mut missing: Vec<_> = acked.difference(stored).copied().collect();
    missing.sort_unstable();
    assert!(
        missing.is_empty(),
        "{who}: {} of {} PUBACKed messages are not stored, e.g. {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(10)]
    );
}

/// `/readyz`: its status and body.
pub async fn readyz(gw: &TestGateway) -> (u16, serde_json::Value) {
    let r = reqwest::get(gw.url("/readyz")).await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}
