//! Real MQTT clients over mTLS (rumqttc, rustls) against a TestGateway, and waits on what the
//! store then records for a device.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tms_store::Store;

use super::{DeviceFiles, TestGateway, wait_for};

/// A rustls client configuration trusting `ca` and presenting `cert`/`key` (PEM files).
pub fn client_tls(ca: &Path, cert: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match cert {
        Some((pem, key)) => {
            let chain: Vec<_> = CertificateDer::pem_file_iter(pem)
                .unwrap()
                .map(|c| c.unwrap())
                .collect();
            let key = PrivateKeyDer::from_pem_file(key).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

/// A rumqttc client connecting to the gateway as `client_id` with the given TLS identity.
pub fn mqtt_client(
    gw: &TestGateway,
    client_id: &str,
    tls: Arc<rustls::ClientConfig>,
) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(client_id, "localhost", gw.mqtt_port());
    opts.set_keep_alive(Duration::from_secs(30));
    // Up to the gateway's own limit (mqtt.max_packet_bytes), so the gateway, not the client
    // library, is what a test of large packets exercises.
    opts.set_max_packet_size(64 * 1024, 64 * 1024);
    opts.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls)));
    AsyncClient::new(opts, 100)
}

pub fn device_client(gw: &TestGateway, files: &DeviceFiles) -> (AsyncClient, EventLoop) {
    mqtt_client(
        gw,
        &files.serial,
        client_tls(&files.ca, Some((&files.pem, &files.key))),
    )
}

/// Polls the event loop until CONNACK; returns its return code or the connection error.
pub async fn connack(eventloop: &mut EventLoop) -> Result<rumqttc::ConnectReturnCode, String> {
    loop {
        match tokio::time::timeout(Duration::from_secs(15), eventloop.poll()).await {
            Err(_) => return Err("no CONNACK within 15 s".into()),
            Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => return Ok(ack.code),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.to_string()),
        }
    }
}

/// Drives the event loop in the background; returns the task.
pub fn drive(mut eventloop: EventLoop) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} })
}

pub const TELEMETRY: &str = r#"{"mode":"online","load_pct":42,"battery":{"charge_pct":99,"runtime_min":31},"input":{"voltage":230.1,"frequency_hz":50},"alarms":[]}"#;

pub async fn publish(client: &AsyncClient, serial: &str, kind: &str, payload: &str) {
    client
        .publish(
            format!("tms/{serial}/{kind}"),
            QoS::AtLeastOnce,
            false,
            payload.as_bytes().to_vec(),
        )
        .await
        .unwrap();
}

/// A raw TLS handshake with the given client identity: the server certificate's SHA-256
/// fingerprint on success, the error otherwise. Sends no MQTT.
pub async fn tls_probe(gw: &TestGateway, tls: Arc<rustls::ClientConfig>) -> Result<String, String> {
    let connector = tokio_rustls::TlsConnector::from(tls);
    let tcp = tokio::net::TcpStream::connect(gw.ports.mqtt)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut stream = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    // TLS 1.3: a refused client certificate shows up on the first read, not in connect().
    let mut buf = [0u8; 1];
    use tokio::io::AsyncReadExt;
    match tokio::time::timeout(Duration::from_millis(300), stream.read(&mut buf)).await {
        Ok(Err(e)) => return Err(e.to_string()),
        Ok(Ok(0)) => return Err("closed by the server".into()),
        _ => {}
    }
    let der = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
    Ok(tms_certs::fingerprint_sha256(&der))
}

/// The device's current status in the store.
pub async fn status(store: &Store, serial: &str) -> tms_store::DeviceStatus {
    store
        .device(serial)
        .await
        .unwrap()
        .expect("device registered")
        .status
}

pub async fn wait_state(
    store: &Store,
    serial: &str,
    state: tms_model::ConnState,
    within: Duration,
) -> tms_store::DeviceStatus {
    wait_for(&format!("{serial} {state}"), within, || async {
        let s = status(store, serial).await;
        (s.state == state).then_some(s)
    })
    .await
}

/// Waits until the device's last refused attempt has `reason`.
pub async fn wait_refusal(store: &Store, serial: &str, reason: &str) -> tms_store::DeviceStatus {
    wait_for(
        &format!("{serial} refused with {reason}"),
        Duration::from_secs(10),
        || async {
            let s = status(store, serial).await;
            (s.last_connect_error.as_deref() == Some(reason)).then_some(s)
        },
    )
    .await
}

/// A device client on `port` of this machine (one node, or a balancer in front of several).
pub fn client_on(port: u16, files: &DeviceFiles) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(&files.serial, "localhost", port);
    opts.set_keep_alive(Duration::from_secs(30));
    let tls = client_tls(&files.ca, Some((&files.pem, &files.key)));
    opts.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls)));
    AsyncClient::new(opts, 10)
}

/// Subscribes the device to its commands and waits for the SUBACK.
pub async fn subscribe_commands(client: &AsyncClient, eventloop: &mut EventLoop, serial: &str) {
    client
        .subscribe(format!("tms/{serial}/cmd/#"), QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(ack)))) => {
                assert_eq!(
                    ack.return_codes,
                    [rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
                );
                return;
            }
            Ok(Ok(_)) => {}
            other => panic!("no SUBACK for {serial}: {other:?}"),
        }
    }
}
