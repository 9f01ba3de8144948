//! The command line (CONTRACT §1).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use time::OffsetDateTime;
use tms_certs::DeviceKey;
use tms_config::Config;
use tms_gateway::{App, absolute, create_parts, open_parts};
use tms_model::{ConnState, DeviceSerial, Mac};
use tms_registry::{auth, provisioning, views};
use tms_store::{DeviceFilter, NewDevice, NewUser};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "tms-gateway",
    version,
    about = "Secure MQTT gateway and device registry for Toshiba RemotEye 4 UPS cards"
)]
pub struct Args {
    /// TOML configuration file; TMS_* environment variables override it.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker (8883, mutual TLS), ingest and the HTTP API in one process.
    Serve,
    /// Create the data directory, database, CA and server certificate, as the first `serve`
    /// does, and exit (for provisioning before the first start). Other commands create nothing.
    Init,
    /// Staff accounts.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Devices: provisioning, fleet view, certificates.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// N simulated RemotEye 4 devices connecting over mTLS and publishing telemetry.
    ///
    /// Each device (serials SIM0000000, SIM0000001, …) is registered and given a certificate
    /// in the data directory first; `serve` must be running.
    Simulate {
        /// How many devices to simulate.
        #[arg(long, value_name = "N")]
        devices: usize,
        /// Seconds between telemetry messages of one device (0.01 to 3600).
        #[arg(long, value_name = "SECS", default_value_t = 5.0)]
        interval: f64,
        /// MQTT quality of service of the telemetry: 0 (at most once) or 1 (at least once).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
        qos: u8,
        /// Stop after this many seconds (default: until Ctrl-C).
        #[arg(long, value_name = "SECS")]
        duration: Option<f64>,
        /// Broker address (default: from <data_dir>/ports.json, else mqtt.listen).
        #[arg(long, value_name = "IP:PORT")]
        mqtt: Option<std::net::SocketAddr>,
    },
    /// The built-in certificate authority.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create an active staff account; prints a generated password unless --password-stdin.
    Add {
        /// The account's email address; it is also the login name.
        #[arg(long, value_name = "EMAIL")]
        email: String,
        /// admin: everything, including staff accounts; provider: registers and manages
        /// the devices of any company.
        #[arg(long, value_enum)]
        role: StaffRole,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum StaffRole {
    /// Everything, including staff accounts and the nodes of a cluster.
    Admin,
    /// Registers devices for customers and manages every company's devices.
    Provider,
}

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Register a device for a company (created if new), without a customer account.
    Add {
        /// Device S/N, the certificate CN and MQTT client id: 1 to 64 characters of A-Z,
        /// 0-9, '-', '_' or '.' (letters are stored upper-case).
        #[arg(long, value_name = "SERIAL")]
        serial: String,
        /// MAC address of the RemotEye card: 00:1B:2C:3D:4E:5F, 00-1B-2C-3D-4E-5F or
        /// 001B2C3D4E5F (any case; stored as 00:1B:2C:3D:4E:5F).
        #[arg(long, value_name = "MAC")]
        mac: String,
        /// Customer company; created if new, matched ignoring case and surrounding spaces.
        #[arg(long, value_name = "NAME")]
        company: String,
        /// Lease length in months (1 to 120); the certificate is valid until the lease ends.
        #[arg(long, value_name = "MONTHS", default_value_t = 12)]
        lease_months: i64,
        /// Lease start, YYYY-MM-DD; today when omitted.
        #[arg(long, value_name = "DATE")]
        start_date: Option<String>,
        /// Device type shown in the fleet view.
        #[arg(long, value_name = "TYPE", default_value = "RemotEye 4")]
        device_type: String,
        /// UPS model the card sits in, e.g. 1600XP.
        #[arg(long, value_name = "MODEL")]
        ups_model: Option<String>,
        /// UPS model number, e.g. 1600XP-18K.
        #[arg(long, value_name = "NUMBER")]
        ups_model_number: Option<String>,
        /// UPS serial number, e.g. 160300007.
        #[arg(long, value_name = "SERIAL")]
        ups_serial: Option<String>,
        #[command(flatten)]
        position: Position,
    },
    /// Set where a device is, as `PUT /api/v1/devices/{serial}/location` does; a location the
    /// device reports itself is preferred over it.
    Locate {
        /// Device S/N (either case).
        serial: String,
        #[command(flatten)]
        position: Position,
    },
    /// The fleet with connection status.
    List {
        /// Print the same JSON objects as `GET /api/v1/devices`.
        #[arg(long)]
        json: bool,
        /// Only devices in this state.
        #[arg(long, value_parser = ["online", "offline", "never_connected"])]
        state: Option<String>,
        /// Search serial, company, UPS model and UPS serial.
        #[arg(long)]
        q: Option<String>,
    },
    /// One device: registration, status, location, certificates, refused attempts.
    Show {
        /// Device S/N (either case).
        serial: String,
        /// Print the same JSON object as `GET /api/v1/devices/{serial}`.
        #[arg(long)]
        json: bool,
    },
    /// Malformed payloads the device sent, newest first, with why each was rejected.
    Quarantine {
        /// Device S/N (either case).
        serial: String,
        /// How many to show, newest first (1 to 1000).
        #[arg(long, value_name = "N", default_value_t = 20,
              value_parser = clap::value_parser!(i64).range(1..=1000))]
        limit: i64,
    },
    /// Issue a certificate: writes <SERIAL>.key (not with --csr), <SERIAL>.pem and ca.pem.
    Cert {
        /// Device S/N (either case).
        serial: String,
        /// Folder for the files (created if missing); nothing is issued if it cannot be written.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Sign this PEM certificate signing request instead of generating a key.
        #[arg(long, value_name = "FILE")]
        csr: Option<PathBuf>,
    },
    /// Revoke every valid certificate of the device; a running gateway closes its session.
    Revoke {
        /// Device S/N (either case).
        serial: String,
    },
    /// Extend the device's lease by N months (from its end, or from today if it ended).
    Renew {
        /// Device S/N (either case).
        serial: String,
        /// Months to add (1 to 120).
        #[arg(long, value_name = "MONTHS")]
        months: i64,
    },
}

