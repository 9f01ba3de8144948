//! `tms-gateway`: parse the command line, load the configuration, run one command.
//! Exit codes: 0 success, 2 bad usage or invalid configuration, 1 anything else.

mod cli;
mod show;

use std::process::ExitCode;

use clap::Parser;
use tms_config::{Config, ConfigError};

fn main() -> ExitCode {
    // Everything the gateway creates in its data directory is private (the database and its
    // -wal/-shm, mails with temporary passwords, keys), and so is anything a library creates
    // there later, which no explicit mode can reach. Set before any thread or file exists;
    // the places that create files also set their modes, for files made by an older version.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let args = cli::Args::parse();
    let config = match Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e @ ConfigError::Read { .. }) => {
            eprintln!(
                "error: {e}: {}",
                std::error::Error::source(&e)
                    .map(ToString::to_string)
                    .unwrap_or_default()
            );
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    cli::init_logging(&args.command, config.log.format);
    let env: std::collections::HashMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().unwrap_or_default())))
        .collect();
    for unknown in tms_config::unknown_variables(&env) {
        tracing::warn!("{unknown}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(cli::run(args.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            let usage = e.is::<cli::UsageError>() || e.is::<tms_gateway::NoGatewayData>();
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}
