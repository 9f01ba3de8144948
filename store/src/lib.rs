//! The only place SQL lives.
//!
//! One `Store` over sqlx's `Any` driver serves SQLite (the default, in WAL mode) and
//! PostgreSQL (several gateway nodes sharing one database) with the same queries: numbered
//! `$N` parameters, `ON CONFLICT` upserts and times as Unix milliseconds work on both. Each
//! backend has its own migrations under `migrations/`, embedded in the binary.
//!
//! Not here: deciding what to write (that is ingest's and the API's job) or how to show it.

mod accounts;
mod activity;
mod alarms;
mod certificates;
mod cluster;
mod commands;
mod devices;
mod history;
mod ingest;
mod lite;
mod peers;
mod row;
mod script;
mod timeline;
mod users;
mod wakeup;

pub use accounts::{
    OutgoingMail, QueuedMail, Registration, RegistrationCompany, RegistrationIds, RegistrationUser,
};
pub use alarms::{
    AlarmChange, AlarmFilter, AlarmRecord, Channel, GATEWAY_REASONS, NoticeGroup, PendingNotice,
};
pub use certificates::CertificateRecord;
pub use cluster::{
    CaLock, ClusterEvent, EVENT_CONNECTED, Heartbeat, LostNode, NodeBusy, NodeRecord, SharedCa,
};
pub use commands::{COMMAND_STATES, CommandRecord, NewCommand, ReplyRow};
pub use devices::{
    DeviceDetails, DeviceFilter, DeviceRecord, DeviceStatus, DeviceView, FleetCounts, NewDevice,
};
pub use history::{LocationRecord, QuarantinedPayload, SessionRecord, TelemetryRecord};
pub use ingest::{
    InfoRow, LocationRow, QuarantineRow, RefusalRow, Split, StatusEvent, TelemetryRow, WriteBatch,
};
pub use peers::{PEER_REFUSALS_KEPT, PeerRefusal};
pub use timeline::DeviceEvent;
pub use users::{NewUser, UserRecord};
pub use wakeup::{WakeupListener, Wakeups};

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor, Row};

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

