//! Hostile MQTT through the real binary: malformed and oversized packets, packets only a server
//! sends, Receive Maximum 0, mixed SUBSCRIBEs and a garbage flood — each refused or capped with
//! a recorded reason, and never a phantom session.

#![expect(clippy::unwrap_used, reason = "tests fail loudly")]

mod support;

use std::time::{Duration, Instant};

use rumqttc::{Event, Packet, QoS};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A gateway with one device provisioned, and its store.
async fn gateway_with_device(
    serial: &str,
    mac: &str,
) -> (TestGateway, DeviceFiles, tms_store::Store) {
    let gw = TestGateway::start().await;
    let files = gw.provision(serial, mac);
    let store = gw.store().await;
    (gw, files, store)
}

/// Waits until the store shows the device online.
async fn wait_online(store: &tms_store::Store, serial: &str) {
    wait_state(
        store,
        serial,
        tms_model::ConnState::Online,
        Duration::from_secs(5),
    )
    .await;
}

async fn raw_tls(
    gw: &TestGateway,
    files: &DeviceFiles,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tls = client_tls(&files.ca, Some((&files.pem, &files.key)));
    let tcp = tokio::net::TcpStream::connect(gw.ports.mqtt).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .unwrap()
}

fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

/// A CONNECT for `client_id` (clean session, keep-alive 60); `v5_props` makes it MQTT 5.
fn connect_packet(client_id: &str, v5_props: Option<&[u8]>) -> Vec<u8> {
    connect_with_will(client_id, v5_props, None)
}

/// The same with a will `(topic, message)` at QoS 0.
fn connect_with_will(
    client_id: &str,
    v5_props: Option<&[u8]>,
    will: Option<(&str, &str)>,
) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T'];
    body.push(if v5_props.is_some() { 5 } else { 4 });
    body.extend([if will.is_some() { 0x06 } else { 0x02 }, 0, 60]);
    if let Some(props) = v5_props {
        remaining_length(props.len(), &mut body);
        body.extend(props);
    }
    body.extend((client_id.len() as u16).to_be_bytes());
    body.extend(client_id.as_bytes());
    if let Some((topic, message)) = will {
        if v5_props.is_some() {
            body.push(0); // no will properties
        }
        for part in [topic, message] {
            body.extend((part.len() as u16).to_be_bytes());
            body.extend(part.as_bytes());
        }
    }
    let mut packet = vec![0x10];
    remaining_length(body.len(), &mut packet);
    packet.extend(body);
    packet
}

/// Reads until the server closes; returns what it sent and how long the close took.
async fn read_to_close<S: AsyncReadExt + Unpin>(
    s: &mut S,
    within: Duration,
) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(within.saturating_sub(start.elapsed()), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (got, start.elapsed()),
            Ok(Ok(n)) => got.extend(&buf[..n]),
            Err(_) => panic!("the server kept the connection open for {within:?}; it sent {got:?}"),
        }
    }
}

/// Keeps writing (up to 1 MiB) what a hostile client streams after a huge length field,
/// until the server stops reading.
async fn stream_junk<S: AsyncWriteExt + Unpin>(s: &mut S) {
    let junk = vec![0x41u8; 64 * 1024];
    for _ in 0..16 {
        if s.write_all(&junk).await.is_err() {
            break;
        }
    }
}

