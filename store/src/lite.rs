//! Ingest's own SQLite connection: rusqlite, run on the ingest task's thread.
//!
//! Through sqlx every SQLite statement is a trip to the connection's worker thread: the
//! command goes over a channel, the worker wakes, and each statement's result comes back over
//! another channel, waking ingest again. A durable PUBACK commits a few messages at a time,
//! and there those wake-ups cost more than SQLite's work: at 5,000 msg/s ingest was busy
//! committing 77-87 % of the time, 150-400 µs a commit of two or three messages, and sqlx's
//! worker thread took 40 % of the gateway's CPU, a fifth of it in switching threads
//! (`perf record` during `bench/latmetrics.sh 5000 10`). Here ingest's statements run where
//! ingest runs, prepared once (the connection's statement cache), with nothing in between.
//!
//! A write blocks ingest's thread while SQLite works: a commit of a healthy batch takes tens
//! of microseconds (SQLite does no fsync at a WAL commit with `synchronous = NORMAL`). What
//! could hold it longer is another process's write lock, so this connection waits at most
//! [`BUSY_TIMEOUT`] for it and then fails as `Locked`, which ingest retries with backoff
//! (asleep, not blocking) while PUBACKs are withheld.
//!
//! The other connections (API, CLI reads, housekeeping) stay on sqlx's pool.

use std::borrow::Cow;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use sqlx::error::{DatabaseError, ErrorKind};

use crate::StoreError;

/// How long ingest's connection waits for another writer's lock before the batch fails as
/// `Locked` (and is retried): other writers' transactions are a few statements long.
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(1);

/// Prepared statements kept by ingest's connection: the shapes steady traffic repeats (a
/// multi-row insert has one shape per row count up to 200, the others one each). The least
/// recently used go first, so a storm's one-off shapes do not stay.
const CACHED_STATEMENTS: usize = 64;

/// The pragmas of every SQLite connection after `page_size` and `journal_mode` (which are
/// the file's and are set by the first connection of the pool).
pub(crate) const PRAGMAS: [&str; 6] = [
    // NORMAL sync is durable across process crashes (the log is synced at checkpoints).
    "PRAGMA synchronous = NORMAL",
    // Writers from other processes (the CLI) queue instead of failing.
    "PRAGMA busy_timeout = 10000",
    "PRAGMA foreign_keys = ON",
    // No checkpoint inside a commit: it would fsync the database file while every device
    // waiting for a PUBACK waits too. The gateway runs them beside the writers instead
    // (`Store::checkpoint`); the last connection to close checkpoints too.
    "PRAGMA wal_autocheckpoint = 0",
    // A log that a burst grew is cut back to 64 MiB when it restarts.
    "PRAGMA journal_size_limit = 67108864",
    // Text an UPDATE or DELETE removes (a delivered mail's password) is zeroed in its page
    // rather than left in free space; FAST costs no extra I/O.
    "PRAGMA secure_delete = FAST",
];

/// Where ingest's connection opens the database the pool has opened (and migrated).
#[derive(Debug, Clone)]
pub(crate) struct Target {
    file: std::path::PathBuf,
}

impl Target {
    pub(crate) fn new(file: std::path::PathBuf) -> Target {
        Target { file }
    }

    /// Opens a connection with the same settings as the pool's.
    pub(crate) fn open(&self) -> Result<Connection, StoreError> {
        let op = "opening ingest's connection";
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(&self.file, flags).map_err(error(op))?;
        for pragma in PRAGMAS {
            conn.execute_batch(pragma).map_err(error(op))?;
        }
        conn.busy_timeout(BUSY_TIMEOUT).map_err(error(op))?;
        conn.set_prepared_statement_cache_capacity(CACHED_STATEMENTS);
        Ok(conn)
    }
}

/// A rusqlite error as the store's: a SQLite result code keeps its code and message, so it
/// is classified ([`crate::StoreFault::of`]) and reported as sqlx's own would be.
pub(crate) fn error(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |e| StoreError::Query {
        op,
        source: match e {
            rusqlite::Error::SqliteFailure(code, message) => {
                sqlx::Error::Database(Box::new(SqliteFailure {
                    code: code.extended_code,
                    message: message.unwrap_or_else(|| code.to_string()),
                }))
            }
            // A parameter the statement does not have, a value SQLite cannot take: the
            // statement or its data is at fault, not the store.
            other => sqlx::Error::Encode(Box::new(other)),
        },
    }
}

/// A failed SQLite call: its extended result code and message.
#[derive(Debug)]
struct SqliteFailure {
    code: std::ffi::c_int,
    message: String,
}

impl std::fmt::Display for SqliteFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for SqliteFailure {}

impl DatabaseError for SqliteFailure {
    fn message(&self) -> &str {
        &self.message
    }

    fn code(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Owned(self.code.to_string()))
    }

    fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self
    }

    fn kind(&self) -> ErrorKind {
        // SQLite's extended codes of constraint failures (SQLITE_CONSTRAINT_*).
        match self.code {
            2067 | 1555 => ErrorKind::UniqueViolation,
            787 => ErrorKind::ForeignKeyViolation,
            1299 => ErrorKind::NotNullViolation,
            275 => ErrorKind::CheckViolation,
            _ => ErrorKind::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StoreFault;

    #[test]
    fn a_sqlite_failure_keeps_its_code_so_faults_are_told_from_bad_data() {
        let conn = Connection::open_in_memory().unwrap_or_else(|e| panic!("{e}"));
        conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
            .unwrap_or_else(|e| panic!("{e}"));
        let refused = conn
            .execute("INSERT INTO t (v) VALUES (NULL)", [])
            .map_err(error("testing"))
            .err()
            .unwrap_or_else(|| panic!("a NULL was taken"));
        assert_eq!(refused.fault(), None, "bad data is not a store fault");
        let StoreError::Query {
            source: sqlx::Error::Database(db),
            ..
        } = &refused
        else {
            panic!("not a database error: {refused:?}");
        };
        assert_eq!(db.kind(), ErrorKind::NotNullViolation);
        assert!(db.message().contains("NOT NULL"), "{}", db.message());

        let full = error("testing")(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            Some("database or disk is full".into()),
        ));
        assert_eq!(full.fault(), Some(StoreFault::Full));
        assert!(format!("{:?}", full).contains("database or disk is full"));
    }
}