/// Which database the store talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// Store failures; each names the operation that failed and keeps the cause.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} already exists")]
    Conflict { what: &'static str },
    #[error("{what} not found")]
    NotFound { what: &'static str },
    #[error("database URL is not usable")]
    Url(#[source] sqlx::Error),
    #[error("connecting to the database")]
    Connect(#[source] sqlx::Error),
    #[error("keeping the database file {path} private")]
    FileMode {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("migrating the {backend} schema")]
    Migrate {
        backend: &'static str,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("the database did not answer in time while {op}")]
    Timeout { op: &'static str },
    #[error("database error while {op}")]
    Query {
        op: &'static str,
        #[source]
        source: sqlx::Error,
    },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// How every write transaction starts on SQLite: with the write lock taken at once, so
/// `busy_timeout` queues it behind other writers (see `Store::begin_write`).
pub(crate) const SQLITE_BEGIN_WRITE: &str = "BEGIN IMMEDIATE";

/// Why the database cannot take writes right now: a condition of the store, not of the data,
/// that goes away by itself (space freed, database back). Writes are retried, never split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFault {
    /// Disk or quota full (SQLite `SQLITE_FULL`, PostgreSQL class 53).
    Full,
    /// The database or its files are read-only.
    ReadOnly,
    /// Another writer holds the database (SQLite `SQLITE_BUSY`/`LOCKED`, deadlocks).
    Locked,
    /// The database cannot be reached, or its connection or I/O failed.
    Unreachable,
}

impl StoreFault {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreFault::Full => "disk_full",
            StoreFault::ReadOnly => "read_only",
            StoreFault::Locked => "locked",
            StoreFault::Unreachable => "unreachable",
        }
    }

    /// Classifies a database error; `None` means the statement or its data is at fault.
    pub fn of(e: &sqlx::Error) -> Option<StoreFault> {
        use sqlx::Error as E;
        match e {
            E::Io(_)
            | E::Tls(_)
            | E::Protocol(_)
            | E::PoolTimedOut
            | E::PoolClosed
            | E::WorkerCrashed
            | E::BeginFailed => Some(StoreFault::Unreachable),
            E::Database(db) => StoreFault::of_code(&db.code()?),
            _ => None,
        }
    }

    /// Classifies a database's error code: a PostgreSQL SQLSTATE (always five characters,
    /// often all digits: `25006`, `53100`, `40001`, `08006`) or an SQLite (extended) result
    /// code (a number below 10,000, its primary code in the low byte). Told apart by length,
    /// not by whether the code parses as a number: read as SQLite codes, PostgreSQL's
    /// read-only and disk-full states came out as bad data, and their batches were split and
    /// refused row by row instead of retried (probed: a read-only PostgreSQL).
    fn of_code(code: &str) -> Option<StoreFault> {
        if code.len() == 5 {
            return match &code[..2] {
                "53" => Some(StoreFault::Full),
                "25" if code == "25006" => Some(StoreFault::ReadOnly),
                "40" => Some(StoreFault::Locked),
                "08" | "57" | "58" => Some(StoreFault::Unreachable),
                _ => None,
            };
        }
        match code.parse::<i64>().ok()? & 0xff {
            13 => Some(StoreFault::Full),
            8 => Some(StoreFault::ReadOnly),
            5 | 6 => Some(StoreFault::Locked),
            10 | 14 | 15 | 26 => Some(StoreFault::Unreachable),
            _ => None,
        }
    }
}

#[cfg(test)]
mod fault_tests {
    use super::StoreFault;

    #[test]
    fn postgres_states_and_sqlite_codes_are_each_read_as_their_own() {
        for (code, fault) in [
            // PostgreSQL SQLSTATEs, digits only and not.
            ("25006", Some(StoreFault::ReadOnly)),
            ("53100", Some(StoreFault::Full)),
            ("53200", Some(StoreFault::Full)),
            ("40001", Some(StoreFault::Locked)),
            ("40P01", Some(StoreFault::Locked)),
            ("08006", Some(StoreFault::Unreachable)),
            ("57P01", Some(StoreFault::Unreachable)),
            ("22021", None), // invalid byte sequence: the data
            ("23505", None), // unique violation: the data
            // SQLite primary and extended result codes.
            ("13", Some(StoreFault::Full)),
            ("8", Some(StoreFault::ReadOnly)),
            ("1032", Some(StoreFault::ReadOnly)), // SQLITE_READONLY_DBMOVED
            ("5", Some(StoreFault::Locked)),
            ("517", Some(StoreFault::Locked)), // SQLITE_BUSY_SNAPSHOT
            ("778", Some(StoreFault::Unreachable)), // SQLITE_IOERR_WRITE
            ("1299", None),                    // NOT NULL constraint
            ("2067", None),                    // UNIQUE constraint
        ] {
            assert_eq!(StoreFault::of_code(code), fault, "code {code}");
        }
    }
}

impl StoreError {
    /// The store condition behind this error, if it is one (see [`StoreFault`]).
    pub fn fault(&self) -> Option<StoreFault> {
        match self {
            StoreError::Connect(e) | StoreError::Query { source: e, .. } => StoreFault::of(e),
            StoreError::Timeout { .. } => Some(StoreFault::Unreachable),
            _ => None,
        }
    }
}

pub(crate) fn query_err(op: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Query { op, source }
}

/// Maps a unique-constraint violation to `Conflict`, anything else to `Query`.
pub(crate) fn unique_err(
    op: &'static str,
    what: &'static str,
) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| match &source {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict { what },
        _ => StoreError::Query { op, source },
    }
}

/// Log frames (database pages) past which ingest copies the rest of the write-ahead log
/// itself so that it restarts (see [`Store::checkpoint`]): 4 MiB at 1 KiB pages.
pub const WAL_RESTART_FRAMES: i64 = 4096;

/// A handle on the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    /// SQLite: where ingest opens its own connection (see `lite.rs`); `None` on PostgreSQL.
    sqlite: Option<Arc<lite::Target>>,
    /// The connection ingest writes through, kept between batches (see
    /// `Store::write_batch`); `None` until the first batch and after a failure.
    ingest_conn: Arc<tokio::sync::Mutex<Option<script::IngestConn>>>,
    backend: Backend,
    /// Deliberate slowness before each ingest batch, for tests of back-pressure. Zero in
    /// production; there is no configuration key for it.
    write_delay_ms: Arc<AtomicU64>,
    /// Set by [`Store::checkpoint`] when the write-ahead log has grown past
    /// [`WAL_RESTART_FRAMES`]; ingest then finishes the copy between two of its batches.
    wal_restart_due: Arc<AtomicBool>,
    /// Ingest commits since the last [`Store::checkpoint`] (see
    /// [`Store::commits_since_checkpoint`]).
    wal_commits: Arc<AtomicU64>,
    /// Why ingest's last write failed, while it keeps failing; readiness reports it.
    write_fault: Arc<Mutex<Option<StoreFault>>>,
    /// The PostgreSQL URL, for the wake-up listener's own connection (`None` on SQLite).
    url: Option<Arc<str>>,
}

/// The database file of a SQLite URL. An in-memory database is refused: the pool's
/// connections and ingest's would each see a database of their own.
fn sqlite_file(url: &str) -> Result<std::path::PathBuf> {
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(url).map_err(StoreError::Url)?;
    let path = options.get_filename();
    let in_memory = url.contains(":memory:") || url.contains("mode=memory");
    if in_memory || path.as_os_str().is_empty() {
        return Err(StoreError::Url(sqlx::Error::Configuration(
            format!("{url}: an in-memory SQLite database is not supported; give a file, e.g. sqlite:///var/lib/tms/tms.db").into(),
        )));
    }
    Ok(path.to_owned())
}

/// Creates the SQLite file empty with mode 0600 before SQLite does (it would use 0644 less
/// the umask), so the database and the -wal and -shm files SQLite derives from it are
/// readable by the gateway's user only: they hold password hashes and tokens.
fn create_private(path: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => tighten(path),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => tighten(path),
        // A missing directory and the like: SQLite reports it better when it connects.
        Err(_) => Ok(()),
    }
}

