//! Stopping the gateway through the real binary: SIGTERM exits 0 — within the drain deadline
//! even when the store never answers, with what could not be written counted and none of it
//! acknowledged — and a supervised part that fails is named and makes the gateway exit non-zero.

#![expect(clippy::unwrap_used, reason = "test helpers fail the test loudly")]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rumqttc::{Event, Packet};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// SIGTERM is a clean stop every time: no part that ended because it was told to is reported
/// as a failure (the parts end together, so an unordered wait picked one at random).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_always_exits_zero() {
    let mut gw = TestGateway::start().await;
    for round in 0..8 {
        assert_eq!(gw.stop(), Some(0), "round {round}: {}", gw.log());
        assert!(
            !gw.log().contains("stopped unexpectedly"),
            "round {round}: {}",
            gw.log()
        );
        gw.restart().await;
    }
}

/// A part that fails from an outside cause stops the whole gateway, named in the log, with a
/// non-zero exit (so a service manager restarts it and the operator sees why): here the
/// mailer, whose outbox is a file and so can never receive a mail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_part_is_named_and_the_gateway_exits_non_zero() {
    let spare = tempfile::tempdir().unwrap();
    let outbox = spare.path().join("outbox");
    std::fs::write(&outbox, "a file where the outbox directory should be").unwrap();
    let mut gw =
        TestGateway::start_with(&[("TMS_MAIL_OUTBOX_DIR", outbox.to_str().unwrap())]).await;
    let code = gw
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", gw.log()));
    let log = gw.log();
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("mailer failed"), "the part is named:\n{log}");
    assert!(
        log.contains(&outbox.display().to_string()),
        "and what it could not use:\n{log}"
    );
    // The others were stopped in order, not left behind.
    assert!(log.contains("ingest drained"), "{log}");
    assert!(log.contains("stopped"), "{log}");
    // Fixed from outside, the same data directory serves again.
    std::fs::remove_file(&outbox).unwrap();
    gw.restart().await;
    assert_eq!(gw.stop(), Some(0), "{}", gw.log());
}

/// Forwards TCP connections to `target` until `frozen` is set; from then on every byte is
/// held, so the server behind seems to accept and never answer.
async fn freezable_proxy(target: String, frozen: Arc<AtomicBool>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                continue;
            };
            let (client_rx, client_tx) = client.into_split();
            let (server_rx, server_tx) = server.into_split();
            tokio::spawn(pump(client_rx, server_tx, frozen.clone()));
            tokio::spawn(pump(server_rx, client_tx, frozen.clone()));
        }
    });
    addr
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while frozen.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// SIGTERM while the store has stopped answering (PostgreSQL behind a proxy that holds every
/// byte): the gateway still exits, within the drain deadline and the store's close, instead
/// of waiting on the store for ever; it says how many rows it could not write, and the device
/// got no PUBACK for any of them (so it sends them again). Needs `TMS_TEST_DATABASE_URL`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_store_that_never_answers_exits_within_the_drain_deadline() {
    const SENT: usize = 5;
    let Some(url) = fresh_postgres_url("hang").await else {
        return;
    };
    // postgres://user@HOST:PORT/db?… -> the same through the proxy.
    let at = url.find('@').unwrap() + 1;
    let end = at + url[at..].find('/').unwrap();
    let frozen = Arc::new(AtomicBool::new(false));
    let proxy = freezable_proxy(url[at..end].to_owned(), frozen.clone()).await;
    let proxied = format!("{}{proxy}{}", &url[..at], &url[end..]);
    let mut gw = TestGateway::start_with(&[
        ("TMS_DATABASE_URL", &proxied),
        ("TMS_INGEST_DRAIN_TIMEOUT_SECS", "2"),
    ])
    .await;
    let files = gw.provision("RE4A000777", "00:11:22:33:44:77");
    let (client, mut eventloop) = device_client(&gw, &files);
    assert_eq!(
        connack(&mut eventloop).await.unwrap(),
        rumqttc::ConnectReturnCode::Success
    );
    let pubacks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = pubacks.clone();
    let driver = tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let Event::Incoming(Packet::PubAck(_)) = event {
                counted.fetch_add(1, Ordering::Relaxed);
            }
        }
    });

    // The store goes silent with writes under way: telemetry that can never be committed.
    frozen.store(true, Ordering::Relaxed);
    for _ in 0..SENT {
        publish(&client, &files.serial, "telemetry", TELEMETRY).await;
    }
    // Received by the broker, on its way to ingest (whose commit the store holds up; a scrape
    // answers anyway, within its own bound). The device sends nothing else.
    let key = "tms_broker_messages_received_total{kind=\"telemetry\"}";
    wait_for(
        "the broker to receive the telemetry",
        Duration::from_secs(20),
        || async {
            let now = scrape(&gw).await;
            (now.get(key).copied().unwrap_or(0.0) >= SENT as f64).then_some(())
        },
    )
    .await;
    // A store that accepts bytes and never answers is told within seconds, not at the
    // commit's 30 s time-out: the metric, and `/readyz` naming the fault.
    let silent = Instant::now();
    wait_for(
        "the silent store to be told",
        Duration::from_secs(15),
        || async {
            let failing = scrape(&gw).await.get("tms_store_write_failing").copied();
            let r = reqwest::get(gw.url("/readyz")).await.ok()?;
            let code = r.status().as_u16();
            let body: serde_json::Value = r.json().await.ok()?;
            (failing == Some(1.0) && code == 503 && body["store_fault"] == "unreachable")
                .then_some(())
        },
    )
    .await;
    assert!(
        silent.elapsed() < Duration::from_secs(12),
        "told after {:?}",
        silent.elapsed()
    );
    assert!(
        gw.log().contains("the store has not answered a commit"),
        "{}",
        gw.log()
    );
    let started = Instant::now();
    let code = gw
        .stop_within(Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", gw.log()));
    let took = started.elapsed();
    let log = gw.log();
    // 2 s of drain, 1 s of grace, 2 s for the store to close, and the process's own exit.
    assert!(took < Duration::from_secs(8), "took {took:?}:\n{log}");
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("stopped"), "{log}");
    // How many rows were lost is said (at least the telemetry; the session's rows may be
    // among them too), and none of the telemetry was acknowledged.
    let line = log
        .lines()
        .find(|l| l.contains("these rows were not written"))
        .unwrap_or_else(|| panic!("the loss is logged:\n{log}"));
    let rows: usize = line
        .split("rows=")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("with a count: {line}"));
    assert!(rows >= SENT, "{rows} rows counted as lost: {line}");
    assert_eq!(
        pubacks.load(Ordering::Relaxed),
        0,
        "no PUBACK for what was never written"
    );
    driver.abort();
}
