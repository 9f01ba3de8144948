//! Commands to devices (CONTRACT §9), as the HTTP API and `tms-gateway device command` send
//! them: checked ([`CommandRequest::new`]), queued in the store ([`queue`]), and shown
//! ([`view`]). Delivery is the gateway's worker, which hands them to the broker; the device's
//! reply is recorded by ingest.

use serde_json::{Map, Value, json};
use tms_model::DeviceSerial;
use tms_store::{CommandRecord, NewCommand, Store, StoreError};

use crate::views::time;

/// Time to live when the sender gives none: an hour.
pub const DEFAULT_TTL_SECS: i64 = 3600;
/// Longest time to live: a week.
pub const MAX_TTL_SECS: i64 = 7 * 24 * 3600;
/// Largest `args` object, as JSON text: it must fit a device's MQTT packet with room to spare.
pub const MAX_ARGS_BYTES: usize = 4096;
/// Recent commands shown with a device (its detail view, `device show`).
pub const SHOWN_WITH_DEVICE: i64 = 10;
/// Longest command name (`[a-z0-9_]{1,32}`).
pub const MAX_NAME_CHARS: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// A field of the request is unacceptable; `field` names it.
    #[error("{field} {problem}")]
    Invalid {
        field: &'static str,
        problem: String,
    },
    #[error("queuing a command")]
    Store(#[from] StoreError),
}

fn invalid(field: &'static str, problem: impl Into<String>) -> CommandError {
    CommandError::Invalid {
        field,
        problem: problem.into(),
    }
}

/// A checked command: its name matches `[a-z0-9_]{1,32}`, its args are a JSON object of at
/// most [`MAX_ARGS_BYTES`], its time to live is 1 s to [`MAX_TTL_SECS`].
#[derive(Debug, Clone, PartialEq)]
pub struct CommandRequest {
    name: String,
    args: Map<String, Value>,
    ttl_secs: i64,
}

impl CommandRequest {
    pub fn new(
        name: &str,
        args: Option<Value>,
        ttl_secs: Option<i64>,
    ) -> Result<Self, CommandError> {
        let name_ok = (1..=MAX_NAME_CHARS).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !name_ok {
            return Err(invalid(
                "name",
                format!("must match [a-z0-9_]{{1,{MAX_NAME_CHARS}}}, got {name:?}"),
            ));
        }
        let args = match args {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(map)) => map,
            Some(_) => return Err(invalid("args", "must be a JSON object")),
        };
        let size = Value::Object(args.clone()).to_string().len();
        if size > MAX_ARGS_BYTES {
            return Err(invalid(
                "args",
                format!("is {size} bytes of JSON (at most {MAX_ARGS_BYTES})"),
            ));
        }
        let ttl_secs = ttl_secs.unwrap_or(DEFAULT_TTL_SECS);
        if !(1..=MAX_TTL_SECS).contains(&ttl_secs) {
            return Err(invalid(
                "ttl_secs",
                format!("must be a whole number of seconds from 1 to {MAX_TTL_SECS}"),
            ));
        }
        Ok(CommandRequest {
            name: name.to_owned(),
            args,
            ttl_secs,
        })
    }
}

/// A new command id: 32 hex digits, the creation time first so ids sort by it, then 80
/// random bits so no one can guess another device's command id.
pub fn new_command_id(now_ms: i64) -> String {
    let mut random = [0u8; 10];
    rand::fill(&mut random);
    format!("{:012x}{}", now_ms.max(0), hex::encode(random))
}

/// Queues `request` for `serial` (a registered device the caller may see), sent by
/// `created_by` (an email, or `cli`).
pub async fn queue(
    store: &Store,
    serial: &DeviceSerial,
    request: CommandRequest,
    created_by: &str,
    now_ms: i64,
) -> Result<CommandRecord, CommandError> {
    let id = new_command_id(now_ms);
    let command = NewCommand {
        id: id.clone(),
        serial: serial.as_str().to_owned(),
        name: request.name,
        args: Value::Object(request.args).to_string(),
        created_at: now_ms,
        created_by: created_by.to_owned(),
        expires_at: now_ms.saturating_add(request.ttl_secs.saturating_mul(1000)),
    };
    store.insert_command(&command).await?;
    metrics::counter!("tms_commands_total", "outcome" => "queued").increment(1);
    tracing::info!(device.serial = %serial, command.id = %id, command.name = %command.name, by = %created_by, "command queued");
    store
        .command(&id)
        .await?
        .ok_or(CommandError::Store(StoreError::NotFound {
            what: "command",
        }))
}

fn args_of(record: &CommandRecord) -> Value {
    serde_json::from_str(&record.args).unwrap_or(Value::Object(Map::new()))
}

/// What the device receives on `tms/<serial>/cmd/<name>`.
pub fn payload(record: &CommandRecord) -> Vec<u8> {
    json!({
        "id": record.id,
        "name": record.name,
        "args": args_of(record),
        "issued_at": time(Some(record.created_at)),
    })
    .to_string()
    .into_bytes()
}

/// The state people see: a command claimed by a node but not yet acknowledged is `queued`.
pub fn public_state(state: &str) -> &str {
    match state {
        "sending" => "queued",
        other => other,
    }
}

/// The JSON of `GET /api/v1/devices/{serial}/commands` (and `--json` on the CLI).
pub fn view(record: &CommandRecord) -> Value {
    json!({
        "id": record.id,
        "name": record.name,
        "args": args_of(record),
        "state": public_state(&record.state),
        "created_at": time(Some(record.created_at)),
        "created_by": record.created_by,
        "expires_at": time(Some(record.expires_at)),
        "delivered_at": time(record.delivered_at),
        "replied_at": time(record.replied_at),
        "reply": record.reply.as_deref().and_then(|r| serde_json::from_str::<Value>(r).ok()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_args_and_ttl_are_checked_by_field() {
        let ok = CommandRequest::new("self_test", None, None).unwrap();
        assert_eq!(ok.ttl_secs, DEFAULT_TTL_SECS);
        assert!(ok.args.is_empty());
        for (name, args, ttl, field) in [
            ("", None, None, "name"),
            ("Self_Test", None, None, "name"),
            ("self-test", None, None, "name"),
            (&"a".repeat(33)[..], None, None, "name"),
            ("x", Some(json!([1])), None, "args"),
            (
                "x",
                Some(json!({"b": "x".repeat(MAX_ARGS_BYTES)})),
                None,
                "args",
            ),
            ("x", None, Some(0), "ttl_secs"),
            ("x", None, Some(MAX_TTL_SECS + 1), "ttl_secs"),
        ] {
            match CommandRequest::new(name, args, ttl) {
                Err(CommandError::Invalid { field: f, .. }) => assert_eq!(f, field, "{name:?}"),
                other => panic!("{name:?}: {other:?}"),
            }
        }
        assert!(
            CommandRequest::new(&"a".repeat(32), Some(json!({"n": 1})), Some(MAX_TTL_SECS)).is_ok()
        );
    }

    #[test]
    fn ids_sort_by_time_and_differ() {
        let a = new_command_id(1_000);
        let b = new_command_id(1_000);
        let c = new_command_id(2_000);
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert!(a < c && b < c);
    }
}
