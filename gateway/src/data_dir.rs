//! The data directory of a gateway: created private, held by one `serve` at a time, and
//! opened (store and CA) by every command. Creates nothing where no gateway has run, except
//! through [`create_parts`] (first start); what runs on top of it is `app`'s.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use tms_certs::Ca;
use tms_config::Config;
use tms_model::SharedClock;
use tms_store::Store;

/// The configuration points where no gateway has run: the CLI creates nothing there
/// (a typo in a path must not start a second, empty fleet). Exit code 2.
#[derive(Debug, thiserror::Error)]
#[error(
    "no gateway data at {}; pass --config or TMS_DATA_DIR (`tms-gateway serve` or `tms-gateway init` creates it)",
    .0.display()
)]
pub struct NoGatewayData(pub PathBuf);

/// `path` made absolute against the current directory, for messages: a relative data
/// directory means a different one in every folder a command is run from.
pub fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

/// The database file of a `sqlite:` URL (`None` for other databases and in-memory ones).
fn sqlite_file(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or(rest);
    (!path.is_empty() && path != ":memory:").then(|| PathBuf::from(path))
}

/// Opens the store and loads the CA of a gateway that has run here before: what every
/// command but `serve` and `init` needs. Creates nothing; [`NoGatewayData`] when there is
/// no CA or no SQLite database where the configuration points.
pub async fn open_parts(config: &Config, clock: &SharedClock) -> Result<(Store, Arc<Ca>)> {
    let has_ca = config.data_dir.join("ca").join("ca.pem").is_file();
    let has_db = sqlite_file(&config.database_url).is_none_or(|f| f.is_file());
    if !has_ca || !has_db {
        return Err(NoGatewayData(absolute(&config.data_dir)).into());
    }
    create_parts(config, clock).await
}

/// Opens the store and loads the CA, creating the data directory, the database and the CA
/// when they do not exist yet (first start).
pub async fn create_parts(config: &Config, clock: &SharedClock) -> Result<(Store, Arc<Ca>)> {
    create_private_dir(&config.data_dir)?;
    let store = Store::open(&config.database_url).await.with_context(|| {
        format!(
            "opening the store at {}",
            tms_config::redact_url(&config.database_url)
        )
    })?;
    let ca_dir = config.data_dir.join("ca");
    let passphrase = config.certs.ca_key_passphrase.clone();
    let (ca, created) = if store.backend() == tms_store::Backend::Postgres {
        // Nodes sharing the database share one CA (CONTRACT §6).
        let passphrase = passphrase.as_ref().map(|p| p.expose().to_owned());
        crate::cluster::shared_ca(&store, &ca_dir, passphrase, &known_node_id(config), clock)
            .await?
    } else {
        let now = clock.now_utc();
        tokio::task::spawn_blocking(move || {
            let passphrase = passphrase.as_ref().map(tms_config::Secret::expose);
            Ca::open(&ca_dir, now, passphrase)
        })
        .await
        .context("CA task")?
        .context("loading the CA")?
    };
    if created {
        tracing::info!(fingerprint = %ca.info().sha256_fingerprint, "created a new CA");
    }
    Ok((store, Arc::new(ca)))
}

/// The exclusive hold of one `serve` on its data directory, for the life of the process:
/// a second `serve` there stops before it touches the database, the CA or any session.
/// The kernel releases it when the process ends, however it ends.
#[derive(Debug)]
pub struct DataDirLock {
    _file: std::fs::File,
}

/// Takes `<data_dir>/gateway.lock` (flock, exclusive, without waiting) and writes our pid
/// into it; fails naming the pid of the `serve` that holds it.
pub fn lock_data_dir(dir: &Path) -> Result<DataDirLock> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("gateway.lock");
    // Not truncated on open: the holder's pid must stay readable to whoever is refused.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", absolute(&path).display()))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
            let mut text = String::new();
            let holder = match file
                .read_to_string(&mut text)
                .map(|_| text.trim().parse::<u32>())
            {
                Ok(Ok(pid)) => format!("pid {pid}"),
                _ => "a process still starting".to_owned(),
            };
            bail!(
                "another tms-gateway serve ({holder}) is running on the data directory {}; \
                 stop it first, or give this one its own data_dir (--config or TMS_DATA_DIR)",
                absolute(dir).display()
            );
        }
        Err(e) => {
            return Err(std::io::Error::from(e))
                .with_context(|| format!("locking {}", absolute(&path).display()));
        }
    }
    file.set_len(0)
        .and_then(|()| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
        .with_context(|| format!("writing {}", absolute(&path).display()))?;
    Ok(DataDirLock { _file: file })
}

/// Creates the data directory mode 0700, and tightens one found looser: it holds the
/// database, the CA key and mails with temporary passwords.
pub(crate) fn create_private_dir(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating data directory {}", dir.display()))?;
    let mode = std::fs::metadata(dir)
        .with_context(|| format!("reading data directory {}", dir.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making data directory {} private", dir.display()))?;
    }
    Ok(())
}

/// This machine's host name, if it has one: the node id of versions before `node.id`.
pub(crate) fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
}

/// The node id as far as it is known without creating anything (for records only).
fn known_node_id(config: &Config) -> String {
    config
        .node
        .id
        .clone()
        .or_else(|| {
            std::fs::read_to_string(config.data_dir.join("node-id"))
                .ok()
                .map(|t| t.trim().to_owned())
        })
        .unwrap_or_else(|| "a command-line tool".to_owned())
}
