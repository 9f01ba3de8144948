//! The operator-facing side of the gateway: HTTP (axum), and the workflows that the HTTP API
//! and the command line share — password hashing, certificate issuance, the JSON views.
//!
//! It never speaks MQTT: it reads the store, asks the CA to sign, and tells the broker only
//! which certificates were revoked.

pub mod auth;
pub mod mail;
pub mod monitoring;
pub mod provisioning;
pub mod server;
pub mod views;

mod web;

mod http;

pub use http::{ApiState, metrics_router, router};
