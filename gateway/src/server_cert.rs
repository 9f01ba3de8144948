//! Keeps the broker's server certificate current without dropping a session: renewed before
//! it ends (checked hourly), and reloaded whenever `server/server.pem` changes on disk (for
//! instance after `tms-gateway ca renew-server`). New handshakes use the new certificate;
//! established sessions are untouched.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tms_broker::{Broker, RevokedSet};
use tms_certs::Ca;
use tokio_util::sync::CancellationToken;

const FILE_CHECK: Duration = Duration::from_secs(2);
const RENEW_CHECK: Duration = Duration::from_secs(3600);

fn modified(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn load(
    ca: &Ca,
    dir: &std::path::Path,
    revoked: &RevokedSet,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let cert_pem = std::fs::read_to_string(dir.join("server.pem"))?;
    let key_pem = std::fs::read_to_string(dir.join("server.key"))?;
    let chain = tms_certs::parse_certificates(&cert_pem)?;
    let key = tms_certs::parse_private_key(&key_pem)?;
    Ok(tms_broker::server_config(
        ca.cert_der(),
        chain,
        key,
        revoked.clone(),
    )?)
}

pub(crate) async fn watch(
    ca: Arc<Ca>,
    dir: PathBuf,
    hostnames: Vec<String>,
    revoked: RevokedSet,
    broker: Arc<Broker>,
    clock: tms_model::SharedClock,
    stop: CancellationToken,
) {
    let pem = dir.join("server.pem");
    let mut seen = modified(&pem);
    let mut last_renew_check = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(FILE_CHECK) => {}
        }
        if last_renew_check.elapsed() >= RENEW_CHECK {
            last_renew_check = tokio::time::Instant::now();
            if let Err(e) = ca.ensure_server_cert(&dir, &hostnames, clock.now_utc()) {
                tracing::error!(error = %e, "cannot renew the server certificate");
            }
        }
        let now = modified(&pem);
        if now == seen {
            continue;
        }
        match load(&ca, &dir, &revoked) {
            Ok(config) => {
                broker.set_tls(config);
                seen = now;
                tracing::info!("server certificate reloaded; live sessions kept");
            }
            // A half-written pair (key replaced, certificate not yet): try again next round.
            Err(e) => {
                tracing::warn!(error = %e, "server certificate changed but cannot be loaded yet")
            }
        }
    }
}
