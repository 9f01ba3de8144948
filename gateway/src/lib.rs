//! The `tms-gateway` program as a library: [`App`] builds every part from a [`Config`] and
//! supervises them; the binary's `main` only parses the command line. Tests drive the same
//! `App` in-process when they need to reach inside (e.g. to slow the store down).

mod app;
mod cluster;
mod commands;
mod data_dir;
mod node;
mod offline_alarms;
mod process_metrics;
mod revocation;
mod server_cert;
pub mod simulate;
mod supervisor;

pub use app::{App, PortsFile, views};
pub use data_dir::{DataDirLock, NoGatewayData, absolute, create_parts, lock_data_dir, open_parts};
pub use tms_certs::certificate_names as server_cert_names;
pub use tms_config::Config;
