//! The only place SQL lives.
//!
//! One `Store` over sqlx's `Any` driver serves SQLite (the default, in WAL mode) and
//! PostgreSQL (several gateway nodes sharing one database) with the same queries: numbered
//! `$N` parameters, `ON CONFLICT` upserts and times as Unix milliseconds work on both. Each
//! backend has its own migrations under `migrations/`, embedded in the binary.
//!
//! Not here: deciding what to write (that is ingest's and the API's job) or how to show it.

mod accounts;
mod certificates;
mod devices;
mod ingest;
mod users;

pub use accounts::{
    OutgoingMail, QueuedMail, Registration, RegistrationCompany, RegistrationIds, RegistrationUser,
};
pub use certificates::CertificateRecord;
pub use devices::{
    DeviceFilter, DeviceRecord, DeviceStatus, DeviceView, FleetCounts, LocationRecord, NewDevice,
    Refusal, SessionRecord, TelemetryRecord,
};
pub use ingest::{
    InfoRow, LocationRow, QuarantineRow, RefusalRow, StatusEvent, TelemetryRow, WriteBatch,
};
pub use users::{NewUser, UserRecord};

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor};

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
    #[error("database error while {op}")]
    Query {
        op: &'static str,
        #[source]
        source: sqlx::Error,
    },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

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

/// A handle on the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// Deliberate slowness before each ingest batch, for tests of back-pressure. Zero in
    /// production; there is no configuration key for it.
    write_delay_ms: Arc<AtomicU64>,
}

/// The database file of a SQLite URL; `None` for an in-memory database.
fn sqlite_file(url: &str) -> Result<Option<std::path::PathBuf>> {
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(url).map_err(StoreError::Url)?;
    let path = options.get_filename();
    let in_memory = url.contains(":memory:") || url.contains("mode=memory");
    Ok((!in_memory && !path.as_os_str().is_empty()).then(|| path.to_owned()))
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
            Backend::Sqlite => sqlite_file(&url)?,
            Backend::Postgres => None,
        };
        if let Some(path) = &db_file {
            create_private(path)?;
        }
        let pool = AnyPoolOptions::new()
            .max_connections(match backend {
                Backend::Sqlite => 4,
                Backend::Postgres => 10,
            })
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL lets readers (API, CLI) run beside the ingest writer; NORMAL
                        // sync is durable across process crashes, and busy_timeout queues
                        // writers from other processes (the CLI) instead of failing them.
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA synchronous = NORMAL").await?;
                        conn.execute("PRAGMA busy_timeout = 10000").await?;
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                        // Text an UPDATE or DELETE removes (a delivered mail's password) is
                        // zeroed in its page rather than left in free space; FAST costs no
                        // extra I/O.
                        conn.execute("PRAGMA secure_delete = FAST").await?;
                    }
                    Ok(())
                })
            })
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
            backend,
            write_delay_ms: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// True when the database answers a trivial query.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
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

    /// Waits for running queries and closes every connection.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}