/// Sets mode 0600 on `path` if it exists and anyone but its owner may use it.
fn tighten(path: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| StoreError::FileMode {
        path: path.to_owned(),
        source,
    };
    match std::fs::metadata(path) {
        Ok(meta) if meta.permissions().mode() & 0o077 != 0 => {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(err(e)),
    }
}

/// Page cache of each SQLite connection of the shared pool (API, CLI reads, housekeeping),
/// in KiB. Their reads are few and the kernel caches the file; at SQLite's default of 2 MiB
/// the four of them held megabytes of pages that ingest's writes made stale anyway. Ingest's
/// own connection keeps the default: its pages are the ones every batch touches.
const POOL_PAGE_CACHE_KIB: i64 = 256;

/// The pool settings of both backends; on SQLite every connection gets the same pragmas, and
/// `page_cache_kib` as its page cache (`None`: SQLite's default).
fn pool_options(backend: Backend, max: u32, page_cache_kib: Option<i64>) -> AnyPoolOptions {
    AnyPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(10))
        // A ping before each acquire is a round trip to SQLite's worker thread that finds
        // nothing: a SQLite file does not drop connections. A statement that fails for a
        // cause of the store is handled where it fails (the ingest connection is closed).
        .test_before_acquire(backend == Backend::Postgres)
        .after_connect(move |conn, _| {
            Box::pin(async move {
                if backend == Backend::Sqlite {
                    // Pages of 1 KiB in a new database (an existing one keeps its own): a
                    // commit of a few telemetry rows rewrites a handful of pages (table and
                    // index leaves, status row, header), so the log grows by pages, not
                    // rows; at 4 KiB that was 32 MB/s at 5,000 msg/s, and its fsync at each
                    // checkpoint stalled commits (p99 PUBLISH → PUBACK 17-46 ms; 7-10 ms at
                    // 1 KiB, same run). Must come before WAL mode is set.
                    conn.execute("PRAGMA page_size = 1024").await?;
                    // WAL lets readers (API, CLI) run beside the ingest writer.
                    conn.execute("PRAGMA journal_mode = WAL").await?;
                    for pragma in lite::PRAGMAS {
                        conn.execute(pragma).await?;
                    }
                    if let Some(kib) = page_cache_kib {
                        conn.execute(format!("PRAGMA cache_size = -{kib}").as_str())
                            .await?;
                    }
                }
                Ok(())
            })
        })
}

