//! `tms-gateway device …`: provisioning, certificates, locations and what a device sent.

use super::*;

/// Recent commands `device show` lists, as `GET /api/v1/devices/{serial}` does.
const SHOWN_COMMANDS: i64 = tms_registry::commands::SHOWN_WITH_DEVICE;

fn serial_arg(s: &str) -> Result<DeviceSerial> {
    DeviceSerial::parse(s).map_err(|e| usage(e.to_string()))
}

async fn locate(
    store: &tms_store::Store,
    serial: &DeviceSerial,
    point: tms_model::LatLon,
    now_ms: i64,
) -> Result<()> {
    provisioning::set_manual_location(store, serial, point, now_ms)
        .await
        .with_context(|| format!("setting the location of {serial}"))?;
    println!(
        "location of {serial}: {}, {} (set by hand)",
        point.lat(),
        point.lon()
    );
    Ok(())
}

pub(super) async fn device(
    config: Config,
    command: DeviceCommand,
    clock: &SharedClock,
) -> Result<()> {
    match command {
        DeviceCommand::Add {
            serial,
            mac,
            company,
            lease_months,
            start_date,
            device_type,
            ups_model,
            ups_model_number,
            ups_serial,
            position,
        } => {
            let serial = serial_arg(&serial)?;
            let mac = Mac::parse(&mac).map_err(|e| usage(e.to_string()))?;
            let point = position.checked()?;
            if company.trim().is_empty() {
                return Err(usage("--company must not be empty"));
            }
            if !(1..=120).contains(&lease_months) {
                return Err(usage(format!(
                    "--lease-months {lease_months} must be between 1 and 120"
                )));
            }
            let start_date = match start_date {
                Some(d) => {
                    provisioning::parse_date(&d).ok_or_else(|| {
                        usage(format!("--start-date {d:?} is not a date (YYYY-MM-DD)"))
                    })?;
                    d
                }
                None => clock.now_utc().date().to_string(),
            };
            let lease = provisioning::leased(device_type, start_date.clone(), lease_months)
                .ok_or_else(|| usage(format!("--start-date {start_date:?} is not a date")))?;
            let (store, _) = open_parts(&config, clock).await?;
            store
                .add_device(
                    &NewDevice {
                        serial: serial.clone(),
                        mac,
                        company: company.trim().to_owned(),
                        details: DeviceDetails {
                            ups_model,
                            ups_model_number,
                            ups_serial,
                            ..lease
                        },
                    },
                    clock.now_ms(),
                )
                .await
                .with_context(|| format!("registering device {serial}"))?;
            println!("registered device {serial} ({mac}) for {company}");
            if let Some(point) = point {
                locate(&store, &serial, point, clock.now_ms()).await?;
            }
            store.close().await;
            Ok(())
        }
        DeviceCommand::Locate { serial, position } => {
            let serial = serial_arg(&serial)?;
            let Some(point) = position.checked()? else {
                return Err(usage("device locate needs --lat DEG and --lon DEG"));
            };
            let (store, _) = open_parts(&config, clock).await?;
            if store.device(serial.as_str()).await?.is_none() {
                bail!("device {serial} is not registered");
            }
            let result = locate(&store, &serial, point, clock.now_ms()).await;
            store.close().await;
            result
        }
        DeviceCommand::List { json, state, q } => {
            let (store, _) = open_parts(&config, clock).await?;
            let filter = DeviceFilter {
                q,
                state: state.as_deref().and_then(ConnState::parse),
                ..Default::default()
            };
            let devices = store.devices(&filter).await.context("listing devices")?;
            if json {
                let views = tms_gateway::views(&config, clock.clone());
                let list: Vec<_> = devices.iter().map(|d| views.device(d)).collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<20} {:<16} {:<26} {:<24} {:<12} LAST ERROR",
                    "SERIAL", "STATE", "SINCE", "COMPANY", "UPS MODEL"
                );
                for d in &devices {
                    let since = views::time(d.status.since);
                    println!(
                        "{:<20} {:<16} {:<26} {:<24} {:<12} {}",
                        d.device.serial,
                        d.status.state.as_str(),
                        since.as_str().unwrap_or("-"),
                        d.device.company,
                        d.device.details.ups_model.as_deref().unwrap_or("-"),
                        d.status.last_connect_error.as_deref().unwrap_or("-"),
                    );
                }
                println!("{} device(s)", devices.len());
            }
            store.close().await;
            Ok(())
        }
        DeviceCommand::Show { serial, json } => {
            let serial = serial_arg(&serial)?;
            let (store, _) = open_parts(&config, clock).await?;
            let Some(view) = store.device(serial.as_str()).await? else {
                bail!("device {serial} is not registered");
            };
            let locations = store.locations_of(serial.as_str()).await?;
            let certificates = store.certificates_of(serial.as_str()).await?;
            let refusals = store.refusals(serial.as_str(), 10).await?;
            let commands = store.commands_of(serial.as_str(), SHOWN_COMMANDS).await?;
            if json {
                let mut detail = tms_gateway::views(&config, clock.clone()).device_detail(
                    &view,
                    &locations,
                    &certificates,
                    &refusals,
                );
                detail["commands"] = commands.iter().map(tms_registry::commands::view).collect();
                println!("{}", serde_json::to_string_pretty(&detail)?);
            } else {
                let rejected_payloads = store.quarantine(serial.as_str(), 1000).await?.len();
                let shown = crate::show::Shown {
                    view: &view,
                    locations: &locations,
                    certificates: &certificates,
                    refusals: &refusals,
                    commands: &commands,
                    rejected_payloads,
                    now_ms: clock.now_ms(),
                };
                print!("{}", shown.render());
            }
            store.close().await;
            Ok(())
        }
        DeviceCommand::Command {
            serial,
            name,
            args,
            ttl,
            json,
        } => {
            use tms_registry::commands::{self, CommandError, CommandRequest};
            let serial = serial_arg(&serial)?;
            let args = match args {
                Some(text) => Some(
                    serde_json::from_str::<serde_json::Value>(&text)
                        .map_err(|e| usage(format!("--args is not JSON: {e}")))?,
                ),
                None => None,
            };
            let request = CommandRequest::new(&name, args, Some(ttl)).map_err(|e| match e {
                CommandError::Invalid {
                    field: "ttl_secs",
                    problem,
                } => usage(format!("--ttl {problem}")),
                CommandError::Invalid {
                    field: "args",
                    problem,
                } => usage(format!("--args {problem}")),
                other => usage(other.to_string()),
            })?;
            let (store, _) = open_parts(&config, clock).await?;
            if store.device(serial.as_str()).await?.is_none() {
                store.close().await;
                bail!("device {serial} is not registered");
            }
            let queued = commands::queue(&store, &serial, request, "cli", clock.now_ms())
                .await
                .with_context(|| format!("queuing command {name} for {serial}"));
            store.close().await;
            let record = queued?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"id": record.id, "state": "queued"})
                );
            } else {
                println!("{}", record.id);
            }
            Ok(())
        }
        DeviceCommand::Quarantine { serial, limit } => {
            let serial = serial_arg(&serial)?;
            let (store, _) = open_parts(&config, clock).await?;
            if store.device(serial.as_str()).await?.is_none() {
                bail!("device {serial} is not registered");
            }
            let rows = store.quarantine(serial.as_str(), limit).await?;
            store.close().await;
            if rows.is_empty() {
                println!("no rejected payloads from {serial}: every message it sent could be read");
            }
            for q in &rows {
                println!(
                    "{}  {}  ({} bytes)",
                    views::time(Some(q.received_at)).as_str().unwrap_or("?"),
                    q.topic,
                    q.payload.len()
                );
                println!("  why:     {}", q.error);
                println!("  payload: {}", printable(&q.payload, 400));
            }
            Ok(())
        }
        DeviceCommand::Cert { serial, out, csr } => {
            let serial = serial_arg(&serial)?;
            let key = match &csr {
                Some(path) => DeviceKey::Csr(
                    std::fs::read_to_string(path)
                        .with_context(|| format!("reading CSR {}", path.display()))?,
                ),
                None => DeviceKey::Generate,
            };
            let (store, ca) = open_parts(&config, clock).await?;
            let result =
                device_cert(&config, &store, ca, &serial, key, &out, clock.now_utc()).await;
            store.close().await;
            result
        }
        DeviceCommand::Renew { serial, months } => {
            let serial = serial_arg(&serial)?;
            if !(1..=120).contains(&months) {
                return Err(usage(format!(
                    "--months {months} must be between 1 and 120"
                )));
            }
            let (store, _) = open_parts(&config, clock).await?;
            let ends = provisioning::renew_lease(&store, &serial, months, clock.now_ms())
                .await
                .with_context(|| format!("renewing the lease of {serial}"))?;
            println!(
                "lease of {serial} now ends {}; issue a new certificate with `device cert`",
                views::time(Some(ends)).as_str().unwrap_or("?")
            );
            store.close().await;
            Ok(())
        }
        DeviceCommand::Revoke { serial } => {
            let serial = serial_arg(&serial)?;
            let (store, _) = open_parts(&config, clock).await?;
            if store.device(serial.as_str()).await?.is_none() {
                bail!("device {serial} is not registered");
            }
            let revoked = store
                .revoke_device_certificates(serial.as_str(), "operator", clock.now_ms())
                .await?;
            println!("revoked {} certificate(s) of {serial}", revoked.len());
            store.close().await;
            Ok(())
        }
    }
}

