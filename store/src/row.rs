//! Column types the `Any` driver cannot decode into the record types directly, for
//! `#[derive(sqlx::FromRow)]` fields marked `#[sqlx(try_from = "…")]`.
//!
//! Flags are stored as integers 0/1 on both backends (SQLite has no boolean, and one schema
//! shape keeps the queries shared), but `Any` decodes a `bool` only from a boolean value. A
//! flag is therefore read as an `i64` and turned into a `bool` here, in one place.
//! Telemetry payloads are JSON text; a row that does not parse (written before validation
//! existed) reads as JSON `null` rather than failing the whole list.
//! Not here: anything a query selects as its own type (text, integers, reals).

use sqlx::any::{Any, AnyTypeInfo, AnyValueRef};
use sqlx::decode::Decode;
use sqlx::error::BoxDynError;
use sqlx::types::Type;
use tms_model::ConnState;

/// Declares that a column type is stored as `$stored` (`i64` or `String`), so `Any` checks
/// the column against that type.
macro_rules! stored_as {
    ($ty:ty, $stored:ty) => {
        impl Type<Any> for $ty {
            fn type_info() -> AnyTypeInfo {
                <$stored as Type<Any>>::type_info()
            }

            fn compatible(ty: &AnyTypeInfo) -> bool {
                <$stored as Type<Any>>::compatible(ty)
            }
        }
    };
}

/// A `NOT NULL` integer flag: anything but 0 is set.
pub(crate) struct Flag(bool);

stored_as!(Flag, i64);

impl<'r> Decode<'r, Any> for Flag {
    fn decode(value: AnyValueRef<'r>) -> Result<Self, BoxDynError> {
        <i64 as Decode<Any>>::decode(value).map(|v| Flag(v != 0))
    }
}

impl From<Flag> for bool {
    fn from(f: Flag) -> bool {
        f.0
    }
}

/// A nullable integer flag: NULL is "not known".
pub(crate) struct MaybeFlag(Option<bool>);

stored_as!(MaybeFlag, i64);

impl<'r> Decode<'r, Any> for MaybeFlag {
    fn decode(value: AnyValueRef<'r>) -> Result<Self, BoxDynError> {
        <Option<i64> as Decode<Any>>::decode(value).map(|v| MaybeFlag(v.map(|v| v != 0)))
    }
}

impl From<MaybeFlag> for Option<bool> {
    fn from(f: MaybeFlag) -> Option<bool> {
        f.0
    }
}

/// A device's connection state from a `LEFT JOIN` on `device_status`: no row is a device
/// that never connected; a state this build does not know reads as offline.
pub(crate) struct StateColumn(ConnState);

stored_as!(StateColumn, String);

impl<'r> Decode<'r, Any> for StateColumn {
    fn decode(value: AnyValueRef<'r>) -> Result<Self, BoxDynError> {
        let state = <Option<String> as Decode<Any>>::decode(value)?;
        Ok(StateColumn(match state {
            None => ConnState::NeverConnected,
            Some(s) => ConnState::parse(&s).unwrap_or(ConnState::Offline),
        }))
    }
}

impl From<StateColumn> for ConnState {
    fn from(s: StateColumn) -> ConnState {
        s.0
    }
}

/// A JSON document stored as text.
pub(crate) struct JsonText(serde_json::Value);

stored_as!(JsonText, String);

impl<'r> Decode<'r, Any> for JsonText {
    fn decode(value: AnyValueRef<'r>) -> Result<Self, BoxDynError> {
        let text = <&str as Decode<Any>>::decode(value)?;
        Ok(JsonText(
            serde_json::from_str(text).unwrap_or(serde_json::Value::Null),
        ))
    }
}

impl From<JsonText> for serde_json::Value {
    fn from(j: JsonText) -> serde_json::Value {
        j.0
    }
}