/// `--lat DEG --lon DEG`, where a device is: both or neither.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Position {
    /// Latitude in degrees, -90 to 90 (north positive); needs --lon.
    #[arg(
        long,
        value_name = "DEG",
        requires = "lon",
        allow_negative_numbers = true
    )]
    lat: Option<f64>,
    /// Longitude in degrees, -180 to 180 (east positive); needs --lat.
    #[arg(
        long,
        value_name = "DEG",
        requires = "lat",
        allow_negative_numbers = true
    )]
    lon: Option<f64>,
}

impl Position {
    /// The checked position, `None` when neither flag was given (`requires` rules out one).
    fn checked(self) -> Result<Option<tms_model::LatLon>> {
        match (self.lat, self.lon) {
            (Some(lat), Some(lon)) => tms_model::LatLon::new(lat, lon)
                .map(Some)
                .map_err(|e| usage(format!("--{e}"))),
            _ => Ok(None),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Subject, SHA-256 fingerprint and validity of the CA certificate.
    Show,
    /// Issue a new server certificate now; a running gateway switches to it within seconds
    /// without dropping connected devices.
    RenewServer,
}

/// Bad input on the command line: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

fn usage(msg: impl Into<String>) -> anyhow::Error {
    UsageError(msg.into()).into()
}

pub fn init_logging(command: &Command, format: tms_config::LogFormat) {
    let default = match command {
        // rumqttd opens an error-level span per publish: off unless asked for.
        Command::Serve => "info,rumqttd=off,rustls=error",
        _ => "warn,rumqttd=off,rustls=error",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colour codes only for a person at a terminal: under journald or in a file they are
    // noise ("blob data"), and NO_COLOR (https://no-color.org) turns them off everywhere.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match format {
        tms_config::LogFormat::Text => builder.init(),
        tms_config::LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

pub async fn run(command: Command, config: Config) -> Result<()> {
    match command {
        Command::Serve => serve(config).await,
        Command::Init => init(config).await,
        Command::User {
            command:
                UserCommand::Add {
                    email,
                    role,
                    password_stdin,
                },
        } => user_add(config, email, role, password_stdin).await,
        Command::Device { command } => device(config, command).await,
        Command::Simulate {
            devices,
            interval,
            qos,
            duration,
            mqtt,
        } => {
            if !(0.01..=3600.0).contains(&interval) {
                return Err(usage(format!(
                    "--interval {interval} must be between 0.01 and 3600 seconds"
                )));
            }
            if duration.is_some_and(|d| !(0.1..=31_536_000.0).contains(&d)) {
                return Err(usage("--duration must be a positive number of seconds"));
            }
            let stop = CancellationToken::new();
            let signal = stop.clone();
            tokio::spawn(async move {
                wait_for_signal().await;
                signal.cancel();
            });
            tms_gateway::simulate::run(
                config,
                tms_gateway::simulate::SimulateOptions {
                    devices,
                    interval: std::time::Duration::from_secs_f64(interval),
                    qos: if qos == 0 {
                        rumqttc::QoS::AtMostOnce
                    } else {
                        rumqttc::QoS::AtLeastOnce
                    },
                    duration: duration.map(std::time::Duration::from_secs_f64),
                    mqtt,
                },
                stop,
            )
            .await
        }
        Command::Ca {
            command: CaCommand::RenewServer,
        } => {
            let (store, ca) = open_parts(&config).await?;
            let cert = ca
                .renew_server_cert(
                    &config.data_dir.join("server"),
                    &config.mqtt.hostnames,
                    OffsetDateTime::now_utc(),
                )
                .context("issuing the server certificate")?;
            println!(
                "issued a new server certificate for {} (valid until {})",
                config.mqtt.hostnames.join(", "),
                views::time(Some(cert.not_after.unix_timestamp() * 1000))
                    .as_str()
                    .unwrap_or("?")
            );
            store.close().await;
            Ok(())
        }
        Command::Ca {
            command: CaCommand::Show,
        } => {
            let (_, ca) = open_parts(&config).await?;
            let info = ca.info();
            println!("subject:      {}", info.subject);
            println!("sha256:       {}", colon_hex(&info.sha256_fingerprint));
            println!(
                "not before:   {}",
                views::time(Some(info.not_before.unix_timestamp() * 1000))
                    .as_str()
                    .unwrap_or("?")
            );
            println!(
                "not after:    {}",
                views::time(Some(info.not_after.unix_timestamp() * 1000))
                    .as_str()
                    .unwrap_or("?")
            );
            println!(
                "certificate:  {}",
                absolute(&config.data_dir.join("ca/ca.pem")).display()
            );
            // What devices may use as the broker address (the server certificate's names).
            if let Ok(pem) = std::fs::read_to_string(config.data_dir.join("server/server.pem")) {
                println!(
                    "server names: {}",
                    tms_gateway::server_cert_names(&pem).join(", ")
                );
            }
            Ok(())
        }
    }
}

fn colon_hex(hex: &str) -> String {
    hex.as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).to_uppercase())
        .collect::<Vec<_>>()
        .join(":")
}

async fn init(config: Config) -> Result<()> {
    let existed = config.data_dir.join("ca/ca.pem").is_file();
    let (store, ca) = create_parts(&config).await?;
    let (server, _) = ca
        .ensure_server_cert(
            &config.data_dir.join("server"),
            &config.mqtt.hostnames,
            OffsetDateTime::now_utc(),
        )
        .context("preparing the broker's server certificate")?;
    store.close().await;
    println!(
        "{} gateway data at {}",
        if existed { "found" } else { "created" },
        absolute(&config.data_dir).display()
    );
    println!("CA sha256:    {}", colon_hex(&ca.info().sha256_fingerprint));
    println!(
        "server names: {}",
        tms_gateway::server_cert_names(&server.cert_pem).join(", ")
    );
    Ok(())
}

async fn serve(config: Config) -> Result<()> {
    let app = App::build(config).await?;
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        signal.cancel();
    });
    app.run(shutdown).await
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the gateway");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn user_add(
    config: Config,
    email: String,
    role: StaffRole,
    password_stdin: bool,
) -> Result<()> {
    if !email.contains('@') || email.starts_with('@') || email.ends_with('@') {
        return Err(usage(format!("--email {email:?} is not an email address")));
    }
    let (password, generated) = if password_stdin {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the password from stdin")?;
        let password = line.trim_end_matches(['\r', '\n']).to_owned();
        if password.chars().count() < 10 {
            return Err(usage("the password must have at least 10 characters"));
        }
        (password, false)
    } else {
        (auth::generate_password(), true)
    };
    let (store, _) = open_parts(&config).await?;
    let hash =
        tokio::task::spawn_blocking(move || auth::hash_password(&password).map(|h| (h, password)))
            .await
            .context("hashing task")??;
    let role_name = match role {
        StaffRole::Admin => "admin",
        StaffRole::Provider => "provider",
    };
    let id = store
        .add_user(
            &NewUser {
                email: email.clone(),
                role: role_name.into(),
                password_hash: hash.0,
                first_name: None,
                last_name: None,
                phone: None,
                company_id: None,
                active: true,
                must_change_password: false,
            },
            tms_model::now_ms(),
        )
        .await
        .with_context(|| format!("creating account {email}"))?;
    println!("created {role_name} account {email} (id {id})");
    if generated {
        println!("password: {}", hash.1);
        println!("(shown once; it is stored only as an argon2id hash)");
    }
    store.close().await;
    Ok(())
}