/// `device cert`: all or nothing. The files are staged (the folder created, each file opened
/// beside its final name) before anything is signed, written before the certificate is
/// recorded, and put in place last; a failure on the way removes what was staged and
/// records nothing, so the device's working certificate is never superseded by one whose
/// key was lost.
async fn device_cert(
    config: &Config,
    store: &tms_store::Store,
    ca: std::sync::Arc<tms_certs::Ca>,
    serial: &DeviceSerial,
    key: DeviceKey,
    out: &Path,
    now: time::OffsetDateTime,
) -> Result<()> {
    if store.device(serial.as_str()).await?.is_none() {
        bail!("device {serial} is not registered");
    }
    let with_key = matches!(key, DeviceKey::Generate);
    let mut files = StagedFiles::default();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let key_file = if with_key {
        Some(files.stage(&out.join(format!("{serial}.key")), 0o600)?)
    } else {
        None
    };
    let pem_file = files.stage(&out.join(format!("{serial}.pem")), 0o644)?;
    let ca_file = files.stage(&out.join("ca.pem"), 0o644)?;
    let signed = provisioning::sign_device_certificate(store, ca.clone(), serial, key, now)
        .await
        .with_context(|| format!("issuing a certificate for {serial}"))?;
    if let (Some(i), Some(key_pem)) = (key_file, &signed.issued.private_key_pem) {
        files.write(i, key_pem)?;
    }
    files.write(
        pem_file,
        &format!("{}{}", signed.issued.certificate_pem, ca.cert_pem()),
    )?;
    files.write(ca_file, ca.cert_pem())?;
    let issued_at = signed.issued_at();
    let earlier = signed.earlier.clone();
    // In place first, recorded after: a certificate is recorded only once its files are
    // where the user asked, and files of one not recorded are taken away again.
    let placed = files.place()?;
    let issued = match signed.record(store).await {
        Ok(issued) => issued,
        Err(e) => {
            placed.remove();
            return Err(e).with_context(|| {
                format!("recording the certificate of {serial} (its files were removed again)")
            });
        }
    };
    println!("issued certificate {} for {serial}", issued.serial_number);
    println!(
        "valid until {}",
        views::time(Some(issued.not_after.unix_timestamp() * 1000))
            .as_str()
            .unwrap_or("?")
    );
    let retired = provisioning::retired_by(issued_at, config.certs.rotation_overlap);
    for old in &earlier {
        println!(
            "earlier certificate {} stays valid until the device connects with the new one, \
             at the latest until {}; then it is revoked",
            old.serial_number,
            views::time(Some(retired)).as_str().unwrap_or("?")
        );
    }
    println!(
        "files in {}: {}{serial}.pem, ca.pem",
        out.display(),
        if with_key {
            format!("{serial}.key, ")
        } else {
            String::new()
        },
    );
    Ok(())
}