impl Store {
    /// Connects, creating the SQLite file if needed (mode 0600), and applies pending
    /// migrations.
    pub async fn open(url: &str) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            Backend::Postgres
        };
        let url = match backend {
            Backend::Sqlite if !url.contains('?') => format!("{url}?mode=rwc"),
            _ => url.to_owned(),
        };
        let options = AnyConnectOptions::from_str(&url).map_err(StoreError::Url)?;
        let db_file = match backend {
            Backend::Sqlite => Some(sqlite_file(&url)?),
            Backend::Postgres => None,
        };
        if let Some(path) = &db_file {
            create_private(path)?;
        }
        let pool = pool_options(
            backend,
            match backend {
                Backend::Sqlite => 4,
                Backend::Postgres => 10,
            },
            Some(POOL_PAGE_CACHE_KIB),
        )
        .connect_with(options)
        .await
        .map_err(StoreError::Connect)?;
        let migrator = match backend {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
        };
        migrator
            .run(&pool)
            .await
            .map_err(|source| StoreError::Migrate {
                backend: backend.as_str(),
                source,
            })?;
        if let Some(path) = &db_file {
            // SQLite gives -wal and -shm the database file's mode when it creates them; files
            // left by an older version (or another umask) are tightened here.
            for suffix in ["", "-wal", "-shm"] {
                let mut name = path.clone().into_os_string();
                name.push(suffix);
                tighten(std::path::Path::new(&name))?;
            }
        }
        Ok(Store {
            pool,
            sqlite: db_file.map(|file| Arc::new(lite::Target::new(file))),
            ingest_conn: Arc::new(tokio::sync::Mutex::new(None)),
            backend,
            write_delay_ms: Arc::new(AtomicU64::new(0)),
            wal_restart_due: Arc::new(AtomicBool::new(false)),
            wal_commits: Arc::new(AtomicU64::new(0)),
            write_fault: Arc::new(Mutex::new(None)),
            url: (backend == Backend::Postgres).then(|| Arc::from(url.as_str())),
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// True when the database answers a trivial query.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// Records whether writes are failing for a store condition (`None`: they succeed).
    pub fn set_write_fault(&self, fault: Option<StoreFault>) {
        if let Ok(mut f) = self.write_fault.lock() {
            *f = fault;
        }
    }

    /// The store condition that makes writes fail right now, if any.
    pub fn write_fault(&self) -> Option<StoreFault> {
        self.write_fault.lock().ok().and_then(|f| *f)
    }

    /// Starts a write transaction ([`SQLITE_BEGIN_WRITE`] on SQLite). On SQLite it takes the write lock at once (`BEGIN
    /// IMMEDIATE`), so `busy_timeout` queues it behind other writers; a deferred transaction
    /// that reads first would fail with "database is locked" when another writer committed
    /// in between, whatever the timeout.
    pub(crate) async fn begin_write(
        &self,
        op: &'static str,
    ) -> Result<sqlx::Transaction<'static, sqlx::Any>> {
        match self.backend {
            Backend::Sqlite => self.pool.begin_with(SQLITE_BEGIN_WRITE).await,
            Backend::Postgres => self.pool.begin().await,
        }
        .map_err(query_err(op))
    }

    /// Copies the SQLite write-ahead log into the database without blocking writers
    /// (`PASSIVE`), so commits never wait for a checkpoint: no mode that waits for writers
    /// (`TRUNCATE` held every commit, and the PUBACKs behind it, for an fsync of the
    /// database file). Nothing to do on PostgreSQL.
    ///
    /// The log starts again from its beginning only at a commit that finds it copied whole,
    /// and under steady load ingest commits while this runs, so that never happens by
    /// itself: the log grew by tens of MB a second at 5,000 msg/s, and every checkpoint's
    /// fsync of it stalled commits for longer (p99 PUBLISH → PUBACK 376 ms after 20 s).
    /// Past [`WAL_RESTART_FRAMES`] ingest copies the rest itself between two batches
    /// ([`Store::restart_wal_if_due`]), when it is the one writer and is not writing.
    ///
    /// Returns the pages the log held (0 on PostgreSQL).
    pub async fn checkpoint(&self) -> Result<i64> {
        if self.backend != Backend::Sqlite {
            return Ok(0);
        }
        let commits = self.wal_commits.swap(0, Ordering::Relaxed);
        let op = "checkpointing the write-ahead log";
        let frames = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(&self.pool)
            .await
            .and_then(|row| row.try_get::<i64, _>(1))
            .map_err(|e| {
                // Still due: the next tick tries again.
                self.wal_commits
                    .fetch_add(commits.max(1), Ordering::Relaxed);
                query_err(op)(e)
            })?;
        metrics::gauge!("tms_store_wal_frames").set(frames as f64);
        if frames >= WAL_RESTART_FRAMES {
            self.wal_restart_due.store(true, Ordering::Relaxed);
        }
        Ok(frames)
    }

    /// How many batches ingest has committed since the last [`Store::checkpoint`]: what the
    /// gateway's checkpoint task decides by.
    pub fn commits_since_checkpoint(&self) -> u64 {
        self.wal_commits.load(Ordering::Relaxed)
    }

    /// After a committed ingest batch: counts the commit for the checkpoint task.
    pub(crate) fn count_ingest_commit(&self) {
        if self.backend == Backend::Sqlite {
            self.wal_commits.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Between two ingest batches, after the PUBACKs of the first have gone: when
    /// [`Store::checkpoint`] found the log long, copies what it left on ingest's own
    /// connection, so that the next commit starts the log again (and `journal_size_limit`
    /// trims the file). A stall of one short copy and its fsyncs, which no acknowledged
    /// message waits for; only messages that arrive meanwhile do, queued for the next
    /// batch. Nothing to do otherwise, or on PostgreSQL.
    pub async fn restart_wal_if_due(&self) {
        if self.backend != Backend::Sqlite || !self.wal_restart_due.swap(false, Ordering::Relaxed) {
            return;
        }
        let mut held = self.ingest_conn().lock().await;
        // No connection after a failed batch: the next background checkpoint asks again.
        let Some(script::IngestConn::Sqlite(conn)) = held.as_mut() else {
            return;
        };
        let started = std::time::Instant::now();
        match conn.execute_batch("PRAGMA wal_checkpoint(PASSIVE)") {
            Ok(_) => metrics::histogram!("tms_store_wal_restart_seconds")
                .record(started.elapsed().as_secs_f64()),
            // Retried after the next background checkpoint; the batch is committed anyway.
            Err(e) => tracing::debug!(error = %e, "copying the write-ahead log from ingest failed"),
        }
    }

    /// Slows every ingest batch down by `delay` (tests of back-pressure only).
    pub fn set_write_delay(&self, delay: Duration) {
        self.write_delay_ms.store(
            delay.as_millis().try_into().unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    pub(crate) fn write_delay(&self) -> Duration {
        Duration::from_millis(self.write_delay_ms.load(Ordering::Relaxed))
    }

    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub(crate) fn sqlite_target(&self) -> Option<&lite::Target> {
        self.sqlite.as_deref()
    }

    pub(crate) fn ingest_conn(&self) -> &tokio::sync::Mutex<Option<script::IngestConn>> {
        &self.ingest_conn
    }

    /// Waits for running queries and closes every connection.
    pub async fn close(&self) {
        match self.ingest_conn.lock().await.take() {
            Some(script::IngestConn::Postgres(conn)) => {
                let _ = sqlx::Connection::close(conn).await;
            }
            // Closed before the pool, so the pool's last connection is the one to checkpoint.
            Some(script::IngestConn::Sqlite(conn)) => drop(conn),
            None => {}
        }
        self.pool.close().await;
    }
}
