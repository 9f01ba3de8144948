//! The workflows that the HTTP API, the command line and background jobs share: certificate
//! issuance and the lease calendar ([`provisioning`]), password hashing and tokens
//! ([`auth`]), the mail queue and its worker ([`mail`]), commands to devices ([`commands`]),
//! alarm notifications ([`alarms`]), and the JSON views of devices ([`views`]).
//!
//! It speaks neither HTTP nor MQTT: it reads and writes the store and asks the CA to sign.
//! `tms-api` turns requests into these calls; `tms-gateway device cert` calls them directly.

pub mod alarms;
pub mod auth;
pub mod commands;
#[cfg(test)]
mod fixtures;
pub mod mail;
pub mod provisioning;
pub mod views;
