//! The command line (CONTRACT §1).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use tms_certs::DeviceKey;
use tms_config::Config;
use tms_gateway::{App, absolute, create_parts, open_parts};
use tms_model::{ConnState, DeviceSerial, Mac};
use tms_model::{SharedClock, SystemClock};
use tms_registry::{auth, provisioning, views};
use tms_store::{DeviceDetails, DeviceFilter, NewDevice, NewUser};
use tokio_util::sync::CancellationToken;

mod alarms;
mod device;
mod user;

use alarms::alarms;
use device::device;
use user::user_add;

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
        /// A power cut: after this many seconds, --outage-share of the devices go on battery.
        #[arg(long, value_name = "SECS")]
        outage_after: Option<f64>,
        /// Share of the devices the outage hits (0 to 1).
        #[arg(
            long,
            value_name = "F",
            default_value_t = 0.3,
            requires = "outage_after"
        )]
        outage_share: f64,
        /// How long the outage lasts before they are back on mains.
        #[arg(
            long,
            value_name = "SECS",
            default_value_t = 60.0,
            requires = "outage_after"
        )]
        outage_secs: f64,
        /// A reconnect storm: every device dials at the same instant, and after a lost
        /// connection or a failed connect waits a random 0.5-1.5 x back-off (1 s, doubling to
        /// 30 s) before dialling again, as real devices do; reports when the last one got
        /// its CONNACK and how many connects timed out.
        #[arg(long)]
        storm: bool,
    },
    /// UPS alarms of every device, newest first (what `GET /api/v1/alarms` answers an admin).
    Alarms {
        /// Which alarms: open ones, cleared ones, or all.
        #[arg(long, value_parser = ["active", "cleared", "all"], default_value = "all")]
        state: String,
        /// Print the same JSON objects as `GET /api/v1/alarms`.
        #[arg(long)]
        json: bool,
        /// How many to show, newest first (1 to 1000).
        #[arg(long, value_name = "N", default_value_t = 200,
              value_parser = clap::value_parser!(i64).range(1..=1000))]
        limit: i64,
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
    /// Send the device a command (CONTRACT §9): queued now, published QoS 1 on
    /// tms/<SERIAL>/cmd/<NAME> by the gateway holding its session once it is subscribed,
    /// expired if not delivered within --ttl. Prints the command's id.
    Command {
        /// Device S/N (either case).
        serial: String,
        /// Command name: 1 to 32 of a-z, 0-9 and '_' (e.g. self_test, report_now).
        name: String,
        /// Arguments, a JSON object, passed to the device as given.
        #[arg(long, value_name = "JSON")]
        args: Option<String>,
        /// Seconds the command waits for the device at most (1 to 604800).
        #[arg(long, value_name = "SECS", default_value_t = tms_registry::commands::DEFAULT_TTL_SECS)]
        ttl: i64,
        /// Print `{"id", "state"}` as the API answers.
        #[arg(long)]
        json: bool,
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
    // The one clock of this invocation, handed to whatever reads the time.
    let clock = SystemClock::shared();
    match command {
        Command::Serve => serve(config, clock).await,
        Command::Init => init(config, &clock).await,
        Command::User {
            command:
                UserCommand::Add {
                    email,
                    role,
                    password_stdin,
                },
        } => user_add(config, email, role, password_stdin, &clock).await,
        Command::Device { command } => device(config, command, &clock).await,
        Command::Alarms { state, json, limit } => alarms(config, &state, json, limit, &clock).await,
        Command::Simulate {
            devices,
            interval,
            qos,
            duration,
            mqtt,
            outage_after,
            outage_share,
            outage_secs,
            storm,
        } => {
            if !(0.0..=1.0).contains(&outage_share) {
                return Err(usage(format!(
                    "--outage-share {outage_share} must be between 0 and 1"
                )));
            }
            let outage = match outage_after {
                None => None,
                Some(after)
                    if (0.0..=31_536_000.0).contains(&after)
                        && (0.1..=31_536_000.0).contains(&outage_secs) =>
                {
                    Some(tms_gateway::simulate::Outage {
                        after: std::time::Duration::from_secs_f64(after),
                        share: outage_share,
                        length: std::time::Duration::from_secs_f64(outage_secs),
                    })
                }
                Some(_) => {
                    return Err(usage(
                        "--outage-after and --outage-secs must be positive numbers of seconds",
                    ));
                }
            };
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
                    outage,
                    storm,
                },
                &clock,
                stop,
            )
            .await
        }
        Command::Ca {
            command: CaCommand::RenewServer,
        } => {
            let (store, ca) = open_parts(&config, &clock).await?;
            let cert = ca
                .renew_server_cert(
                    &config.data_dir.join("server"),
                    &config.mqtt.hostnames,
                    clock.now_utc(),
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
            let (_, ca) = open_parts(&config, &clock).await?;
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

async fn init(config: Config, clock: &SharedClock) -> Result<()> {
    let existed = config.data_dir.join("ca/ca.pem").is_file();
    let (store, ca) = create_parts(&config, clock).await?;
    let (server, _) = ca
        .ensure_server_cert(
            &config.data_dir.join("server"),
            &config.mqtt.hostnames,
            clock.now_utc(),
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

async fn serve(config: Config, clock: SharedClock) -> Result<()> {
    let app = App::build_with_clock(config, clock).await?;
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