fn serial_arg(s: &str) -> Result<DeviceSerial> {
    DeviceSerial::parse(s).map_err(|e| usage(e.to_string()))
}

async fn locate(
    store: &tms_store::Store,
    serial: &DeviceSerial,
    point: tms_model::LatLon,
) -> Result<()> {
    provisioning::set_manual_location(store, serial, point, tms_model::now_ms())
        .await
        .with_context(|| format!("setting the location of {serial}"))?;
    println!(
        "location of {serial}: {}, {} (set by hand)",
        point.lat(),
        point.lon()
    );
    Ok(())
}

async fn device(config: Config, command: DeviceCommand) -> Result<()> {
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
                None => OffsetDateTime::now_utc().date().to_string(),
            };
            let (store, _) = open_parts(&config).await?;
            store
                .add_device(
                    &NewDevice {
                        serial: serial.clone(),
                        mac,
                        company: company.trim().to_owned(),
                        device_type,
                        lease_months,
                        lease_ends_at: provisioning::lease_ends_at_ms(&start_date, lease_months)
                            .ok_or_else(|| {
                                usage(format!("--start-date {start_date:?} is not a date"))
                            })?,
                        start_date,
                        ups_model,
                        ups_model_number,
                        ups_serial,
                        ups_ship_date: None,
                        sales_order: None,
                        service_contract_sales_order: None,
                        registered_by: None,
                    },
                    tms_model::now_ms(),
                )
                .await
                .with_context(|| format!("registering device {serial}"))?;
            println!("registered device {serial} ({mac}) for {company}");
            if let Some(point) = point {
                locate(&store, &serial, point).await?;
            }
            store.close().await;
            Ok(())
        }
        DeviceCommand::Locate { serial, position } => {
            let serial = serial_arg(&serial)?;
            let Some(point) = position.checked()? else {
                return Err(usage("device locate needs --lat DEG and --lon DEG"));
            };
            let (store, _) = open_parts(&config).await?;
            if store.device(serial.as_str()).await?.is_none() {
                bail!("device {serial} is not registered");
            }
            let result = locate(&store, &serial, point).await;
            store.close().await;
            result
        }
        DeviceCommand::List { json, state, q } => {
            let (store, _) = open_parts(&config).await?;
            let filter = DeviceFilter {
                q,
                state: state.as_deref().and_then(ConnState::parse),
                ..Default::default()
            };
            let devices = store.devices(&filter).await.context("listing devices")?;
            if json {
                let views = tms_gateway::views(&config);
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
                        d.device.ups_model.as_deref().unwrap_or("-"),
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
            let (store, _) = open_parts(&config).await?;
            let Some(view) = store.device(serial.as_str()).await? else {
                bail!("device {serial} is not registered");
            };
            let locations = store.locations_of(serial.as_str()).await?;
            let certificates = store.certificates_of(serial.as_str()).await?;
            let refusals = store.refusals(serial.as_str(), 10).await?;
            if json {
                let detail = tms_gateway::views(&config).device_detail(
                    &view,
                    &locations,
                    &certificates,
                    &refusals,
                );
                println!("{}", serde_json::to_string_pretty(&detail)?);
            } else {
                let rejected_payloads = store.quarantine(serial.as_str(), 1000).await?.len();
                let shown = crate::show::Shown {
                    view: &view,
                    locations: &locations,
                    certificates: &certificates,
                    refusals: &refusals,
                    rejected_payloads,
                    now_ms: tms_model::now_ms(),
                };
                print!("{}", shown.render());
            }
            store.close().await;
            Ok(())
        }
        DeviceCommand::Quarantine { serial, limit } => {
            let serial = serial_arg(&serial)?;
            let (store, _) = open_parts(&config).await?;
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
            let (store, ca) = open_parts(&config).await?;
            let result = device_cert(&config, &store, ca, &serial, key, &out).await;
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
            let (store, _) = open_parts(&config).await?;
            let ends = provisioning::renew_lease(&store, &serial, months)
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
            let (store, _) = open_parts(&config).await?;
            if store.device(serial.as_str()).await?.is_none() {
                bail!("device {serial} is not registered");
            }
            let revoked = store
                .revoke_device_certificates(serial.as_str(), "operator", tms_model::now_ms())
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
    let signed = provisioning::sign_device_certificate(
        store,
        ca.clone(),
        serial,
        key,
        OffsetDateTime::now_utc(),
    )
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
    let issued = signed
        .record(store)
        .await
        .with_context(|| format!("recording the certificate of {serial}"))?;
    files.commit()?;
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
/// by [`StagedFiles::commit`]; dropped uncommitted, they leave nothing behind.
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

    /// Puts every file in place.
    fn commit(mut self) -> Result<()> {
        for (staging, target, _) in std::mem::take(&mut self.files) {
            std::fs::rename(&staging, &target).with_context(|| {
                format!(
                    "the certificate is recorded, but moving {} to {} failed",
                    staging.display(),
                    target.display()
                )
            })?;
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every subcommand, flag and positional argument a person can type says what it is for.
    #[test]
    fn every_command_and_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id != "help" && id != "version" && arg.get_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                let name = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() {
                    missing.push(name.clone());
                }
                walk(sub, &name, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Args::command(), "tms-gateway", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:?}");
    }
}
