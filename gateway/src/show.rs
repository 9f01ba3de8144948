//! `device show` for people: what state the device is in and why, first; then its
//! registration, certificates one per line, location, recent refused attempts and commands.
//! `--json` prints the API's object instead and does not come here.

use std::fmt::Write;

use tms_model::ConnState;
use tms_registry::views;
use tms_store::{CertificateRecord, CommandRecord, DeviceView, LocationRecord, RefusalRow};

/// Everything `device show` prints about one device.
pub struct Shown<'a> {
    pub view: &'a DeviceView,
    pub locations: &'a [LocationRecord],
    /// Newest first, as the store gives them.
    pub certificates: &'a [CertificateRecord],
    pub refusals: &'a [RefusalRow],
    /// Recent commands, newest first.
    pub commands: &'a [CommandRecord],
    /// How many malformed payloads are kept for `device quarantine`.
    pub rejected_payloads: usize,
    pub now_ms: i64,
}

fn when(ms: Option<i64>) -> String {
    views::time(ms).as_str().unwrap_or("-").to_owned()
}

fn day(ms: i64) -> String {
    let t = when(Some(ms));
    t.get(..10).unwrap_or(&t).to_owned()
}

impl Shown<'_> {
    /// The summary as text, ready to print.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.status(&mut out);
        self.registration(&mut out);
        self.certificates(&mut out);
        self.location(&mut out);
        self.refusals(&mut out);
        self.commands(&mut out);
        out
    }

    fn commands(&self, out: &mut String) {
        if self.commands.is_empty() {
            let _ = writeln!(out, "\nrecent commands: none");
            return;
        }
        let _ = writeln!(out, "\nrecent commands ({})", self.commands.len());
        for c in self.commands {
            let state = tms_registry::commands::public_state(&c.state);
            let _ = write!(
                out,
                "  {}  {:<16} {:<10} {}",
                when(Some(c.created_at)),
                c.name,
                state,
                c.id
            );
            match (&c.reply, c.replied_at, c.delivered_at) {
                (Some(reply), Some(at), _) => {
                    let _ = writeln!(out, "  reply at {}: {reply}", when(Some(at)));
                }
                (_, _, Some(at)) => {
                    let _ = writeln!(out, "  delivered at {}", when(Some(at)));
                }
                _ => {
                    let _ = writeln!(out, "  until {}", when(Some(c.expires_at)));
                }
            }
        }
    }

    fn status(&self, out: &mut String) {
        let d = &self.view.device;
        let s = &self.view.status;
        let _ = match s.state {
            ConnState::Online => writeln!(
                out,
                "{}: online since {}{}",
                d.serial,
                when(s.since),
                s.peer_addr
                    .as_deref()
                    .map(|p| format!(" from {p}"))
                    .unwrap_or_default()
            ),
            ConnState::Offline => writeln!(
                out,
                "{}: offline since {} ({})",
                d.serial,
                when(s.since),
                s.last_disconnect_reason
                    .as_deref()
                    .unwrap_or("reason not recorded")
            ),
            ConnState::NeverConnected => {
                writeln!(out, "{}: never connected", d.serial)
            }
        };
        if s.last_seen.is_some() || s.last_telemetry_at.is_some() {
            let _ = writeln!(
                out,
                "  last seen {}, last telemetry {}",
                when(s.last_seen),
                when(s.last_telemetry_at)
            );
        }
        if let Some(reason) = &s.last_connect_error {
            let _ = writeln!(
                out,
                "  last refused {}: {reason}{}",
                when(s.last_connect_error_at),
                s.last_connect_error_detail
                    .as_deref()
                    .map(|d| format!(" — {d}"))
                    .unwrap_or_default()
            );
        }
        if s.state == ConnState::NeverConnected && s.last_connect_error.is_none() {
            let _ = writeln!(
                out,
                "  no attempt naming this device has reached the gateway yet"
            );
        }
        if self.rejected_payloads > 0 {
            let _ = writeln!(
                out,
                "  {} rejected payload(s): see `tms-gateway device quarantine {}`",
                self.rejected_payloads, d.serial
            );
        }
    }

    fn registration(&self, out: &mut String) {
        let d = &self.view.device;
        let _ = writeln!(out, "\nregistration");
        let mut field = |name: &str, value: &str| {
            let _ = writeln!(out, "  {name:<14}{value}");
        };
        field("company", &d.company);
        field("type", &d.details.device_type);
        field("MAC", &d.mac);
        let ups = [
            d.details.ups_model.as_deref(),
            d.details
                .ups_model_number
                .as_deref()
                .map(|n| format!("({n})"))
                .as_deref(),
            d.details
                .ups_serial
                .as_deref()
                .map(|s| format!("S/N {s}"))
                .as_deref(),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ");
        field("UPS", if ups.is_empty() { "-" } else { &ups });
        if let Some(name) = &d.system_name {
            let mismatch = if d.identity_mismatch == Some(true) {
                " (does not match the registration)"
            } else {
                ""
            };
            field("reports", &format!("{name}{mismatch}"));
        }
        let days_left = (d.details.lease_ends_at - self.now_ms).div_euclid(86_400_000);
        field(
            "lease",
            &format!(
                "{} months from {}, ends {} ({})",
                d.details.lease_months,
                d.details.start_date,
                day(d.details.lease_ends_at),
                if days_left < 0 {
                    "ended".to_owned()
                } else {
                    format!("{days_left} days left")
                }
            ),
        );
    }

    fn certificates(&self, out: &mut String) {
        let _ = writeln!(out, "\ncertificates ({})", self.certificates.len());
        if self.certificates.is_empty() {
            let _ = writeln!(
                out,
                "  none: issue one with `tms-gateway device cert {} --out DIR`",
                self.view.device.serial
            );
        }
        let current = self
            .certificates
            .iter()
            .find(|c| c.revoked_at.is_none())
            .map(|c| &c.serial_number);
        for c in self.certificates {
            let state = match (&c.revoked_at, &c.revocation_reason) {
                (Some(at), reason) => format!(
                    "revoked {}{}",
                    when(Some(*at)),
                    reason
                        .as_deref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                ),
                (None, _) if c.not_after <= self.now_ms => "expired".to_owned(),
                (None, _) if current == Some(&c.serial_number) => "valid, newest".to_owned(),
                (None, _) => "valid until the device uses a newer one".to_owned(),
            };
            let _ = writeln!(
                out,
                "  {}  not after {}  {state}",
                c.serial_number,
                when(Some(c.not_after))
            );
        }
    }

    fn location(&self, out: &mut String) {
        let text = match self.locations.first() {
            Some(l) => format!(
                "{:.5}, {:.5}{} ({}, {})",
                l.lat,
                l.lon,
                l.accuracy_m.map(|a| format!(" ±{a} m")).unwrap_or_default(),
                l.source,
                when(Some(l.updated_at))
            ),
            None => format!(
                "not known (set one with `tms-gateway device locate {} --lat DEG --lon DEG`)",
                self.view.device.serial
            ),
        };
        let _ = writeln!(out, "\nlocation: {text}");
    }

    fn refusals(&self, out: &mut String) {
        if self.refusals.is_empty() {
            let _ = writeln!(out, "\nrecent refusals: none");
            return;
        }
        let _ = writeln!(out, "\nrecent refusals ({})", self.refusals.len());
        for r in self.refusals {
            let _ = writeln!(
                out,
                "  {}  {}  {} attempt(s){}: {}",
                when(Some(r.last_at)),
                r.reason,
                r.attempts,
                r.peer_addr
                    .as_deref()
                    .map(|p| format!(" from {p}"))
                    .unwrap_or_default(),
                r.detail
            );
        }
    }
}
