//! `TMS_*` variables that set nothing — most likely misspelt — named with the setting they
//! most likely meant.

use std::collections::HashMap;
use std::fmt;

use crate::{KEYS, env_var};

/// Environment variables that are not configuration keys but are still ours.
const OTHER_VARIABLES: &[&str] = &[
    // The CA key's passphrase: environment only (see `Certs::ca_key_passphrase`).
    "TMS_CA_KEY_PASSPHRASE",
    // The PostgreSQL server of the test suite (scripts/test).
    "TMS_TEST_DATABASE_URL",
    // Makes a skipped test fail instead (scripts/test sets it).
    "TMS_TEST_REQUIRE_ALL",
    // Set by gateway/build.rs for the build; `cargo test` passes it on to what it runs.
    "TMS_GIT_COMMIT",
];

/// A `TMS_*` environment variable that sets nothing, most likely a misspelling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownVariable {
    pub name: String,
    /// The known variable it is closest to, when one is close enough to be meant.
    pub suggestion: Option<String>,
}

impl fmt::Display for UnknownVariable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} is not a tms-gateway setting and is ignored",
            self.name
        )?;
        if let Some(s) = &self.suggestion {
            write!(f, "; did you mean {s}?")?;
        }
        Ok(())
    }
}

/// The `TMS_*` variables of `env` that configure nothing, sorted by name, each with the known
/// variable it most likely meant.
pub fn unknown_variables(env: &HashMap<String, String>) -> Vec<UnknownVariable> {
    let known: Vec<String> = KEYS
        .iter()
        .map(|(section, key)| env_var(section, key))
        .chain(OTHER_VARIABLES.iter().map(|v| (*v).to_owned()))
        .collect();
    let mut unknown: Vec<UnknownVariable> = env
        .keys()
        .filter(|name| name.starts_with("TMS_") && !known.contains(name))
        .map(|name| {
            let suggestion = known
                .iter()
                .map(|k| (edit_distance(&name.to_ascii_uppercase(), k), k))
                .min()
                .filter(|(d, k)| *d <= (k.len() / 4).max(2))
                .map(|(_, k)| k.clone());
            UnknownVariable {
                name: name.clone(),
                suggestion,
            }
        })
        .collect();
    unknown.sort_by(|a, b| a.name.cmp(&b.name));
    unknown
}

/// Levenshtein distance: insertions, deletions and substitutions of one character each.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(above + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}