/// Files written beside their final names (`.NAME.partial`) and renamed into place together
/// by [`StagedFiles::place`]; dropped before that, they leave nothing behind.
#[derive(Default)]
struct StagedFiles {
    /// `(staging path, final path, open file)`.
    files: Vec<(PathBuf, PathBuf, std::fs::File)>,
}

impl StagedFiles {
    /// Creates the staging file for `target` (readable by its owner only when `mode` says
    /// so): proof that the folder takes files, before anything is signed.
    fn stage(&mut self, target: &Path, mode: u32) -> Result<usize> {
        use std::os::unix::fs::OpenOptionsExt;
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let staging = target.with_file_name(format!(".{name}.partial"));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&staging)
            .with_context(|| format!("cannot write {}", target.display()))?;
        self.files.push((staging, target.to_owned(), file));
        Ok(self.files.len() - 1)
    }

    fn write(&mut self, index: usize, contents: &str) -> Result<()> {
        let (_, target, file) = &mut self.files[index];
        file.write_all(contents.as_bytes())
            .and_then(|()| file.sync_all())
            .with_context(|| format!("writing {}", target.display()))
    }

    /// Puts every file in place, or none: when one cannot be moved, those already moved are
    /// removed again (and, dropped, the staging files too).
    fn place(mut self) -> Result<PlacedFiles> {
        let mut placed = PlacedFiles::default();
        for (staging, target, _) in &self.files {
            if let Err(e) = std::fs::rename(staging, target) {
                placed.remove();
                return Err(e).with_context(|| {
                    format!(
                        "cannot put {} in place; nothing was recorded",
                        target.display()
                    )
                });
            }
            placed.0.push(target.clone());
        }
        self.files.clear();
        Ok(placed)
    }
}

/// Files put in place for a certificate not yet recorded.
#[derive(Default)]
struct PlacedFiles(Vec<PathBuf>);

impl PlacedFiles {
    fn remove(&self) {
        for target in &self.0 {
            let _ = std::fs::remove_file(target);
        }
    }
}

impl Drop for StagedFiles {
    fn drop(&mut self) {
        for (staging, _, _) in &self.files {
            let _ = std::fs::remove_file(staging);
        }
    }
}

/// What a device sent, safe to print on a terminal: invalid UTF-8 replaced, control
/// characters (escape sequences, newlines) escaped, at most `max` characters.
fn printable(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}
