//! The operator-facing side of the gateway: HTTP only (axum) — routes, web pages, `/metrics`,
//! health. The workflows behind the routes (certificate issuance, passwords, mail, the JSON
//! views) live in `tms-registry`, shared with the command line.
//!
//! It never speaks MQTT: it reads the store, calls the registry, and tells the broker only
//! which certificates were revoked.

pub mod monitoring;
pub mod server;

mod web;

mod http;

pub use http::{ApiState, metrics_router, router};
