//! The command line as an operator meets it: help that answers the usual questions, and
//! commands whose output a person can read.

#![expect(clippy::unwrap_used, clippy::expect_used, reason = "tests fail loudly")]

mod support;

use std::process::Command;

use support::BIN;

fn help(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).arg("--help").output().unwrap();
    assert!(out.status.success(), "{args:?} --help failed");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn device_add_help_names_the_mac_formats_units_and_defaults() {
    let text = help(&["device", "add"]);
    for want in [
        "00:1B:2C:3D:4E:5F",
        "00-1B-2C-3D-4E-5F",
        "001B2C3D4E5F",
        "YYYY-MM-DD",
        "months",
        "[default: 12]",
        "[default: \"RemotEye 4\"]",
    ] {
        assert!(
            text.contains(want),
            "`device add --help` lacks {want:?}:\n{text}"
        );
    }
    let simulate = help(&["simulate"]);
    assert!(simulate.contains("Seconds between telemetry"), "{simulate}");
    assert!(simulate.contains("[default: 5]"), "{simulate}");
}