/// The server closes the connection and the device's session ends as `protocol_error`.
async fn closed_as_protocol_error<S: AsyncReadExt + Unpin>(
    s: &mut S,
    store: &tms_store::Store,
    serial: &str,
    what: &str,
) {
    read_to_close(s, Duration::from_secs(5)).await;
    let st = wait_state(
        store,
        serial,
        tms_model::ConnState::Offline,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(
        st.last_disconnect_reason.as_deref(),
        Some("protocol_error"),
        "{what}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_and_oversized_packets_are_refused_before_they_are_buffered() {
    let (gw, files, store) = gateway_with_device("RE4M000001", "00:1B:2C:3D:4E:31").await;
    let pid = gw.pid();
    let before = rss_mib(pid);

    // CONNECT claiming a remaining length of FF FF FF FF, then streaming.
    let mut s = raw_tls(&gw, &files).await;
    s.write_all(&[0x10, 0xff, 0xff, 0xff, 0xff]).await.unwrap();
    stream_junk(&mut s).await;
    let (_, took) = read_to_close(&mut s, Duration::from_secs(5)).await;
    assert!(
        took < Duration::from_secs(5),
        "closed at once, not at the 10 s deadline"
    );
    let st = wait_refusal(&store, &files.serial, "protocol_error").await;
    assert!(
        st.last_connect_error_detail
            .as_deref()
            .unwrap_or("")
            .contains("remaining length"),
        "{st:?}"
    );

    // A CONNECT larger than mqtt.max_packet_bytes is refused from its header alone.
    let mut s = raw_tls(&gw, &files).await;
    let mut header = vec![0x10];
    remaining_length(50 * 1024 * 1024, &mut header);
    s.write_all(&header).await.unwrap();
    let (_, took) = read_to_close(&mut s, Duration::from_secs(5)).await;
    assert!(took < Duration::from_secs(5));

    // In a session: a PUBLISH header announcing 50 MB ends the session without buffering it.
    let mut s = raw_tls(&gw, &files).await;
    s.write_all(&connect_packet(&files.serial, None))
        .await
        .unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0]);
    wait_online(&store, &files.serial).await;
    let mut publish = vec![0x30];
    remaining_length(50 * 1024 * 1024, &mut publish);
    s.write_all(&publish).await.unwrap();
    stream_junk(&mut s).await;
    closed_as_protocol_error(&mut s, &store, &files.serial, "a 50 MB PUBLISH header").await;
    let after = rss_mib(pid);
    assert!(
        after < before + 20,
        "RSS grew from {before} to {after} MiB on hostile length fields"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn packets_only_a_server_sends_end_the_session_with_its_will_and_no_phantom() {
    let (gw, files, store) = gateway_with_device("RE4P000001", "00:1B:2C:3D:4E:41").await;
    let v5: Option<&[u8]> = Some(&[]);
    let packets = [
        ("v5 CONNACK", v5, &[0x20u8, 3, 0, 0, 0][..]),
        ("v5 UNSUBACK", v5, &[0xb0, 4, 0, 1, 0, 0]),
        ("v4 SUBACK", None, &[0x90, 3, 0, 1, 0]),
        ("v4 PINGRESP", None, &[0xd0, 0]),
    ];
    let will_topic = format!("tms/{}/status", files.serial);
    for (i, (what, props, packet)) in packets.into_iter().enumerate() {
        let mut s = raw_tls(&gw, &files).await;
        let will = format!("offline-{i}");
        s.write_all(&connect_with_will(
            &files.serial,
            props,
            Some((&will_topic, &will)),
        ))
        .await
        .unwrap();
        let mut first = [0u8; 2];
        s.read_exact(&mut first).await.unwrap();
        assert_eq!(first[0], 0x20, "{what}: CONNACK first");
        wait_online(&store, &files.serial).await;
        s.write_all(packet).await.unwrap();
        closed_as_protocol_error(&mut s, &store, &files.serial, what).await;
        wait_for("the will stored", Duration::from_secs(5), || async {
            let st = status(&store, &files.serial).await;
            (st.reported_status.as_deref() == Some(will.as_str())).then_some(())
        })
        .await;
    }
    let m = scrape(&gw).await;
    assert_eq!(
        m.get("tms_broker_connections").copied().unwrap_or(0.0),
        0.0,
        "no phantom sessions"
    );
    assert!(!gw.log().contains("panicked"), "no session task panicked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn receive_maximum_zero_is_refused_as_a_protocol_error() {
    let (gw, files, store) = gateway_with_device("RE4R000001", "00:1B:2C:3D:4E:51").await;
    let mut s = raw_tls(&gw, &files).await;
    // Property 0x21 Receive Maximum = 0.
    s.write_all(&connect_packet(&files.serial, Some(&[0x21, 0, 0])))
        .await
        .unwrap();
    let (got, _) = read_to_close(&mut s, Duration::from_secs(5)).await;
    assert!(got.len() >= 4 && got[0] == 0x20, "a CONNACK: {got:?}");
    assert_eq!(got[3], 0x82, "reason code Protocol Error: {got:?}");
    let st = wait_refusal(&store, &files.serial, "protocol_error").await;
    assert!(
        st.last_connect_error_detail
            .unwrap()
            .contains("Receive Maximum")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscribe_is_answered_filter_by_filter() {
    let gw = TestGateway::start().await;
    let files = gw.provision("RE4S000001", "00:1B:2C:3D:4E:61");
    let (client, mut el) = device_client(&gw, &files);
    connack(&mut el).await.unwrap();
    client
        .subscribe_many([
            rumqttc::SubscribeFilter::new(format!("tms/{}/cmd/#", files.serial), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new("tms/OTHER/cmd/#".into(), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new(
                format!("tms/{}/cmd/reboot", files.serial),
                QoS::AtMostOnce,
            ),
        ])
        .await
        .unwrap();
    let codes = loop {
        if let Event::Incoming(Packet::SubAck(ack)) =
            tokio::time::timeout(Duration::from_secs(10), el.poll())
                .await
                .unwrap()
                .unwrap()
        {
            break ack.return_codes;
        }
    };
    use rumqttc::SubscribeReasonCode as C;
    assert_eq!(
        codes,
        vec![
            C::Success(QoS::AtLeastOnce),
            C::Failure,
            C::Success(QoS::AtMostOnce)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_garbage_flood_is_capped_and_the_device_disconnected_as_abuse() {
    let gw = TestGateway::start().await;
    let noisy = gw.provision("RE4G000001", "00:1B:2C:3D:4E:71");
    let quiet = gw.provision("RE4G000002", "00:1B:2C:3D:4E:72");
    let store = gw.store().await;
    let (client, mut el) = device_client(&gw, &noisy);
    connack(&mut el).await.unwrap();
    let events = drive(el);
    let garbage: Vec<u8> = (0..60 * 1024).map(|i| (i * 7 + 3) as u8).collect();
    let mut sent = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) && sent < 3000 {
        if client
            .publish(
                format!("tms/{}/telemetry", noisy.serial),
                QoS::AtMostOnce,
                false,
                garbage.clone(),
            )
            .await
            .is_err()
        {
            break;
        }
        sent += 1;
    }
    let st = wait_state(
        &store,
        &noisy.serial,
        tms_model::ConnState::Offline,
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(st.last_disconnect_reason.as_deref(), Some("abuse"));
    let kept = store.quarantined(&noisy.serial, 10_000).await.unwrap();
    let bytes: usize = kept.iter().map(|(_, _, p)| p.len()).sum();
    assert!(
        kept.len() <= tms_ingest::QUARANTINE_ROWS_PER_MIN as usize
            && bytes <= tms_ingest::QUARANTINE_BYTES_PER_MIN,
        "{} rows, {bytes} bytes kept of {sent} sent",
        kept.len()
    );
    events.abort();
    // The other device is unaffected.
    publishes_are_stored(&gw, &store, &quiet, 1).await;
}

/// Clients that send a ClientHello and then nothing: each takes a handshake slot only while
/// the server answers it, and gives it back when the handshake waits for the client, so
/// however many stall, no slot stays taken and every device arriving meanwhile gets online.
/// (That queued handshakes go oldest first is `broker`'s `admission` unit tests.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_handshakes_give_their_slots_back_and_every_device_gets_online() {
    let gw = TestGateway::start().await;
    let devices: Vec<DeviceFiles> = (1..=6)
        .map(|i| gw.provision(&format!("RE4G00010{i}"), &format!("00:1B:2C:3D:4F:{i:02X}")))
        .collect();
    let store = gw.store().await;
    let before = scrape(&gw).await;
    let slots = before["tms_broker_handshake_slots"];
    assert!(slots >= 1.0, "{slots} handshake slots");

    // Twice as many stalled handshakes as slots: half of them must queue.
    let tls = client_tls(&devices[0].ca, None);
    let mut stalled = Vec::new();
    for _ in 0..2 * slots as usize {
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut conn = rustls::ClientConnection::new(tls.clone(), name).unwrap();
        let mut hello = Vec::new();
        conn.write_tls(&mut hello).unwrap();
        let mut tcp = tokio::net::TcpStream::connect(gw.ports.mqtt).await.unwrap();
        tcp.write_all(&hello).await.unwrap();
        stalled.push(tcp);
    }
    let clients: Vec<_> = devices
        .iter()
        .map(|d| {
            let (client, el) = device_client(&gw, d);
            (client, drive(el))
        })
        .collect();
    for d in &devices {
        wait_online(&store, &d.serial).await;
    }

    // Every stalled client was answered and gave its slot back while it stalls.
    let deadline = Instant::now() + Duration::from_secs(20);
    let after = loop {
        let now = scrape(&gw).await;
        let freed = delta(
            &before,
            &now,
            "tms_broker_handshake_slots_released_early_total",
        );
        if freed >= 2.0 * slots && now.get("tms_broker_handshakes_in_progress") == Some(&0.0) {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "{freed} slots given back by {} stalled clients; in progress: {:?}",
            2.0 * slots,
            now.get("tms_broker_handshakes_in_progress")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Nothing waits for a slot (the gauge exists once something has queued).
    let waiting = after.get("tms_broker_handshakes_waiting").copied();
    assert!(waiting.unwrap_or(0.0) == 0.0, "{waiting:?} waiting");
    for (_, events) in clients {
        events.abort();
    }
    drop(stalled);
}

/// The same over MQTT 5: each filter gets its own reason code — the granted QoS for the
/// device's own command topics, 0x87 Not authorized for another device's — and the session
/// stays up (a device library that sends one SUBSCRIBE for all its topics keeps its commands).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_mqtt5_subscribe_is_answered_filter_by_filter() {
    use rumqttc::v5::mqttbytes::QoS as Q5;
    use rumqttc::v5::mqttbytes::v5::{Filter, Packet as P5, SubscribeReasonCode as C};
    use rumqttc::v5::{AsyncClient, Event as E5, MqttOptions};
    let gw = TestGateway::start().await;
    let files = gw.provision("RE4S000005", "00:1B:2C:3D:4E:65");
    let mut opts = MqttOptions::new(files.serial.as_str(), "localhost", gw.mqtt_port());
    opts.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(
        client_tls(&files.ca, Some((&files.pem, &files.key))),
    )));
    let (client, mut el) = AsyncClient::new(opts, 10);
    let next = async |el: &mut rumqttc::v5::EventLoop| {
        tokio::time::timeout(Duration::from_secs(10), el.poll())
            .await
            .unwrap_or_else(|_| panic!("no answer within 10 s"))
            .unwrap_or_else(|e| panic!("the session ended: {e}"))
    };
    while !matches!(next(&mut el).await, E5::Incoming(P5::ConnAck(_))) {}
    client
        .subscribe_many([
            Filter::new(format!("tms/{}/cmd/#", files.serial), Q5::AtLeastOnce),
            Filter::new("tms/OTHER/cmd/#", Q5::AtLeastOnce),
            Filter::new(format!("tms/{}/cmd/reboot", files.serial), Q5::AtMostOnce),
        ])
        .await
        .unwrap();
    let codes = loop {
        if let E5::Incoming(P5::SubAck(ack)) = next(&mut el).await {
            break ack.return_codes;
        }
    };
    assert_eq!(
        codes,
        vec![
            C::Success(Q5::AtLeastOnce),
            C::NotAuthorized,
            C::Success(Q5::AtMostOnce)
        ]
    );
    // Still connected: the device's next message is acknowledged.
    client
        .publish(
            format!("tms/{}/status", files.serial),
            Q5::AtLeastOnce,
            false,
            "online",
        )
        .await
        .unwrap();
    while !matches!(next(&mut el).await, E5::Incoming(P5::PubAck(_))) {}
}
