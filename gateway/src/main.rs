//! `tms-gateway`: parse the command line, load the configuration, run one command.
//! Exit codes: 0 success, 2 bad usage or invalid configuration, 1 anything else.

mod cli;

use std::process::ExitCode;

use clap::Parser;
use tms_config::{Config, ConfigError};

fn main() -> ExitCode {
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
    tms_api::views::set_silent_after_intervals(config.presence.silent_after_intervals);
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
            ExitCode::from(if e.is::<cli::UsageError>() { 2 } else { 1 })
        }
    }
}
